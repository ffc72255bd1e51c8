"""The other workers of --strategy multi_worker: they take each train step
with the chief and write nothing (docs/design.md section 10)."""

import pathlib
import sys

import wrappers
from dreamer_tf import distribute, hardware, interrupts, replay
from dreamer_tf.faults import non_finite


def start(config):
  """The whole process of a worker other than the chief: TensorFlow, its
  devices and seeds, then `follow`. Returns the exit status."""
  strategy, devices = hardware.start(config, config.strategy)
  interrupts.check()  # A Ctrl-C while TensorFlow loaded.
  print(devices)
  return follow(config, strategy)


def follow(config, strategy):
  """A worker of --strategy multi_worker other than the chief: takes each
  train step with the chief, on its share of the batch sampled from the
  shared <logdir>/episodes, until the chief says the run is over. It writes
  nothing. Returns the exit status (3 when the losses became non-finite
  with --on_nan stop, as on the chief; 1, after one line, when a worker
  was lost or no episodes came)."""
  from dreamer_tf import agent as agent_lib
  probe = wrappers.make_envs(config, train=False)  # Only for the spaces.
  spec, act_dim = replay.episode_spec(probe), probe.action_space.shape[0]
  probe.close()
  agent = agent_lib.Dreamer(config, act_dim, strategy=strategy)
  team = distribute.Team(strategy)
  index = distribute.worker_index(strategy)
  dataset, status = None, 0
  try:
    team.share_weights(agent.variables())
    print(f'Worker {index}: following the chief.')
    # A signal of its own (Slurm signals every process of a job) waits for
    # the chief's order to stop: leaving between an order and its step
    # would break the step the chief takes. Ctrl-C twice stops it at once.
    for _ in team.orders():
      if dataset is None:
        dataset = _dataset(config, spec, strategy)
        if dataset is None:
          return 1
      with team.together('a train step'):
        metrics = agent.train(next(dataset))
      bad = non_finite(metrics)
      if bad and config.on_nan == 'stop':
        print(f'Stopped: {", ".join(bad)} not finite, as on the chief.')
        status = 3
        break
  except distribute.WorkerLost as error:
    print(f'dreamer.py: error: {error}', file=sys.stderr)
    return 1
  print(f'Worker {index}: {agent.updates} updates; weights fingerprint '
        f'{distribute.fingerprint(agent.weights())}.')
  return status


def _dataset(config, spec, strategy):
  """An iterator over this worker's batches, or None after one line when
  no episode comes (replay's RuntimeError): most likely, this worker's
  --logdir is not the folder the chief writes its episodes to."""
  try:
    return iter(distribute.worker_dataset(config, spec, strategy)())
  except RuntimeError as error:
    logdir = pathlib.Path(config.logdir).expanduser()
    print(f'dreamer.py: error: {error} Worker '
          f'{distribute.worker_index(strategy)} reads the chief\'s episodes '
          f'from {logdir / "episodes"}: start every worker with the chief\'s '
          '--logdir on a shared filesystem.', file=sys.stderr)
    return None
