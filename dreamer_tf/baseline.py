"""Returns of simple policies through the same wrappers as training.

  python -m dreamer_tf.baseline --task dmc_cartpole_balance --episodes 10
  python -m dreamer_tf.baseline --task atari_pong --episodes 10

A learned policy must beat these: `random` (uniform actions) and `zero` (the
do-nothing action: all zeros, or the first action of a discrete space, which
is NOOP on Atari). The episodes are evaluation episodes of a run on the task,
with its defaults (dreamer.py's, and for atari_<game> its Atari defaults:
action repeat 4, sticky actions, whole games capped at 108,000 frames, a lost
life does not end them). Runs the environments in a worker process like
training does; imports no TensorFlow. Prints one line per policy and, with
--json, a JSON object last.
"""

import argparse
import functools
import json
import sys

import numpy as np

import wrappers


def task_defaults(task):
  """The action repeat and the episode cap (frames) of a run on `task`:
  dreamer.py's defaults, with its Atari defaults for atari_<game>."""
  import dreamer
  config = vars(dreamer.define_config())
  if task.startswith('atari_'):
    config.update(dreamer.ATARI_DEFAULTS)
  return config['action_repeat'], config['time_limit']


def policy_episodes(task, policy, episodes, action_repeat=None,
                    time_limit=None, seed=0):
  """(return, frames, capped) of `episodes` evaluation episodes of `policy`
  on `task`; `capped` says that the episode cap ended it. `action_repeat`
  and `time_limit` default to those of a run on the task."""
  repeat, limit = task_defaults(task)
  repeat = repeat if action_repeat is None else action_repeat
  limit = limit if time_limit is None else time_limit
  ctor = functools.partial(wrappers.make_env, task, action_repeat=repeat,
                           time_limit=limit, seed=seed, train=False)
  rng = np.random.default_rng(seed)
  results = []
  with wrappers.Envs([ctor], 'none') as envs:
    space = envs.action_space
    for _ in range(episodes):
      envs.reset(0)
      total, steps, done = 0.0, 0, False
      while not done:
        if policy == 'random':
          action = wrappers.random_action(space, rng)
        elif getattr(space, 'discrete', False):
          action = np.eye(space.shape[0], dtype=np.float32)[0]
        else:
          action = np.zeros(space.shape, np.float32)
        _, reward, done, info = envs.step([action])[0]
        total += reward
        steps += 1
      results.append((total, steps * repeat, bool(info.get('time_limit'))))
  return results


def policy_returns(task, policy, episodes, action_repeat=None,
                   time_limit=None, seed=0):
  """Returns of `episodes` evaluation episodes of `policy` on `task`."""
  return [total for total, _, _ in policy_episodes(
      task, policy, episodes, action_repeat, time_limit, seed)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', default='dmc_cartpole_balance')
  parser.add_argument('--episodes', type=int, default=10)
  parser.add_argument('--policies', default='random,zero')
  parser.add_argument('--action_repeat', type=int, default=None,
                      help="the task's default: DMC 2, Atari 4")
  parser.add_argument('--time_limit', type=int, default=None,
                      help="the task's default: DMC 1000, Atari 108000")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args(argv)
  try:
    wrappers.check_task(args.task)
  except ValueError as error:
    sys.exit(f'baseline: error: {error}')
  result = {}
  for policy in args.policies.split(','):
    if policy not in ('random', 'zero'):
      sys.exit(f'baseline: error: unknown policy {policy!r}: random or zero.')
    played = policy_episodes(args.task, policy, args.episodes,
                             args.action_repeat, args.time_limit, args.seed)
    returns = [total for total, _, _ in played]
    frames = [length for _, length, _ in played]
    capped = sum(cut for _, _, cut in played)
    result[policy] = dict(returns=returns, mean=float(np.mean(returns)),
                          std=float(np.std(returns)), frames=frames,
                          capped=capped)
    name = 'zero (NOOP)' if args.task.startswith('atari_') and \
        policy == 'zero' else policy
    print(f'{args.task} {name}: {np.mean(returns):.1f} +- '
          f'{np.std(returns):.1f} over {len(returns)} episodes '
          f'(min {min(returns):.1f}, max {max(returns):.1f}; '
          f'{np.mean(frames):.0f} frames on average, {capped} ended by the '
          'cap)', flush=True)
  if args.json:
    print(json.dumps(dict(task=args.task, **result)))


if __name__ == '__main__':
  main()
