"""Training on several devices and hosts with tf.distribute
(docs/design.md section 10).

--strategy default trains on one device with no strategy at all: the code
path of the reference's single-device numbers. mirrored is
tf.distribute.MirroredStrategy over the visible GPUs (or --devices);
multi_worker is tf.distribute.MultiWorkerMirroredStrategy over the hosts of
the TF_CONFIG variable. In both, each replica takes an equal share of the
global batch (--batch_size), the gradients are summed across replicas before
clipping (tools.Optimizer), and every replica applies the same update.

With multi_worker, worker 0 (the chief) collects, evaluates, logs and saves;
the other workers only train. They read the chief's episodes from the shared
--logdir and sample their own share of each batch. The chief tells them when
to train and when to stop through a collective (`Team`), and gives them its
weights after a resume. At start, every worker checks through a collective
that its --logdir is the chief's (`check_logdir`); a worker lost during a
collective ends the others' collectives in one line naming it
(`WorkerLost`).
"""

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import re
import secrets
import signal
import sys
import threading
import time

import numpy as np

# TensorFlow is imported where it is used: dreamer.check_config reads the
# flags with parse_devices and read_tf_config before TensorFlow loads.

STRATEGIES = ('default', 'mirrored', 'multi_worker')
DEVICE = re.compile(r'^(CPU|GPU):(\d+)$', re.IGNORECASE)
# How TensorFlow names a worker in its errors, e.g. /job:worker/replica:0/
# task:1 or /job:worker/task:1.
TASK = re.compile(r'/job:worker(?:/replica:\d+)?/task:(\d+)')
# The chief writes a new token into this file of its --logdir at every
# start; each other worker must find it in its own --logdir (check_logdir).
TOKEN_FILE = 'chief_token'


def parse_devices(devices):
  """'GPU:0,GPU:1' -> [('GPU', 0), ('GPU', 1)]; ValueError naming a bad
  entry. Needs no TensorFlow (dreamer.check_config uses it)."""
  parsed = []
  for name in (d.strip() for d in devices.split(',') if d.strip()):
    match = DEVICE.match(name)
    if not match:
      raise ValueError(
          f'--devices {devices!r}: {name!r} is not a device; name them as '
          'GPU:0,GPU:1 (or CPU:0,CPU:1 to split the CPU into logical '
          'devices).')
    parsed.append((match.group(1).upper(), int(match.group(2))))
  if len(set(parsed)) != len(parsed):
    raise ValueError(f'--devices {devices!r} names a device twice.')
  return parsed


def read_tf_config():
  """The TF_CONFIG variable as a dict: cluster.worker (host:port list) and
  task.index. ValueError with the fix when it is missing or malformed."""
  text = os.environ.get('TF_CONFIG')
  example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\'')
  if not text:
    raise ValueError('--strategy multi_worker needs the TF_CONFIG variable '
                     f'on every host ({example}; README, "GPUs").')
  try:
    tf_config = json.loads(text)
    workers = tf_config['cluster']['worker']
    task = tf_config['task']
    index = int(task['index'])
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f'TF_CONFIG cannot be read ({type(error).__name__}: '
                     f'{error}); {example}.') from None
  if set(tf_config['cluster']) != {'worker'} or task.get('type') != 'worker':
    raise ValueError('TF_CONFIG: list every host under cluster.worker and '
                     'give each the task type "worker" (worker 0 is the '
                     f'chief); {example}.')
  if not 0 <= index < len(workers):
    raise ValueError(f'TF_CONFIG: task index {index} is not one of the '
                     f'{len(workers)} workers.')
  return tf_config


def make_strategy(name, devices=''):
  """None for 'default', else the tf.distribute strategy. Call before any
  other TensorFlow work: splitting the CPU into logical devices (--devices
  CPU:0,CPU:1) and MultiWorkerMirroredStrategy must come first."""
  import tensorflow as tf
  if name == 'default':
    return None
  if name == 'multi_worker':
    read_tf_config()
    return tf.distribute.MultiWorkerMirroredStrategy()
  wanted = parse_devices(devices)
  if not wanted:
    gpus = tf.config.list_logical_devices('GPU')
    wanted = [('GPU', i) for i in range(len(gpus))] or [('CPU', 0)]
  cpus = 1 + max([i for kind, i in wanted if kind == 'CPU'], default=0)
  if cpus > 1:
    physical = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        physical, [tf.config.LogicalDeviceConfiguration()] * cpus)
  seen = {kind: len(tf.config.list_logical_devices(kind))
          for kind in ('CPU', 'GPU')}
  for kind, index in wanted:
    if index >= seen[kind]:
      raise ValueError(f'--devices names {kind}:{index}, but TensorFlow sees '
                       f'{seen[kind]} {kind} device(s).')
  return tf.distribute.MirroredStrategy(
      [f'/device:{kind}:{index}' for kind, index in wanted])


def describe(strategy, batch_size):
  """Where training runs, for the start-up line, e.g. 'GPU:0, GPU:1
  (mirrored: 2 replicas, 25 sequences each)'."""
  names = ', '.join(d.split('device:')[-1]
                    for d in strategy.extended.worker_devices)
  count = workers(strategy)
  kind = 'mirrored'
  if count > 1:
    names += f' on each of {count} workers, this is worker ' \
             f'{worker_index(strategy)}'
    kind = 'multi_worker'
  count = replicas(strategy)
  share = batch_size // count
  plural = 's' if count > 1 else ''
  return (f'{names} ({kind}: {count} replica{plural}, {share} '
          'sequences each)')


def workers(strategy):
  """Worker processes taking part (1 without multi_worker)."""
  if strategy is None:
    return 1
  return strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)


def worker_index(strategy):
  if workers(strategy) == 1:
    return 0
  return int(strategy.cluster_resolver.task_id)


def is_chief(strategy):
  """True on the one process that collects, logs and saves."""
  return worker_index(strategy) == 0


def replicas(strategy):
  """Replicas in sync: devices over all workers (1 without a strategy)."""
  return 1 if strategy is None else strategy.num_replicas_in_sync


def worker_dataset(config, spec, strategy=None):
  """`() -> tf.data.Dataset` of this worker's training batches: its share
  of --batch_size (all of it without multi_worker), sampled with a seed of
  its own, from the newest --replay_size steps of <logdir>/episodes."""
  from dreamer_tf import replay
  index = worker_index(strategy)
  return functools.partial(
      replay.make_dataset,
      pathlib.Path(config.logdir).expanduser() / 'episodes',
      config.batch_size // workers(strategy),
      config.batch_length, config.dataset_balance, config.seed + index,
      spec=spec, capacity=replay.agent_steps(
          config.replay_size, config.action_repeat))


def check_batch(replicas, batch_size):
  """ValueError unless each of `replicas` gets the same share of the
  batch."""
  if batch_size % replicas:
    raise ValueError(
        f'--batch_size {batch_size} does not split evenly over {replicas} '
        f'replicas: use a multiple of {replicas}, e.g. '
        f'{batch_size - batch_size % replicas or replicas}.')


class Trainer:
  """Runs a train step `step(data[, noise]) -> {name: scalar}` on every
  replica of `strategy`. Called with this worker's share of the global batch
  (dicts of [B_w, ...] tensors), it gives each local replica a contiguous
  equal slice, and returns the metrics averaged over all replicas."""

  def __init__(self, strategy, step):
    import tools
    self._strategy, self._step = strategy, step
    self._local = len(strategy.extended.worker_devices)
    self._run = tools.graph(self._run_replicas)

  def __call__(self, data, noise=None):
    import tensorflow as tf
    inputs = (data,) if noise is None else (data, noise)
    flat = tf.nest.flatten(inputs)
    if flat[0].shape[0] % self._local:
      raise ValueError(f'A batch of {flat[0].shape[0]} does not split over '
                       f'{self._local} devices.')
    parts = [tf.split(x, self._local) for x in flat]
    def value(context):
      index = context.replica_id_in_sync_group % self._local
      return tf.nest.pack_sequence_as(inputs, [p[index] for p in parts])
    values = self._strategy.experimental_distribute_values_from_function(
        value)
    return self._run(values)

  def _run_replicas(self, inputs):
    import tensorflow as tf
    metrics = self._strategy.run(self._step, args=inputs)
    mean = tf.distribute.ReduceOp.MEAN
    return {k: self._strategy.reduce(mean, v, axis=None)
            for k, v in metrics.items()}


class WorkerLost(ValueError):
  """A worker stopped answering during a collective of the team. The
  message is one line naming it (from TensorFlow's error, when it says)
  and the fix. A ValueError, as dreamer.main prints those in one line when
  this happens at start-up; in the chief's loop faults.crashed saves and
  prints it."""

  def __init__(self, message, lost=()):
    super().__init__(message)
    self.lost = tuple(lost)  # Indices of the lost workers, if known.


def lost_workers(text, own, addresses=()):
  """The indices of the workers that TensorFlow's error `text` names as
  lost, other than `own`: those listed after 'unhealthy' (the coordination
  service's heartbeats), else every worker it names as a task, else those
  whose host:port (`addresses`, as in TF_CONFIG) it quotes."""
  parts = re.split(r'unhealthy', text, maxsplit=1)
  scope = parts[1] if len(parts) == 2 else text
  found = {int(i) for i in TASK.findall(scope)} - {own}
  if not found:
    found = {i for i, address in enumerate(addresses)
             if re.search(rf'\b{re.escape(address)}\b', text)} - {own}
  return sorted(found)


def hosts(strategy):
  """host:port of every worker, as in TF_CONFIG."""
  try:
    return list(strategy.cluster_resolver.cluster_spec().as_dict().get(
        'worker', []))
  except (AttributeError, ValueError):
    return []


def names(indices, addresses):
  """'worker 1 (host:port) and worker 2 (host:port)'; 'a worker' for
  none."""
  return ' and '.join(
      f'worker {i}' + (f' ({addresses[i]})' if i < len(addresses) else '')
      for i in indices) or 'a worker'


def lost_message(lost, own, addresses, during):
  """The one line, on worker `own`, saying that the workers `lost` (indices,
  maybe none known) stopped answering `during` something, and the fix."""
  if own == 0:
    return (f'lost {names(lost, addresses)}, which stopped answering during '
            f'{during}: start every worker again to resume from the last '
            'checkpoint.')
  return (f'lost the other workers ({names(lost, addresses)} stopped '
          f'answering during {during}): start every worker again to resume '
          'from the chief\'s last checkpoint.')


class Team:
  """The workers of a multi_worker run taking train steps together. The
  chief orders each step through a collective (`step`) and the end
  (`stop`); the other workers wait for its orders (`orders`). Collectives
  must be called by every worker in the same order, so the chief holds
  Ctrl-C and SIGTERM while it orders and takes a step, and never orders the
  end after a step that failed halfway (the others wait inside it then).
  When a worker is lost, TensorFlow aborts the collectives of the others
  (Unavailable, Aborted or DeadlineExceeded): every method of the team
  then raises WorkerLost, and no more orders are sent."""

  STOP, STEP = -1, 1
  LOST = ('UnavailableError', 'AbortedError', 'DeadlineExceededError')

  def __init__(self, strategy):
    import tools
    self._strategy = strategy
    self._order = tools.graph(self._replica_order)
    self._sum = tools.graph(self._replica_sum)
    self.index, self.hosts = worker_index(strategy), hosts(strategy)
    # No more orders: sent STOP, all stopped on NaN, or a worker was lost.
    self.stopped = False
    self._halfway = False

  @contextlib.contextmanager
  def together(self, during):
    """Turns the errors of a lost worker inside the block (collectives of
    the team, e.g. a train step) into WorkerLost; `during` says what the
    team was doing, e.g. 'a train step'."""
    import tensorflow as tf
    lost = tuple(getattr(tf.errors, name) for name in self.LOST)
    try:
      yield
    except lost as error:
      self.stopped = True
      which = lost_workers(error.message, self.index, self.hosts)
      raise WorkerLost(lost_message(which, self.index, self.hosts, during),
                       which) from error

  def _replica_order(self, value):
    import tensorflow as tf
    def fn():
      context = tf.distribute.get_replica_context()
      mine = tf.where(context.replica_id_in_sync_group == 0, value, 0)
      return context.all_reduce(tf.distribute.ReduceOp.SUM, mine)
    result = self._strategy.run(fn)
    return self._strategy.experimental_local_results(result)[0]

  def _replica_sum(self, values):
    import tensorflow as tf
    def fn():
      context = tf.distribute.get_replica_context()
      # A tensor of this replica's (the input itself has no device).
      return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                tf.identity(values))
    result = self._strategy.run(fn)
    return self._strategy.experimental_local_results(result)[0]

  def _exchange(self, order=0):
    import tensorflow as tf
    return int(self._order(tf.constant(order, tf.int64)))

  def gather(self, values):
    """The sum over workers of each worker's int64 vector `values` (of the
    same length on every worker; all call it)."""
    import tensorflow as tf
    total = self._sum(tf.constant(values, tf.int64)).numpy()
    # Every local replica of a worker added its values once.
    return total // len(self._strategy.extended.worker_devices)

  def step(self, train, batch):
    """Chief: orders a step and takes it, `train(batch)`."""
    with _signals_held(), self.together('a train step'):
      self._halfway = True
      self._exchange(self.STEP)
      metrics = train(batch)
      self._halfway = False
    return metrics

  def stop(self):
    """Chief: orders the end (once)."""
    if self.stopped:
      return
    self.stopped = True
    if self._halfway:
      print('Warning: a train step failed halfway; the other workers may '
            'wait inside it: stop them.', file=sys.stderr)
      return
    with self.together('the end of the run'):
      self._exchange(self.STOP)

  def orders(self):
    """The other workers: yields once per step the chief takes, until it
    orders the end."""
    while True:
      with self.together('the wait for the chief\'s next order'):
        order = self._exchange()
      if order != self.STEP:
        return
      yield

  def share_weights(self, variables):
    """Every worker's `variables` take the chief's values (all call it)."""
    import tensorflow as tf

    import tools
    variables = list(variables)
    def fn():
      context = tf.distribute.get_replica_context()
      first = context.replica_id_in_sync_group == 0
      values = [tf.where(first, tf.cast(v, tf.float64), 0.0)
                for v in variables]
      return context.all_reduce(tf.distribute.ReduceOp.SUM, values)
    with self.together('the start'):
      results = self._strategy.run(tools.graph(fn))
      local = self._strategy.experimental_local_results
      for var, value in zip(variables, results):
        var.assign(tf.cast(local(value)[0], var.dtype))


def check_logdir(strategy, logdir, wait=10.0):
  """Every worker of a multi_worker run checks that its `logdir` is the
  chief's folder, which the others read the episodes from (call it on
  every worker at start, before any other collective). The chief writes a
  new random token into <logdir>/TOKEN_FILE and sends it to the others
  (a collective); each looks for it in its own --logdir (for up to `wait`
  seconds, in case a shared filesystem shows the new file late), and all
  learn which did not find it (a second collective). Paths are not
  compared: the folder may be mounted at another path on each host.
  Raises rundir.LogdirError, one line with the fix, on every worker when
  one did not find it."""
  from dreamer_tf import rundir
  team = Team(strategy)
  logdir = pathlib.Path(logdir).expanduser()
  path = logdir / TOKEN_FILE
  mine = 0
  if team.index == 0:
    mine = secrets.randbits(62) + 1
    # Written in place (not replaced): a shared filesystem shows the new
    # content of a file it already knows when the reader opens it.
    try:
      path.write_text(f'{mine:x}\n')
    except OSError as error:  # The others learn it as a lost worker.
      raise rundir.LogdirError(
          f'cannot write {path}: {error.strerror}.') from None
  with team.together('the check of --logdir'):
    token = team._exchange(mine)
    problem = None if team.index == 0 else _find_token(path, token, wait)
    flags = [0] * workers(strategy)
    flags[team.index] = int(problem is not None)
    missing = [i for i, bad in enumerate(team.gather(flags)) if bad]
  if not missing:
    return
  fix = ('start every worker with the chief\'s --logdir on a shared '
         'filesystem.')
  if problem:
    raise rundir.LogdirError(
        f'worker {team.index}\'s --logdir {logdir} is not the chief\'s '
        f'({problem}): {fix}')
  chief = f' {logdir}' if team.index == 0 else ''
  plural = len(missing) > 1
  raise rundir.LogdirError(
      f'the --logdir{"s" if plural else ""} of '
      f'{names(missing, team.hosts)} {"are" if plural else "is"} not the '
      f'chief\'s{chief} ({"they" if plural else "it"} did not find the '
      f'token the chief wrote to {TOKEN_FILE} at this start): {fix}')


def _find_token(path, token, wait, poll=0.5):
  """None when `path` holds `token` (within `wait` seconds), else what
  was found instead."""
  deadline = time.monotonic() + wait
  while True:
    try:
      if int(path.read_text().strip() or '0', 16) == token:
        return None
      problem = f'its {TOKEN_FILE} is from another start of the chief'
    except FileNotFoundError:
      problem = f'it holds no {TOKEN_FILE}'
      if not path.parent.is_dir():
        problem = 'no such folder'
    except (OSError, ValueError) as error:
      problem = f'{TOKEN_FILE} cannot be read: {error}'
    if time.monotonic() >= deadline:
      return problem
    time.sleep(poll)


@contextlib.contextmanager
def _signals_held():
  """Ctrl-C and SIGTERM (even a second Ctrl-C) wait until the block is
  done, then go to the handlers before it: dreamer_tf.interrupts records
  them for the loop's next safe point (main thread only)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  hold = lambda signum, frame: received.append(signum)
  previous = {s: signal.signal(s, hold)
              for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    for signum in received:
      handler = previous[signum]
      if callable(handler):
        handler(signum, None)
      elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt


def fingerprint(variables):
  """A short hash of the variables' values: equal on every worker that
  holds the same weights, bit for bit."""
  digest = hashlib.sha256()
  for var in variables:
    digest.update(np.asarray(var).tobytes())
  return digest.hexdigest()[:16]
