"""The other workers of --strategy multi_worker: they take each train step
with the chief and write nothing (docs/design.md section 10)."""

import re
import sys

import wrappers
from dreamer_tf import distribute, replay
from dreamer_tf.faults import non_finite


def follow(config, strategy):
  """A worker of --strategy multi_worker other than the chief: takes each
  train step with the chief, on its share of the batch sampled from the
  shared <logdir>/episodes, until the chief says the run is over. It writes
  nothing. Returns the exit status (3 when the losses became non-finite
  with --on_nan stop, as on the chief)."""
  from dreamer_tf import agent as agent_lib
  probe = wrappers.make_envs(config, train=False)  # Only for the spaces.
  spec, act_dim = replay.episode_spec(probe), probe.action_space.shape[0]
  probe.close()
  agent = agent_lib.Dreamer(config, act_dim, strategy=strategy)
  team = distribute.Team(strategy)
  team.share_weights(agent.variables())
  print(f'Worker {distribute.worker_index(strategy)}: following the chief.')
  import tensorflow as tf
  dataset, status = None, 0
  try:
    for _ in team.orders():
      dataset = dataset or iter(
          distribute.worker_dataset(config, spec, strategy)())
      metrics = agent.train(next(dataset))
      bad = non_finite(metrics)
      if bad and config.on_nan == 'stop':
        print(f'Stopped: {", ".join(bad)} not finite, as on the chief.')
        status = 3
        break
  except tf.errors.UnavailableError as error:
    found = re.search(r'aborted by: (.+)|grpc_message:"([^"]+)"',
                      error.message)
    reason = next((g for g in found.groups() if g), '') if found else ''
    reason = reason.strip()[:200] or type(error).__name__
    print(f'dreamer.py: error: lost the other workers ({reason}). Start '
          'every worker again to resume from the chief\'s last checkpoint.',
          file=sys.stderr)
    return 1
  print(f'Worker {distribute.worker_index(strategy)}: {agent.updates} '
        'updates; weights fingerprint '
        f'{distribute.fingerprint(agent.weights())}.')
  return status
