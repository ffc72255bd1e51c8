"""Training on several devices and workers (--strategy), and collection in
several environment processes, all on the CPU."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import dreamer
from dreamer_tf import distribute

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ('--task', 'dmc_cartpole_balance', '--preset', 'debug')
QUIET = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')


@pytest.fixture(scope='module')
def mirrored_steps(tmp_path_factory):
  """The single-device and mirrored updates of each case, computed in one
  process (tests/mirrored_step.py: the CPU is split once, TensorFlow starts
  once): {'float32-0', 'float32-straddle', 'mixed_float16-0'}: results."""
  cases = ('float32:0', 'float32:straddle', 'mixed_float16:0')
  out = tmp_path_factory.mktemp('mirrored')
  result = subprocess.run(
      [sys.executable, 'tests/mirrored_step.py', str(out), *cases],
      cwd=ROOT, capture_output=True, text=True, timeout=900, env=QUIET)
  assert result.returncode == 0, result.stderr[-3000:]
  found = {}
  for case in cases:
    name = case.replace(':', '-')
    with np.load(out / f'{name}.npz') as results:
      found[name] = dict(results)
  return found


def assert_same_update(results, rtol, atol=1e-6):
  assert int(results['replicas']) == 2
  names = sorted(k.split('/')[1] for k in results if k.startswith('single/'))
  assert sum(n.startswith('weight') for n in names) > 40
  for name in names:
    np.testing.assert_allclose(
        results[f'mirrored/{name}'], results[f'single/{name}'], rtol=rtol,
        atol=atol, err_msg=name)


@pytest.mark.parametrize('free_nats', ['0', 'straddle'])
@pytest.mark.slow
@pytest.mark.xdist_group('mirrored_steps')
def test_mirrored_step_equals_the_single_device_step(mirrored_steps,
                                                     free_nats):
  # Same weights, global batch and random draws (standard normals passed in
  # with the batch on axis 0, so each replica takes its sequences' draws):
  # the mirrored update over 2 logical CPUs must equal the one-device update.
  results = mirrored_steps[f'float32-{free_nats}']
  if free_nats == 'straddle':
    # The floor lies between the halves' mean KLs and below their mean: a
    # floor on each replica's own mean would drop one half's KL gradient.
    low, high = sorted(results['kls'])
    assert low < results['free_nats'] < (low + high) / 2
    assert results['single/div'] > results['free_nats']
  assert_same_update(results, rtol=1e-4)
  assert results['single/updates'] == results['mirrored/updates'] == 1


@pytest.mark.slow
@pytest.mark.xdist_group('mirrored_steps')
def test_mirrored_step_with_float16_loss_scaling(mirrored_steps):
  # The GPU path: mixed_float16 with loss scaling, forced on the CPU.
  results = mirrored_steps['mixed_float16-0']
  assert np.isfinite(results['single/model_grad_norm'])
  assert results['single/loss_scale'] == results['mirrored/loss_scale'] == 16
  # Float16 gradients summed in two halves round differently: a gradient
  # norm differed by 2.3 % in one run. A gradient summed twice over the
  # replicas would double it.
  for key in ('model_loss', 'actor_loss', 'value_loss', 'model_grad_norm',
              'actor_grad_norm', 'value_grad_norm'):
    np.testing.assert_allclose(results[f'mirrored/{key}'],
                               results[f'single/{key}'], rtol=5e-2)
  # Adam's first step moves a weight by up to about 3 x its learning rate
  # (at most 2e-3 here) whatever the gradient's size, so where float16
  # gradients nearly cancel, summing them in two halves can move a weight
  # differently. Nearly all weights agree closely; none by more than a step.
  weights = [k for k in results if k.startswith('single/weight')]
  close = total = 0
  for key in weights:
    mirrored = results[key.replace('single/', 'mirrored/')]
    difference = np.abs(mirrored - results[key])
    assert difference.max() < 2e-3, key
    close += int((difference <= 1e-5 + 1e-2 * np.abs(results[key])).sum())
    total += difference.size
  assert close / total > 0.99, close / total


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def start_workers(logdir, *flags):
  """A chief and worker 1 of --strategy multi_worker on localhost, both
  with `logdir` (a list: a --logdir of each worker's own)."""
  logdirs = logdir if isinstance(logdir, list) else [logdir] * 2
  hosts = [f'127.0.0.1:{port}' for port in free_ports(len(logdirs))]
  processes = []
  for index, folder in enumerate(logdirs):
    tf_config = dict(cluster=dict(worker=hosts),
                     task=dict(type='worker', index=index))
    processes.append(subprocess.Popen(
        [sys.executable, 'dreamer.py', '--logdir', str(folder), *TINY,
         '--strategy', 'multi_worker', *map(str, flags)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(QUIET, TF_CONFIG=json.dumps(tf_config))))
  return processes


def listing(folder):
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in folder.rglob('*') if p.is_file()}


def fingerprint(stdout):
  lines = [line for line in stdout.splitlines() if 'fingerprint' in line]
  assert len(lines) == 1, stdout[-2000:]
  return lines[0].split('fingerprint ')[1].rstrip('.')


def model_losses(logdir):
  """How many times the chief has logged train metrics."""
  path = logdir / 'metrics.jsonl'
  return path.read_text().count('"model_loss"') if path.exists() else 0


@pytest.mark.slow
def test_multi_worker_trains_resumes_and_stops_on_sigterm(tmp_path):
  """Round 1 trains to 600 steps; round 2 resumes and is stopped by a
  scheduler's SIGTERM to the chief (SIGINT may be ignored when the tests
  run in the background), which saves and stops every worker."""
  import re

  import tensorflow as tf
  logdir = tmp_path / 'run'
  # Round 1, 600 steps: 2 pretraining updates at 500.
  chief, worker = start_workers(logdir, '--steps', 600)
  chief_out, chief_err = chief.communicate(timeout=600)
  assert chief.returncode == 0, chief_err[-3000:]
  after_chief = listing(logdir)
  worker_out, worker_err = worker.communicate(timeout=120)
  assert worker.returncode == 0, worker_err[-3000:]
  assert 'on each of 2 workers, this is worker 0 (multi_worker: 2 ' \
      'replicas, 2 sequences each)' in chief_out
  assert 'Done: 600 environment steps.' in chief_out
  # Both hold the same weights, bit for bit, after the same updates.
  assert 'Worker 1: 2 updates' in worker_out, worker_out
  assert fingerprint(chief_out) == fingerprint(worker_out)
  # Only the chief wrote: nothing changed after it stopped, and every
  # TensorBoard file is one of the chief's processes'.
  assert listing(logdir) == after_chief

  # Round 2: resumes from the checkpoint at 600, trains at once; SIGTERM
  # to the chief once it has logged those updates.
  logged = model_losses(logdir)
  chief, worker = start_workers(logdir, '--steps', 100000)
  try:
    deadline = time.time() + 300
    while model_losses(logdir) == logged:
      assert chief.poll() is None, chief.communicate()[1][-3000:]
      assert time.time() < deadline, 'no training in time'
      time.sleep(0.5)
    chief.send_signal(signal.SIGTERM)
    chief_out, chief_err = chief.communicate(timeout=120)
    after_chief = listing(logdir)
    worker_out, worker_err = worker.communicate(timeout=120)
  finally:
    for process in (chief, worker):
      process.kill()
  assert chief.returncode == 130, chief_err[-3000:]
  assert 'at step 600 (2 updates).' in chief_out  # Resumed from round 1.
  step = int(re.search(r'Interrupted at step (\d+)', chief_out).group(1))
  assert worker.returncode == 0, worker_err[-3000:]
  # The worker took every step the chief took: the same weights, and its
  # update count (with those restored from round 1) is the one the chief
  # saved in its checkpoint at the step it reached.
  assert fingerprint(chief_out) == fingerprint(worker_out)
  updates = int(re.search(r'Worker 1: (\d+) updates', worker_out).group(1))
  assert updates >= 4  # 2 restored, then 2 at once on resuming.
  reader = tf.train.load_checkpoint(str(logdir / 'checkpoints'))
  key = [k for k in reader.get_variable_to_shape_map()
         if k.startswith('model_opt_adam/') and 'iteration' in k][0]
  assert int(reader.get_tensor(key)) == updates
  assert int(reader.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE')) == step
  assert listing(logdir) == after_chief
  events = sorted(p.name for p in logdir.glob('events.out.tfevents.*'))
  assert len(events) == 2          # One per chief process.


def wait_for_episodes(chief, logdir):
  """Returns once the chief has stored an episode (it collects)."""
  deadline = time.time() + 300
  while not list(logdir.glob('episodes/*.npz')):
    assert chief.poll() is None, chief.communicate()[1][-3000:]
    assert time.time() < deadline, 'no episodes in time'
    time.sleep(0.5)


@pytest.mark.parametrize('killed', ['chief', 'worker 1'])
@pytest.mark.slow
def test_a_killed_worker_is_named_by_the_other_in_one_line(tmp_path, killed):
  import re

  chief, worker = start_workers(tmp_path, '--steps', 100000, '--eval_every',
                                100000)
  try:
    # Once the chief collects, worker 1 waits for its orders: kill -9 one
    # of them there; the chief's next collective is its first train step.
    wait_for_episodes(chief, tmp_path)
    dead, alive = (chief, worker) if killed == 'chief' else (worker, chief)
    dead.kill()
    dead.wait(timeout=60)
    out, err = alive.communicate(timeout=120)
  finally:
    for process in (chief, worker):
      process.kill()
  assert alive.returncode == 1, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  if killed == 'chief':
    assert 'dreamer.py: error: lost the other workers' in err
    return
  line = one_line(err)
  assert re.fullmatch(
      r'dreamer\.py: error: lost worker 1 \(127\.0\.0\.1:\d+\), which stopped '
      r'answering during a train step: start every worker again to resume '
      r'from the last checkpoint \(saved a checkpoint at step \d+; '
      r'traceback in \S+crash\.log\)\.', line), line
  assert list((tmp_path / 'checkpoints').glob('ckpt-*.index'))


def process_stats():
  """{pid: (parent pid, state, start time)} of every process."""
  found = {}
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue
    found[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
  return found


def children(pid):
  """{pid: start time} of the live processes whose parent is `pid`."""
  return {child: start for child, (parent, state, start)
          in process_stats().items() if parent == pid and state != 'Z'}


def survivors(seen):
  """The processes of `seen` still alive (the same start time: not a new
  process that got a reused pid)."""
  now = process_stats()
  return [pid for pid, start in seen.items()
          if pid in now and now[pid][1] != 'Z' and now[pid][2] == start]


@pytest.mark.slow
def test_three_environment_processes_end_to_end(tmp_path):
  # 3 envs x 50 agent steps x repeat 2: each round of episodes is 300
  # steps; prefill one round, train during the second.
  process = subprocess.Popen(
      [sys.executable, 'dreamer.py', '--logdir', str(tmp_path), *TINY,
       '--envs', '3', '--parallel', 'process', '--time_limit', '100',
       '--prefill', '300', '--steps', '600', '--train_every', '300',
       '--eval_every', '600'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=QUIET)
  seen = {}
  while process.poll() is None:
    seen.update(children(process.pid))
    time.sleep(0.2)
  stdout, stderr = process.communicate()
  assert process.returncode == 0, stderr[-3000:]
  # 3 training workers and the evaluation worker (and possibly the
  # resource tracker of multiprocessing) ran as children.
  assert len(seen) >= 4, seen
  # multiprocessing's resource tracker exits when it sees its parent gone,
  # a moment after it: give the children a few seconds.
  deadline = time.time() + 10
  while survivors(seen) and time.time() < deadline:
    time.sleep(0.2)
  left = survivors(seen)
  assert not left, [pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
                    for pid in left]
  paths = sorted(tmp_path.glob('episodes/*.npz'))
  assert len(paths) == 6
  lengths = []
  first_frames = []
  for path in paths:
    with np.load(path) as episode:
      lengths.append(len(episode['reward']) - 1)
      first_frames.append(episode['image'][0].tobytes())
  assert sum(lengths) * 2 == 600         # The step count adds up.
  assert 'Done: 600 environment steps.' in stdout
  # Three environments with their own seeds: the first round's episodes
  # start from three different states.
  assert len(set(first_frames[:3])) == 3


@pytest.mark.parametrize('flags,env,message', [
    (['--devices', 'GPU:x'], {}, "'GPU:x' is not a device"),
    (['--devices', 'CPU:0,CPU:1'], {}, 'is for --strategy mirrored'),
    (['--strategy', 'mirrored', '--devices', 'CPU:0,CPU:1,CPU:2'], {},
     'does not split evenly over 3 replicas: use a multiple of 3, e.g. 48'),
    (['--strategy', 'multi_worker'], {}, 'needs the TF_CONFIG variable'),
    (['--strategy', 'multi_worker'], {'TF_CONFIG': '{"cluster": 1}'},
     'TF_CONFIG cannot be read'),
    (['--strategy', 'multi_worker'], {'TF_CONFIG': json.dumps(dict(
        cluster=dict(worker=['a:1']), task=dict(type='worker', index=3)))},
     'task index 3 is not one of the 1 workers'),
    (['--strategy', 'several'], {}, '--strategy'),
])
def test_strategy_flags_are_checked_before_anything_starts(
    tmp_path, monkeypatch, flags, env, message):
  monkeypatch.delenv('TF_CONFIG', raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  config = dreamer.parse_args(['--logdir', str(tmp_path / 'run'), *flags])
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(
      ')', r'\)')):
    dreamer.check_config(config)


def test_parse_devices():
  assert distribute.parse_devices('gpu:0, GPU:1') == [('GPU', 0), ('GPU', 1)]
  assert distribute.parse_devices('') == []
  with pytest.raises(ValueError, match='twice'):
    distribute.parse_devices('CPU:0,cpu:0')


def test_device_line_counts_replicas():
  import tensorflow as tf
  one = tf.distribute.MirroredStrategy(['CPU:0'])
  assert distribute.describe(one, 50) == (
      'CPU:0 (mirrored: 1 replica, 50 sequences each)')


def one_line(stderr):
  """The only line of a process's stderr (no traceback, no warning)."""
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


@pytest.mark.slow
def test_a_worker_with_another_logdir_stops_every_worker_in_one_line(
    tmp_path):
  import re

  chief, worker = start_workers([tmp_path / 'run', tmp_path / 'other'])
  try:
    chief_out, chief_err = chief.communicate(timeout=120)
    worker_out, worker_err = worker.communicate(timeout=60)
  finally:
    for process in (chief, worker):
      process.kill()
  fix = ("start every worker with the chief's --logdir on a shared "
         'filesystem.')
  assert worker.returncode == 1, worker_err[-3000:]
  assert one_line(worker_err) == (
      f"dreamer.py: error: worker 1's --logdir {tmp_path / 'other'} is not "
      f"the chief's (no such folder): {fix}")
  assert chief.returncode == 1, chief_err[-3000:]
  line = one_line(chief_err)
  assert re.fullmatch(
      r"dreamer\.py: error: the --logdir of worker 1 \(127\.0\.0\.1:\d+\) "
      rf"is not the chief's {re.escape(str(tmp_path / 'run'))} \(.+\): "
      + re.escape(fix), line), line
  # The chief stopped before any episode or checkpoint.
  assert not list(tmp_path.glob('run/episodes/*.npz'))


def test_each_worker_seeds_its_own_random_draws():
  # Seeded alike, replica j of every worker would draw the same RSSM and
  # action noise (docs/design.md section 10). The chief keeps --seed.
  import random

  import tensorflow as tf

  from dreamer_tf import hardware

  def draws():
    in_graph = tf.function(lambda: tf.random.normal([4]))()
    return (tf.random.normal([4]).numpy().tolist(),
            in_graph.numpy().tolist(), np.random.rand(), random.random())

  random.seed(7)
  np.random.seed(7)
  tf.random.set_seed(7)
  before = draws()  # What seeding with --seed 7 draws.
  hardware.seed_everything(7)
  assert draws() == before
  hardware.seed_everything(7, 0)
  assert draws() == before
  hardware.seed_everything(7, 1)
  worker = draws()
  assert all(a != b for a, b in zip(worker, before)), (worker, before)
  hardware.seed_everything(7, 1)
  assert draws() == worker


def test_the_lost_worker_is_found_in_tensorflows_error():
  # The two texts a chief got when worker 1 was killed (abridged): the
  # coordination service's heartbeats, or a refused connection.
  hosts = ['127.0.0.1:41000', '127.0.0.1:45901']
  heartbeats = (
      'Collective ops is aborted by: Error reported from /job:worker/task:1: '
      'The following tasks are unhealthy (stopped sending heartbeats):\n'
      '/job:worker/replica:0/task:1\nThe tasks have crashed.\n'
      '[[{{node CollectiveReduceV2}}]] /job:worker/replica:0/task:0')
  refused = (
      'Collective ops is aborted by: failed to connect to all addresses; '
      'last error: UNKNOWN: ipv4:127.0.0.1:45901: Failed to connect to '
      'remote host: Connection refused\nAdditional GRPC error information '
      'from remote target /job:worker/replica:0/task:1 while calling '
      '/tensorflow.WorkerService/RecvBuf:')
  for text in (heartbeats, refused, refused.split('\n')[0]):
    assert distribute.lost_workers(text, 0, hosts) == [1]
  assert distribute.lost_workers('Socket closed', 0, hosts) == []
  assert distribute.lost_message([1], 0, hosts, 'a train step') == (
      'lost worker 1 (127.0.0.1:45901), which stopped answering during a '
      'train step: start every worker again to resume from the last '
      'checkpoint.')
  assert distribute.lost_message([], 1, hosts, 'the start').startswith(
      'lost the other workers (a worker stopped answering during the start)')


def test_a_follower_without_episodes_says_to_use_the_chiefs_logdir(
    tmp_path, monkeypatch, capsys):
  import types

  from dreamer_tf import follower

  def worker_dataset(config, spec, strategy):
    def make():  # As replay._usable says it after its timeout.
      raise RuntimeError(f'No episode with at least 10 steps in {tmp_path}/'
                         'episodes after waiting 30 s. The prefill writes '
                         'the first episodes.')
    return make
  monkeypatch.setattr(distribute, 'worker_dataset', worker_dataset)
  monkeypatch.setattr(distribute, 'worker_index', lambda strategy: 1)
  config = types.SimpleNamespace(logdir=str(tmp_path))
  assert follower._dataset(config, {}, None) is None
  assert one_line(capsys.readouterr().err) == (
      f'dreamer.py: error: No episode with at least 10 steps in {tmp_path}/'
      'episodes after waiting 30 s. The prefill writes the first episodes. '
      f"Worker 1 reads the chief's episodes from {tmp_path}/episodes: start "
      "every worker with the chief's --logdir on a shared filesystem.")
