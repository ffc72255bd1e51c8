"""Returns of simple policies through the same wrappers as training.

  python -m dreamer_tf.baseline --task dmc_cartpole_balance --episodes 10

A learned policy must beat these: `random` (uniform actions) and `zero` (the
do-nothing action: all zeros, or the first action of a discrete space). Runs
the environments in a worker process like training does; imports no
TensorFlow. Prints one line per policy and, with --json, a JSON object last.
"""

import argparse
import functools
import json
import sys

import numpy as np

import wrappers


def policy_returns(task, policy, episodes, action_repeat=2, time_limit=1000,
                   seed=0):
  """Returns of `episodes` evaluation episodes of `policy` on `task`."""
  ctor = functools.partial(wrappers.make_env, task, action_repeat=action_repeat,
                           time_limit=time_limit, seed=seed, train=False)
  rng = np.random.default_rng(seed)
  returns = []
  with wrappers.Envs([ctor], 'none') as envs:
    space = envs.action_space
    for _ in range(episodes):
      envs.reset(0)
      total, done = 0.0, False
      while not done:
        if policy == 'random':
          action = wrappers.random_action(space, rng)
        elif getattr(space, 'discrete', False):
          action = np.eye(space.shape[0], dtype=np.float32)[0]
        else:
          action = np.zeros(space.shape, np.float32)
        _, reward, done, _ = envs.step([action])[0]
        total += reward
      returns.append(total)
  return returns


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--task', default='dmc_cartpole_balance')
  parser.add_argument('--episodes', type=int, default=10)
  parser.add_argument('--policies', default='random,zero')
  parser.add_argument('--action_repeat', type=int, default=2)
  parser.add_argument('--time_limit', type=int, default=1000)
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
    returns = policy_returns(args.task, policy, args.episodes,
                             args.action_repeat, args.time_limit, args.seed)
    result[policy] = dict(returns=returns, mean=float(np.mean(returns)),
                          std=float(np.std(returns)))
    print(f'{args.task} {policy}: {np.mean(returns):.1f} +- '
          f'{np.std(returns):.1f} over {len(returns)} episodes '
          f'(min {min(returns):.1f}, max {max(returns):.1f})', flush=True)
  if args.json:
    print(json.dumps(dict(task=args.task, **result)))


if __name__ == '__main__':
  main()
