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
import signal
import statistics
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

ACT_DIM = 6


# Flags of dreamer.py that the benchmark sets from its own flags: a variant
# setting them would change nothing.
OWN_FLAGS = dict(precision='--precision', batch_size='--batch_size',
                 batch_length='--batch_length', strategy='--strategy',
                 devices='--devices')


def parse_settings(settings):
  """'key=value,key=value' (flags of dreamer.py) -> {key: value}, each value
  parsed as dreamer.py parses that flag (false, 0 and no are False). Items
  'env:NAME=VALUE' are environment variables, set by `run_json`, and left
  out. Raises ValueError, one line naming the item and the fix."""
  import difflib

  from dreamer_tf import flags
  values, defaults = {}, None
  for item in filter(None, settings.split(',')):
    key, equals, text = item.partition('=')
    if item.startswith('env:'):
      if not equals or key == 'env:':
        raise ValueError(f'--variants: {item!r} is not env:NAME=VALUE.')
      continue
    if not equals:
      raise ValueError(f'--variants: {item!r} is not flag=value (e.g. '
                       'save_memory=true).')
    if key in OWN_FLAGS:
      raise ValueError(f'--variants: {key} is set by the benchmark: use '
                       f'its {OWN_FLAGS[key]} instead.')
    if defaults is None:
      import dreamer
      defaults = vars(dreamer.define_config())
    if key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1)
      hint = f'did you mean {close[0]}? ' if close else ''
      raise ValueError(f'--variants: {key} is not a flag of dreamer.py '
                       f'({hint}python dreamer.py --help lists them).')
    try:
      values[key] = flags.args_type(defaults[key])(text)
    except ValueError:
      raise ValueError(f'--variants: {item} is not '
                       f'{_kind(defaults[key])}.') from None
  return values


def _kind(default):
  if isinstance(default, bool):
    return 'a boolean (true/false)'
  if isinstance(default, int):
    return 'an integer'
  return 'a number'  # Text flags take any value.


def apply_settings(config, settings):
  """The flags of `settings` (see parse_settings) set on `config`."""
  for key, value in parse_settings(settings).items():
    setattr(config, key, value)
  return config


def measure(precision, batch_size, batch_length, steps, strategy='default',
            devices='', settings=''):
  """Runs in the child process: returns the row for one precision."""
  import numpy as np

  import dreamer_tf
  from dreamer_tf import distribute
  dreamer_tf.quiet_tensorflow()
  strategy_object = distribute.make_strategy(strategy, devices)

  import dreamer
  from dreamer_tf.agent import Dreamer

  config = apply_settings(dreamer.define_config(), settings)
  config.precision = precision
  agent = Dreamer(config, ACT_DIM, strategy=strategy_object)
  data = random_batch(batch_size, batch_length)
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
      settings=settings,
      replicas=distribute.replicas(strategy_object),
      first_step_s=round(first, 2),
      step_s_median=round(float(np.median(times)), 3),
      step_s_all=[round(t, 3) for t in times], peak_rss_mb=round(peak_mb),
      params=agent.param_counts())


def random_batch(batch_size, batch_length):
  """A training batch of the default task's shapes, from a fixed seed."""
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(0)
  shape = (batch_size, batch_length)
  return dict(
      image=tf.constant(rng.integers(0, 256, shape + (64, 64, 3)), tf.uint8),
      action=tf.constant(rng.uniform(-1, 1, shape + (ACT_DIM,)), tf.float32),
      reward=tf.constant(rng.normal(size=shape), tf.float32),
      discount=tf.ones(shape, tf.float32))


def timed(fn, steps):
  """Median seconds of `fn()` after one warm-up call (which traces)."""
  import numpy as np
  _sync(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    _sync(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _sync(result):
  import tensorflow as tf
  for leaf in tf.nest.flatten(result):
    if hasattr(leaf, 'numpy'):
      leaf.numpy()


def profile(precision, batch_size, batch_length, steps, settings=''):
  """Runs in the child process: the train step cut into its phases, each
  a tf.function of its own, timed forward and forward + backward on the
  inputs the real step gives it (the backward time is the difference).
  Returns the rows, the whole step's median and the share of the cores
  busy during whole steps (process CPU time / wall time / cores)."""
  import numpy as np

  import dreamer_tf
  dreamer_tf.quiet_tensorflow()
  import tensorflow as tf

  import dreamer
  import tools
  from dreamer_tf.agent import Dreamer

  config = apply_settings(dreamer.define_config(), settings)
  config.precision = precision
  agent = Dreamer(config, ACT_DIM)
  data = agent.preprocess(random_batch(batch_size, batch_length))
  dyn = agent.dynamics
  # The real step's intermediate values, as fixed inputs of the phases.
  embed = agent.encoder(data['image'])
  post, prior = dyn.observe(embed, data['action'])
  feat = dyn.get_feat(post)
  imag_feat = agent.imagine_ahead(post)
  cotangent = lambda x: tf.random.stateless_normal(tf.shape(x), [0, 1])
  def backward(variables, inputs, forward):
    """fn() -> forward, and fn() -> gradients of the forward's output
    (with a fixed random cotangent if it is not a scalar) to `variables`
    and `inputs`."""
    def both():
      with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = forward()
      seed = None if out.shape.rank == 0 else cotangent(out)
      return tape.gradient(out, variables + inputs, output_gradients=seed)
    return tools.graph(forward), tools.graph(both)
  model_vars = lambda *parts: [v for p in parts for v in p.trainable_variables]
  def kl():
    return tf.reduce_mean(tfp_kl(dyn.get_dist(post), dyn.get_dist(prior)))
  def behaviour():
    actor_loss, value_loss = agent.behavior_losses(imag_feat)
    return actor_loss + value_loss
  phases = [
      ('encoder', backward(model_vars(agent.encoder), [],
                           lambda: agent.encoder(data['image']))),
      (f'RSSM observe ({batch_length} steps)', backward(
          model_vars(dyn), [embed],
          lambda: dyn.get_feat(dyn.observe(embed, data['action'])[0]))),
      ('decoder + image log-lik', backward(
          model_vars(agent.decoder), [feat],
          lambda: tf.reduce_mean(agent.decoder(feat).log_prob(
              data['image'])))),
      ('reward head', backward(
          model_vars(agent.reward), [feat],
          lambda: tf.reduce_mean(agent.reward(feat).log_prob(
              data['reward'])))),
      ('KL', backward([], [post['mean'], post['std'], prior['mean'],
                           prior['std']], kl)),
      (f'imagination ({config.horizon} steps)', backward(
          model_vars(agent.actor, dyn), [],
          lambda: agent.imagine_ahead(post))),
      ('behaviour losses', backward(
          model_vars(agent.actor, agent.value, agent.reward), [imag_feat],
          behaviour)),
  ]
  rows = []
  for name, (forward, both) in phases:
    fwd = timed(forward, steps)
    total = timed(both, steps)
    rows.append(dict(phase=name, forward_s=fwd, backward_s=total - fwd,
                     total_s=total))
  for opt in (agent.model_opt, agent.actor_opt, agent.value_opt):
    grads = [tf.zeros_like(v) for v in opt.variables]
    apply = tools.graph(lambda opt=opt, grads=grads: opt.update(grads))
    rows.append(dict(phase=f'{opt.name} optimizer (clip, Adam)',
                     forward_s=0.0, backward_s=0.0,
                     total_s=timed(apply, steps)))
  batch = random_batch(batch_size, batch_length)
  step = lambda: agent.train(batch)['model_loss']
  _sync(step())
  cpu, times = 0.0, []
  for _ in range(steps):
    cpu_start, start = time.process_time(), time.perf_counter()
    _sync(step())
    times.append(time.perf_counter() - start)
    cpu += time.process_time() - cpu_start
  wall = sum(times)
  whole = float(np.median(times))
  return dict(precision=precision, policy=agent.policy, rows=rows,
              settings=settings,
              whole_s=whole, busy=cpu / wall / (os.cpu_count() or 1))


def tfp_kl(a, b):
  import tensorflow_probability as tfp
  return tfp.distributions.kl_divergence(a, b)


def print_profile(result, batch_size, batch_length):
  whole = result['whole_s']
  parts = sum(r['total_s'] for r in result['rows'])
  settings = f', {result["settings"]}' if result.get('settings') else ''
  print(f'precision {result["precision"]} ({result["policy"]}{settings}), '
        f'batch {batch_size} x {batch_length}: whole train step {whole:.3f} '
        f's (median), cores busy {100 * result["busy"]:.0f} %')
  print(f'{"phase":<34}{"forward s":>10}{"backward s":>11}{"total s":>9}'
        f'{"share":>7}')
  for row in result['rows']:
    print(f'{row["phase"]:<34}{row["forward_s"]:>10.3f}'
          f'{row["backward_s"]:>11.3f}{row["total_s"]:>9.3f}'
          f'{100 * row["total_s"] / whole:>6.0f}%')
  print(f'{"sum of the phases":<34}{"":>10}{"":>11}{parts:>9.3f}'
        f'{100 * parts / whole:>6.0f}%')


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
  envs = wrappers.make_envs(config, train=True)
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
      rows.append(run_json(['--child_replay', str(folder), '--replay_size',
                            str(bound)], 'replay'))
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


def size_flags(args):
  return ['--batch_size', str(args.batch_size), '--batch_length',
          str(args.batch_length), '--steps', str(args.steps)]


def run_json(flags, what, cwd=None, settings=''):
  """Runs `python -m dreamer_tf.bench FLAGS` (in `cwd`, another checkout;
  with the 'env:NAME=VALUE' items of `settings` in its environment) and
  returns the JSON object of its last line."""
  env = dict(os.environ)
  for item in settings.split(','):
    if item.startswith('env:'):
      name, _, value = item[4:].partition('=')
      env[name] = value
  result = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.bench', *flags], cwd=cwd,
      capture_output=True, text=True, env=env)
  if result.returncode != 0:
    sys.exit(f'bench: {what} failed:\n{result.stderr[-2000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def run_child(precision, args, strategy='default', settings=''):
  flags = ['--child', str(precision), *size_flags(args)]
  if strategy != 'default':
    flags += ['--strategy', strategy, '--devices', args.devices]
  if settings:
    flags += ['--settings', settings]
  return run_json(flags, f'precision {precision} ({strategy} {settings})',
                  settings=settings)


def compare(args, precisions):
  """This checkout against `--against` (checked out into a temporary git
  worktree), interleaved: new, old, new, old, ... for each precision.
  Prints every run and the ratio new / old of the medians over rounds."""
  import shutil
  import tempfile
  root = pathlib.Path(__file__).resolve().parents[1]
  commit = subprocess.run(
      ['git', 'rev-parse', '--short', args.against], cwd=root,
      capture_output=True, text=True)
  if commit.returncode != 0:
    sys.exit(f'bench: --against {args.against!r} is not a commit of '
             f'{root}: {commit.stderr.strip()}')
  commit = commit.stdout.strip()
  worktree = pathlib.Path(tempfile.mkdtemp(prefix='bench-against-'))
  rows = []
  try:
    subprocess.run(['git', 'worktree', 'add', '--detach', str(worktree),
                    commit], cwd=root, check=True, capture_output=True)
    for round_ in range(args.rounds):
      for precision in precisions:
        for label, cwd in (('new', root), ('old', worktree)):
          print(f'round {round_ + 1}/{args.rounds}: precision {precision}, '
                f'{label}...', file=sys.stderr)
          row = run_json(['--child', str(precision), *size_flags(args)],
                         f'{label} precision {precision}', cwd=cwd)
          rows.append(dict(row, version=label, round=round_ + 1))
  finally:
    # Also when stopped while git was still adding it (then it is locked).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.run(['git', 'worktree', 'remove', '--force', '--force',
                    str(worktree)], cwd=root, capture_output=True)
    shutil.rmtree(worktree, ignore_errors=True)
  print(f'this checkout (new) against {commit} (old), batch '
        f'{args.batch_size} x {args.batch_length}, median of {args.steps} '
        f'steps per run, {args.rounds} round(s) interleaved')
  header = ('precision', 'version', 'round', 'first step s',
            'step s (median)', 'peak RSS MB')
  print('  '.join(f'{h:>15}' for h in header))
  for row in rows:
    cells = (row['precision'], row['version'], row['round'],
             row['first_step_s'], row['step_s_median'], row['peak_rss_mb'])
    print('  '.join(f'{c:>15}' for c in cells))
  median = lambda p, v, k: statistics.median(
      r[k] for r in rows if r['precision'] == p and r['version'] == v)
  ratio = lambda p, k: median(p, 'new', k) / median(p, 'old', k)
  for precision in precisions:
    ratios = ', '.join(
        f'{name} {ratio(precision, key):.3f}' for name, key in (
            ('step', 'step_s_median'), ('first step', 'first_step_s'),
            ('peak RSS', 'peak_rss_mb')))
    print(f'precision {precision}: new / old = {ratios}')
  if args.json:
    print(json.dumps(dict(against=commit, rows=rows)))


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
  parser.add_argument('--profile', action='store_true',
                      help='time each phase of the train step instead')
  parser.add_argument('--against', metavar='GIT_REF',
                      help='compare with this commit, interleaved, '
                      '--rounds times')
  parser.add_argument('--variants', nargs='+', default=[''],
                      help='flag settings to compare, interleaved, e.g. '
                      '--variants scan=unrolled scan=loop; env:NAME=VALUE '
                      'sets an environment variable')
  parser.add_argument('--settings', default='', help=argparse.SUPPRESS)
  parser.add_argument('--child', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--child_profile', type=int, help=argparse.SUPPRESS)
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
  # A SIGTERM (a scheduler, `timeout`, kill) ends every mode as Ctrl-C does:
  # `finally` blocks run, so a running child benchmark is stopped, --against
  # removes its worktree and --collect closes its environments.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  try:  # Every variant is checked before the first benchmark starts.
    for settings in args.variants:
      parse_settings(settings)
  except ValueError as error:
    sys.exit(f'bench: {error}')
  if args.child_replay:
    print(json.dumps(replay_child(args.child_replay, args.replay_size)))
    return
  if args.replay:
    return measure_replay(args)
  if args.collect:
    return measure_collection(args)
  if args.steps < 1:
    parser.error('--steps must be at least 1')
  if args.child_profile:
    print(json.dumps(profile(args.child_profile, args.batch_size,
                             args.batch_length, args.steps, args.settings)))
    return
  precisions = [32, 16] if args.precision == 'both' else [int(args.precision)]
  if args.profile:
    for precision in precisions:
      for settings in args.variants:
        result = run_json(
            ['--child_profile', str(precision), *size_flags(args),
             '--settings', settings],
            f'profile of precision {precision}', settings=settings)
        print_profile(result, args.batch_size, args.batch_length)
      if args.json:
        print(json.dumps(result))
    return
  if args.against:
    return compare(args, precisions)
  if args.child:
    row = measure(args.child, args.batch_size, args.batch_length, args.steps,
                  args.strategy, args.devices, args.settings)
    print(json.dumps(row))
    return
  strategies = [s.strip() for s in args.strategy.split(',')]
  for strategy in strategies:
    if strategy not in ('default', 'mirrored'):
      parser.error(f'--strategy {strategy!r}: use default or mirrored')
  rows = []
  for round_ in range(args.rounds):
    for precision in precisions:
      for strategy in strategies:
        for settings in args.variants:
          print(f'round {round_ + 1}/{args.rounds}: precision {precision}, '
                f'{strategy} {settings} ({args.batch_size}x'
                f'{args.batch_length}, {args.steps} timed steps)...',
                file=sys.stderr)
          rows.append(run_child(precision, args, strategy, settings))
  params = rows[0].pop('params')
  for row in rows[1:]:
    row.pop('params')
  print(f'parameters: model {params["model"]:,}  actor {params["actor"]:,}  '
        f'value {params["value"]:,}')
  print(f'batch {args.batch_size} x {args.batch_length}, median of '
        f'{args.steps} steps')
  header = ('precision', 'policy', 'variant', 'first step s',
            'step s (median)', 'peak RSS MB')
  print('  '.join(f'{h:>15}' for h in header))
  for row in rows:
    variant = row['strategy'] + (
        f' x{row["replicas"]}' if row['replicas'] > 1 else '') + (
        f' {row["settings"]}' if row['settings'] else '')
    cells = (row['precision'], row['policy'], variant, row['first_step_s'],
             row['step_s_median'], row['peak_rss_mb'])
    print('  '.join(f'{c:>15}' for c in cells))
  if args.json:
    print(json.dumps(dict(params=params, rows=rows)))


if __name__ == '__main__':
  main()
