"""Protections of a long run: one owner per logdir, reruns checked before
anything is written, flags in range, checkpoints that fall back, NaN stops,
crashes that keep the work. Each test fails without its protection."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dreamer
from dreamer_tf import rundir
from dreamer_tf.checkpoint import Checkpointer
from runs import catch_sigint, start_training

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
  return subprocess.run(
      [sys.executable, 'dreamer.py', *map(str, args)], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout)


def one_line_error(result):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  return result.returncode != 0 and 'Traceback' not in result.stderr and \
      len(lines) == 1


HOLD = '''if True:
  import sys, time
  from dreamer_tf import rundir
  lock = rundir.Lock(sys.argv[1])
  print(lock.acquire(), flush=True)
  time.sleep(600)
'''


def hold_lock(logdir):
  holder = subprocess.Popen([sys.executable, '-c', HOLD, str(logdir)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'None'
  return holder


def test_a_second_trainer_stops_at_once_naming_the_first(tmp_path):
  holder = hold_lock(tmp_path)
  try:
    start = time.time()
    result = run('--logdir', tmp_path, '--preset', 'debug',
                 '--task', 'dmc_cartpole_balance')
    assert time.time() - start < 30
    assert one_line_error(result), result.stderr
    assert f'pid {holder.pid}' in result.stderr
    assert 'another dreamer.py trains in' in result.stderr
    assert not (tmp_path / 'config.json').exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: the next owner takes over, saying so.
  lock = rundir.Lock(tmp_path)
  notice = lock.acquire()
  assert notice and f'pid {holder.pid}' in notice
  # While held, a second lock in this process is refused too.
  with pytest.raises(rundir.LogdirError, match=f'pid {os.getpid()}'):
    rundir.Lock(tmp_path).acquire()
  lock.release()
  assert rundir.Lock(tmp_path).acquire() is None  # Released cleanly.


def write_config(logdir, **flags):
  config = dreamer.parse_args(['--logdir', str(logdir), '--preset', 'debug',
                               '--task', 'dmc_cartpole_balance',
                               *sum([[f'--{k}', str(v)] for k, v in
                                     flags.items()], [])])
  logdir.mkdir(parents=True, exist_ok=True)
  rundir.store_config(logdir, config, {})
  return config


def test_a_rerun_with_another_task_or_size_changes_nothing(tmp_path):
  write_config(tmp_path)
  before = (tmp_path / 'config.json').read_bytes()
  result = run('--logdir', tmp_path, '--preset', 'debug',
               '--task', 'dmc_walker_walk', '--cnn_depth', 8)
  assert one_line_error(result), result.stderr
  assert "--task 'dmc_cartpole_balance' -> 'dmc_walker_walk'" in result.stderr
  assert '--cnn_depth 4 -> 8' in result.stderr
  assert (tmp_path / 'config.json').read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'config.json', 'lock']
  # Only the (released) lock was added: the stored run is as it was.
  assert (tmp_path / 'lock').read_text() == ''


def test_allowed_changes_are_recorded(tmp_path):
  write_config(tmp_path, steps=1500)
  config = dreamer.parse_args(['--logdir', str(tmp_path), '--preset',
                               'debug', '--task', 'dmc_cartpole_balance',
                               '--steps', '3000', '--eval_every', '500'])
  changes = rundir.check_rerun(tmp_path, config)
  assert changes == {'steps': (1500, 3000), 'eval_every': (1000, 500)}
  rundir.store_config(tmp_path, config, changes)
  stored = json.loads((tmp_path / 'config.json').read_text())
  assert stored['steps'] == 3000
  assert stored['_history'][0]['changed']['steps'] == dict(old=1500, new=3000)
  assert rundir.read_config(tmp_path)['steps'] == 3000
  assert '_history' not in rundir.read_config(tmp_path)


@pytest.mark.parametrize('flags,message', [
    (['--model_lr', '-1'], '--model_lr -1.0 must be at least 0'),
    (['--free_nats', '-1'], '--free_nats -1.0 must be at least 0'),
    (['--grad_clip', '0'], '--grad_clip 0.0 must be above 0'),
    (['--discount', '1.5'], '--discount 1.5 must be in [0, 1]'),
    (['--disclam', 'nan'], '--disclam nan must be in [0, 1]'),
    (['--expl_amount', '-0.1'], '--expl_amount -0.1 must be at least 0'),
    (['--steps', '400'], 'not above --prefill'),
    (['--eval_every', '0'], '--eval_every 0 must be at least 1'),
    (['--weight_decay_pattern', '('], 'not a regular expression'),
])
def test_out_of_range_flags_are_refused_before_any_work(tmp_path, flags,
                                                         message):
  result = run('--logdir', tmp_path / 'run', '--preset', 'debug', *flags,
               timeout=60)
  assert one_line_error(result) and message in result.stderr, result.stderr
  assert not (tmp_path / 'run').exists()


def test_a_logdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / 'file').write_text('x')
  result = run('--logdir', tmp_path / 'file', '--preset', 'debug', timeout=60)
  assert one_line_error(result) and 'is a file' in result.stderr


def test_ctrl_c_during_start_up_is_quiet(tmp_path):
  process = subprocess.Popen(
      [sys.executable, 'dreamer.py', '--logdir', str(tmp_path), '--preset',
       'debug', '--task', 'dmc_cartpole_balance'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=catch_sigint)
  try:
    # The lock is written first; TensorFlow takes seconds to load after it.
    deadline = time.time() + 60
    while not (tmp_path / 'lock').exists() or \
        not (tmp_path / 'lock').read_text():
      assert time.time() < deadline and process.poll() is None
      time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
  finally:
    process.kill()
  assert process.returncode == 130 and 'Traceback' not in stderr, stderr
  assert stderr.strip() == 'Interrupted.'


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
  from dreamer_tf import agent as agent_lib
  from tiny import tiny_config
  agent = agent_lib.Dreamer(tiny_config(), 2)
  first = agent.encoder.trainable_variables[0].numpy()
  checkpoint = Checkpointer(agent, tmp_path, owner=True)
  checkpoint.save(100)
  variable = agent.encoder.trainable_variables[0]
  variable.assign(variable + 1.0)
  newest = checkpoint.save(200)
  # Truncate the newest checkpoint's data, as a full disk or kill might.
  data = next(pathlib.Path(tmp_path / 'checkpoints').glob(
      pathlib.Path(newest).name + '.data-*'))
  data.write_bytes(data.read_bytes()[:100])
  (tmp_path / 'checkpoints' / 'ckpt-3_temp').mkdir()  # A killed save.

  fresh = agent_lib.Dreamer(tiny_config(), 2)
  restored = Checkpointer(fresh, tmp_path, owner=True)
  assert restored.restore() and restored.step == 100
  np.testing.assert_array_equal(
      fresh.encoder.trainable_variables[0].numpy(), first)
  out = capsys.readouterr().out
  assert f'cannot read the checkpoint {newest}' in out
  assert 'trying the one before it' in out
  assert not (tmp_path / 'checkpoints' / 'ckpt-3_temp').exists()
  assert restored.latest.endswith('ckpt-1')
  # A new save goes after the good one and keeps it.
  restored.save(300)
  again = Checkpointer(agent_lib.Dreamer(tiny_config(), 2), tmp_path)
  assert again.restore() and again.step == 300
  # When none can be read: one clear error.
  for path in (tmp_path / 'checkpoints').glob('*.data-*'):
    path.write_bytes(b'')
  with pytest.raises(ValueError, match='can be read'):
    Checkpointer(agent_lib.Dreamer(tiny_config(), 2),
                         tmp_path).restore()


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_in_one_line_after_saving(tmp_path):
  # Killed in the prefill, after the first episode: the run saves what it
  # has and stops in one line.
  import psutil
  process = start_training(tmp_path, episodes=1)
  try:
    for child in psutil.Process(process.pid).children():
      child.kill()
    stdout, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 1, stderr[-2000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'Traceback' not in stderr, stderr
  assert 'died with exit code -9 (SIGKILL)' in stderr
  assert 'saved a checkpoint at step' in stderr
  assert 'Traceback' in (tmp_path / 'crash.log').read_text()
  import tensorflow as tf
  step = int(tf.train.load_checkpoint(str(tmp_path / 'checkpoints'))
             .get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE'))
  assert step >= 200
  # The lock is free again: the next run may start.
  assert rundir.Lock(tmp_path).acquire() is None


def test_a_resume_restores_the_optimizer_state_exactly(tmp_path):
  from dreamer_tf import agent as agent_lib
  from tiny import random_batch, tiny_config
  agent = agent_lib.Dreamer(tiny_config(), 2)
  for seed in range(3):
    agent.train(random_batch(seed=seed))
  Checkpointer(agent, tmp_path, owner=True).save(1234)
  fresh = agent_lib.Dreamer(tiny_config(), 2)
  checkpoint = Checkpointer(fresh, tmp_path, owner=True)
  assert checkpoint.restore() and checkpoint.step == 1234
  for name in ('model_opt', 'actor_opt', 'value_opt'):
    saved, restored = getattr(agent, name), getattr(fresh, name)
    assert int(restored.iterations) == 3
    # Adam's moments and step count, then the weights they update.
    pairs = list(zip(saved._opt.variables, restored._opt.variables))
    pairs += list(zip(saved.variables, restored.variables))
    assert len(pairs) > 3
    for a, b in pairs:
      np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.slow
def test_kill_9_then_rerun_loses_nothing_and_counts_on(tmp_path):
  # One logdir, killed with SIGKILL in the prefill, then (rerun) in the
  # pretraining, then (rerun) in the training, then rerun to its end: each
  # rerun goes on from where the killed process had got to, and nothing a
  # killed process stored is lost, changed, half-written or stored twice.
  import hashlib

  from dreamer_tf import replay
  metrics = tmp_path / 'metrics.jsonl'
  files = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in (tmp_path / 'episodes').glob('*.npz')}
  logged = lambda: [json.loads(line)['step'] for line in
                    metrics.read_text().splitlines()] if metrics.exists() \
      else [0]
  def start_of(stdout):
    return int(re.search(r'at step (\d+)', stdout).group(1))
  kept, before = {}, (0, 0)  # Files of the killed processes; their steps.
  for when in ('prefill', 'pretraining', 'training'):
    stored = len(files())
    # prefill: 1 episode of the 500-step prefill; training: 3 episodes,
    # past the pretraining at 500 (the episode at 600 ends after it).
    process = start_training(tmp_path, episodes=dict(
        prefill=1, pretraining=stored, training=3)[when])
    if when == 'pretraining':
      # The prefill ends at 500 mid-episode and logs step 500; the files
      # hold 400 steps until the episode ends at 600, after the pretraining.
      deadline = time.time() + 120
      while not (metrics.exists() and '"step": 500' in metrics.read_text()):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    process.kill()   # SIGKILL: no handler runs.
    stdout, _ = process.communicate()
    if when != 'prefill':  # A rerun: it went on from the killed one's step.
      start = start_of(stdout)
      assert start >= max(before) and start > 0, (when, start, before)
    kept.update(files())
    before = (max(logged()), replay.count_steps(tmp_path / 'episodes', 2))
  result = run('--logdir', tmp_path, '--task', 'dmc_cartpole_balance',
               '--preset', 'debug', '--steps', 1200)
  assert result.returncode == 0, result.stderr[-2000:]
  # It goes on from where the killed run had got to, not from before.
  start = start_of(result.stdout)
  assert start >= max(before) and start > 0
  after = files()
  # Nothing lost or changed, nothing half-written or rejected.
  assert {k: after[k] for k in kept} == kept
  assert not (tmp_path / 'episodes' / 'rejected').exists()
  for name in after:
    replay.inspect_episode(tmp_path / 'episodes' / name)
  # The episodes hold the steps run after each kill, once each: the new
  # files' steps plus the old ones never exceed the final count, and no
  # episode was stored twice (a rerun continues the random stream).
  assert replay.count_steps(tmp_path / 'episodes', 2) <= 1200
  assert len(after) > len(kept)
  actions = set()
  for name in after:
    with np.load(tmp_path / 'episodes' / name) as episode:
      actions.add(episode['action'].tobytes())
  assert len(actions) == len(after)
  # The step count never went backwards, across all four processes.
  steps = logged()
  assert steps == sorted(steps) and steps[-1] == 1200


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_nan_in_one_line(tmp_path):
  # A learning rate of 1e30 throws the weights far away in one update; the
  # next loss is not finite. Episodes of 50 agent steps, a prefill of 2.
  result = run('--logdir', tmp_path, '--task', 'dmc_cartpole_balance',
               '--preset', 'debug', '--model_lr', '1e30', '--time_limit',
               100, '--prefill', 100)
  assert result.returncode == 3 and one_line_error(result), result.stderr
  assert 'model_loss = nan' in result.stderr
  batch = next((tmp_path / 'nan').glob('batch-*.npz'))
  with np.load(batch) as data:
    assert data['image'].shape == (4, 10, 64, 64, 3)
  info = json.loads(next((tmp_path / 'nan').glob('info-*.json')).read_text())
  assert info['batch'] == batch.name and info['step'] == 100
  assert (tmp_path / 'checkpoints' / 'checkpoint').exists()


def test_two_steps_after_a_resume_equal_two_steps_without_it(tmp_path):
  # Run eagerly with the global seed reset before the two steps, so that
  # both agents draw the same noise: then only the restored state differs.
  import tensorflow as tf

  from dreamer_tf import agent as agent_lib
  from tiny import random_batch, tiny_config
  tf.config.run_functions_eagerly(True)
  try:
    agent = agent_lib.Dreamer(tiny_config(), 2)
    for seed in range(2):
      agent.train(random_batch(seed=seed))
    Checkpointer(agent, tmp_path, owner=True).save(100)
    def two_steps(dreamer_agent):
      tf.random.set_seed(7)
      for seed in (10, 11):
        dreamer_agent.train(random_batch(seed=seed))
      return [v.numpy() for opt in (dreamer_agent.model_opt,
                                    dreamer_agent.actor_opt,
                                    dreamer_agent.value_opt)
              for v in opt.variables]
    uninterrupted = two_steps(agent)
    resumed = agent_lib.Dreamer(tiny_config(), 2)
    assert Checkpointer(resumed, tmp_path).restore()
    after_resume = two_steps(resumed)
  finally:
    tf.config.run_functions_eagerly(False)
  assert len(after_resume) == len(uninterrupted) > 10
  for a, b in zip(uninterrupted, after_resume):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
