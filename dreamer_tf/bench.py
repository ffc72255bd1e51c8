"""Speed and memory of the train step at the default sizes, on random data.

  python -m dreamer_tf.bench [--batch_size 50] [--batch_length 50] [--steps 5]
                             [--precision both|32|16] [--json]
                             [--strategy default,mirrored --devices CPU:0,CPU:1
                              --rounds 2]
  python -m dreamer_tf.bench --collect [--task dmc_walker_walk] [--envs 1]
                             [--parallel none] [--agent_steps 300]

Builds the agent for the default task's spaces (64x64x3 images, 6 continuous
action dims, no pcont) and prints a table: parameter counts, time to the end
of the first train step (tracing included), median seconds per train step
after one more warm-up step, and peak resident memory. Each precision runs in
its own subprocess so that one's memory does not inflate the other's. With
--json the last line is one JSON object. --strategy takes a comma-separated
list (default, mirrored; --devices as in dreamer.py): each precision runs
under each strategy, alternating, --rounds times, so that two variants are
compared in the same run.

--collect measures environment steps per second instead: with uniformly
random actions (the prefill) and with the untrained policy at the default
sizes, one batched policy call per agent step (the collection).
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

ACT_DIM = 6


def measure(precision, batch_size, batch_length, steps, strategy='default',
            devices=''):
  """Runs in the child process: returns the row for one precision."""
  import numpy as np

  import dreamer_tf
  from dreamer_tf import distribute
  dreamer_tf.quiet_tensorflow()
  strategy_object = distribute.make_strategy(strategy, devices)
  import tensorflow as tf

  import dreamer
  from dreamer_tf.agent import Dreamer

  config = dreamer.define_config()
  config.precision = precision
  agent = Dreamer(config, ACT_DIM, strategy=strategy_object)
  rng = np.random.default_rng(0)
  shape = (batch_size, batch_length)
  data = dict(
      image=tf.constant(rng.integers(0, 256, shape + (64, 64, 3)), tf.uint8),
      action=tf.constant(rng.uniform(-1, 1, shape + (ACT_DIM,)), tf.float32),
      reward=tf.constant(rng.normal(size=shape), tf.float32),
      discount=tf.ones(shape, tf.float32))
  start = time.perf_counter()
  agent.train(data)['model_loss'].numpy()
  first = time.perf_counter() - start
  agent.train(data)['model_loss'].numpy()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    agent.train(data)['model_loss'].numpy()
    times.append(time.perf_counter() - start)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(
      precision=precision, policy=agent.policy, strategy=strategy,
      replicas=distribute.replicas(strategy_object),
      first_step_s=round(first, 2),
      step_s_median=round(float(np.median(times)), 3),
      step_s_all=[round(t, 3) for t in times], peak_rss_mb=round(peak_mb),
      params=agent.param_counts())


def measure_collection(args):
  """Env steps per second of the prefill and of the policy's collection."""

  import numpy as np

  import dreamer_tf
  dreamer_tf.quiet_tensorflow()
  import dreamer
  import tools
  import wrappers
  from dreamer_tf import agent as agent_lib
  from dreamer_tf import replay

  config = dreamer.define_config()
  config.task, config.envs = args.task, args.envs
  config.parallel = args.parallel
  envs = dreamer.make_envs(config, train=True)
  rng = np.random.default_rng(0)
  space = envs.action_space
  agent = agent_lib.Dreamer(config, space.shape[0])
  actor = agent_lib.Policy(agent)
  def random_policy(images, reset, state):
    return [wrappers.random_action(space, rng) for _ in images], state
  def agent_policy(images, reset, state):
    actions, state = actor(images, reset, state, True, config.expl_amount)
    return actions.numpy(), state
  rows = []
  try:
    for name, policy in (('random (prefill)', random_policy),
                         ('policy (collect)', agent_policy)):
      state = tools.simulate(policy, envs, steps=20)  # Warm-up and tracing.
      start = time.perf_counter()
      tools.simulate(policy, envs, steps=args.agent_steps, state=state)
      seconds = time.perf_counter() - start
      env_steps = replay.env_steps(args.agent_steps, config.action_repeat)
      rows.append(dict(policy=name,
                       env_steps_per_s=round(env_steps / seconds, 1),
                       ms_per_agent_step=round(1000 * seconds * args.envs /
                                               args.agent_steps, 1)))
  finally:
    envs.close()
  print(f'{args.task}, {args.envs} env(s), parallel {args.parallel}, '
        f'action repeat {config.action_repeat}, {args.agent_steps} agent steps')
  print(f'{"policy":>18}  {"env steps/s":>12}  {"ms/agent step/env":>18}')
  for row in rows:
    print(f'{row["policy"]:>18}  {row["env_steps_per_s"]:>12}  '
          f'{row["ms_per_agent_step"]:>18}')
  if args.json:
    print(json.dumps(dict(task=args.task, rows=rows)))


def measure_replay(args):
  """Peak memory of the replay holding `--stored` environment steps of
  synthetic 64x64x3 episodes (of the default length, action repeat 2),
  without a bound and with `--replay_size`. Each variant runs in its own
  process (`--child_replay`), which loads the episodes through the
  training sampler and draws windows from them."""
  import shutil
  import tempfile

  import numpy as np

  from dreamer_tf import replay
  repeat, length = 2, 501
  count = max(1, args.stored // replay.episode_steps(length, repeat))
  folder = pathlib.Path(tempfile.mkdtemp(prefix='replay-bench-'))
  try:
    print(f'writing {count} synthetic episodes of {length} steps '
          f'({count * replay.episode_steps(length, repeat):,} env steps)...',
          file=sys.stderr)
    rng = np.random.default_rng(0)
    for _ in range(count):
      replay.save_episode(folder, dict(
          # One random row per frame: realistic sizes, quick to compress.
          image=np.broadcast_to(rng.integers(0, 256, (length, 1, 64, 3),
                                             dtype=np.uint8),
                                (length, 64, 64, 3)).copy(),
          action=np.zeros((length, 6), np.float32),
          reward=np.zeros(length, np.float32),
          discount=np.ones(length, np.float32)))
    rows = []
    for bound in (0, args.replay_size):
      command = [sys.executable, '-m', 'dreamer_tf.bench', '--child_replay',
                 str(folder), '--replay_size', str(bound)]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode != 0:
        sys.exit(f'bench: replay failed:\n{result.stderr[-2000:]}')
      rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  print(f'{"replay_size":>12}  {"episodes held":>13}  {"peak RSS MB":>11}')
  for row in rows:
    print(f'{row["replay_size"] or "all":>12}  {row["episodes"]:>13}  '
          f'{row["peak_rss_mb"]:>11}')
  if args.json:
    print(json.dumps(dict(stored=args.stored, rows=rows)))


def replay_child(folder, bound):
  from dreamer_tf import replay
  cache = {}
  windows = replay.sample_windows(
      folder, 50, seed=0, cache=cache,
      capacity=replay.agent_steps(bound, 2))
  for _ in range(100):
    next(windows)
  held = sum(episode is not None for episode in cache.values())
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(replay_size=bound, episodes=held, peak_rss_mb=round(peak_mb))


def run_child(precision, args, strategy='default'):
  command = [sys.executable, '-m', 'dreamer_tf.bench', '--child',
             str(precision),
             '--batch_size', str(args.batch_size), '--batch_length',
             str(args.batch_length), '--steps', str(args.steps),
             '--strategy', strategy, '--devices', args.devices]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    sys.exit(f'bench: precision {precision} failed:\n{result.stderr[-2000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=50)
  parser.add_argument('--batch_length', type=int, default=50)
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--precision', choices=['32', '16', 'both'],
                      default='both')
  parser.add_argument('--json', action='store_true')
  parser.add_argument('--strategy', default='default',
                      help='comma-separated: default, mirrored')
  parser.add_argument('--devices', default='',
                      help='devices of mirrored, e.g. CPU:0,CPU:1')
  parser.add_argument('--rounds', type=int, default=1,
                      help='times each variant runs, interleaved')
  parser.add_argument('--child', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--collect', action='store_true',
                      help='measure environment steps per second instead')
  parser.add_argument('--task', default='dmc_walker_walk')
  parser.add_argument('--envs', type=int, default=1)
  parser.add_argument('--parallel', choices=['none', 'process'], default='none')
  parser.add_argument('--agent_steps', type=int, default=300)
  parser.add_argument('--replay', action='store_true',
                      help='measure the replay memory with and without a '
                      'bound instead')
  parser.add_argument('--stored', type=int, default=int(1e6),
                      help='environment steps stored (--replay)')
  parser.add_argument('--replay_size', type=int, default=int(2e5),
                      help='the bound to compare with none (--replay)')
  parser.add_argument('--child_replay', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child_replay:
    print(json.dumps(replay_child(args.child_replay, args.replay_size)))
    return
  if args.replay:
    return measure_replay(args)
  if args.collect:
    return measure_collection(args)
  if args.steps < 1:
    parser.error('--steps must be at least 1')
  if args.child:
    row = measure(args.child, args.batch_size, args.batch_length, args.steps,
                  args.strategy, args.devices)
    print(json.dumps(row))
    return
  strategies = [s.strip() for s in args.strategy.split(',')]
  for strategy in strategies:
    if strategy not in ('default', 'mirrored'):
      parser.error(f'--strategy {strategy!r}: use default or mirrored')
  precisions = [32, 16] if args.precision == 'both' else [int(args.precision)]
  rows = []
  for round_ in range(args.rounds):
    for precision in precisions:
      for strategy in strategies:
        print(f'round {round_ + 1}/{args.rounds}: precision {precision}, '
              f'{strategy} ({args.batch_size}x{args.batch_length}, '
              f'{args.steps} timed steps)...', file=sys.stderr)
        rows.append(run_child(precision, args, strategy))
  params = rows[0].pop('params')
  for row in rows[1:]:
    row.pop('params')
  print(f'parameters: model {params["model"]:,}  actor {params["actor"]:,}  '
        f'value {params["value"]:,}')
  print(f'batch {args.batch_size} x {args.batch_length}, median of '
        f'{args.steps} steps')
  header = ('precision', 'policy', 'strategy', 'first step s',
            'step s (median)', 'peak RSS MB')
  print('  '.join(f'{h:>15}' for h in header))
  for row in rows:
    strategy = row['strategy'] + (
        f' x{row["replicas"]}' if row['replicas'] > 1 else '')
    cells = (row['precision'], row['policy'], strategy, row['first_step_s'],
             row['step_s_median'], row['peak_rss_mb'])
    print('  '.join(f'{c:>15}' for c in cells))
  if args.json:
    print(json.dumps(dict(params=params, rows=rows)))


if __name__ == '__main__':
  main()
