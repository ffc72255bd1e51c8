"""The real script, run as a user runs it, with tiny sizes."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny sizes (dreamer.PRESETS['debug']): prefill 500, train every 500
# (2 updates, 2 pretrain), evaluate every 1000, episodes of 200 steps.
TINY = ('--preset', 'debug')


def run(*args, env=None, timeout=600):
  result = subprocess.run(
      [sys.executable, 'dreamer.py', *map(str, args)], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, **(env or {})))
  return result


def read_metrics(logdir):
  lines = (logdir / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line) for line in lines]


def updates(logdir):
  """Model optimizer iterations stored in the latest checkpoint."""
  import tensorflow as tf
  reader = tf.train.load_checkpoint(str(logdir / 'checkpoints'))
  keys = [k for k in reader.get_variable_to_shape_map()
          if k.startswith('model_opt_adam/') and 'iteration' in k]
  assert len(keys) == 1, keys
  return int(reader.get_tensor(keys[0]))


@pytest.mark.slow
@pytest.mark.xdist_group('trained_run')
def test_dmc_end_to_end_then_resume(tmp_path, trained_run):
  # The first run (1500 steps) is the shared one; the resume works on a copy.
  shared, first = trained_run
  assert first.returncode == 0, first.stderr[-3000:]
  logdir = tmp_path / 'dmc_cartpole_balance' / 'dreamer' / '0'
  shutil.copytree(shared, logdir)
  assert 'Devices: CPU; dtype policy float32.' in first.stdout
  episodes = sorted((logdir / 'episodes').glob('*.npz'))
  # 1500 steps at 200 per episode: 7 finished episodes of 100 agent steps.
  assert len(episodes) == 7
  with np.load(episodes[0]) as episode:
    assert episode['image'].shape == (101, 64, 64, 3)
    assert episode['action'].shape == (101, 1)
  metrics = read_metrics(logdir)
  assert any('train/return' in m for m in metrics)
  assert any('test/return' in m for m in metrics)
  assert any('model_loss' in m and np.isfinite(m['model_loss'])
             for m in metrics)
  assert all('step' in m for m in metrics)
  assert list(logdir.glob('events.out.tfevents.*'))
  assert list((logdir / 'videos').glob('*.mp4'))
  assert (logdir / 'checkpoints' / 'checkpoint').exists()
  # Pretraining (2) at step 500 and training (2) at step 1000.
  assert updates(logdir) == 4
  # The health signals are logged, and the doctor reads the run.
  for key in ('kl', 'action_sat', 'value_mean', 'return_mean', 'value_gap',
              'skip_frac', 'test/action_sat'):
    assert any(key in m and np.isfinite(m[key]) for m in metrics), key
  doctor = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.doctor', '--logdir', str(logdir)],
      cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert doctor.returncode in (0, 1), doctor.stderr
  assert 'Health of the run at step 1500' in doctor.stdout
  for check in ('finite numbers', 'KL (posterior vs prior)',
                'reward prediction', 'policy actions', 'values vs returns'):
    assert check in doctor.stdout

  # The resume, and two readers of the run while it trains: --mode eval of
  # its latest checkpoint and the doctor (they share its logdir).
  second = subprocess.Popen(
      [sys.executable, 'dreamer.py', '--logdir', str(logdir), '--task',
       'dmc_cartpole_balance', *TINY, '--steps', '2000'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    provenance = logdir / 'provenance.jsonl'
    deadline = time.time() + 300
    while len(provenance.read_text().splitlines()) < 2:  # It has started.
      assert second.poll() is None, second.communicate()[1][-3000:]
      assert time.time() < deadline, 'the resume did not start in time'
      time.sleep(0.2)
    evaluation = run('--logdir', logdir, '--mode', 'eval', '--eval_episodes',
                     2)
    health = subprocess.run(
        [sys.executable, '-m', 'dreamer_tf.doctor', '--logdir', str(logdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    second_out, second_err = second.communicate(timeout=600)
  finally:
    second.kill()
    second.wait()
  assert second.returncode == 0, second_err[-3000:]
  assert 'Resumed from' in second_out and 'at step 1500' in second_out
  assert health.returncode in (0, 1) and 'Health of the run' in health.stdout
  # Each start recorded what produced it (docs/reproduce.md).
  starts = [json.loads(line) for line in
            (logdir / 'provenance.jsonl').read_text().splitlines()]
  assert len(starts) == 2
  assert starts[-1]['devices'].startswith('Devices: CPU')
  assert starts[-1]['versions']['tensorflow'] == '2.21.0'
  # No second prefill: every new episode came from the policy, after 1500.
  new = sorted(set((logdir / 'episodes').glob('*.npz')) - set(episodes))
  assert len(new) == 2
  # No second pretraining: 2 updates at 1500, not 2 + pretrain.
  assert updates(logdir) == 6
  metrics = read_metrics(logdir)
  steps = [m['step'] for m in metrics]
  assert max(steps) == 2000 and steps == sorted(steps)
  # Validation signals are logged beside the losses.
  for key in ('reward_corr', 'image_mse', 'openl_mse_h1', 'openl_mse_h5'):
    assert any(key in m and np.isfinite(m[key]) for m in metrics), key

  # The evaluation of the saved agent (run above, during the resume), with
  # the task and sizes from config.json: the checkpoint at 1500, or at 2000
  # if the resume saved its last before the evaluation read it.
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  result = json.loads((logdir / 'eval' / 'returns.json').read_text())
  assert result['step'] in (1500, 2000) and len(result['returns']) == 2
  assert f"dmc_cartpole_balance at step {result['step']}: return" in \
      evaluation.stdout
  assert result['mean'] == pytest.approx(np.mean(result['returns']))
  assert result['std'] == pytest.approx(np.std(result['returns']))
  assert f"{result['mean']:.1f}" in evaluation.stdout
  import imageio
  frames = imageio.mimread(logdir / 'eval' / 'episode_0.mp4', memtest=False)
  assert len(frames) == 101 and frames[0].shape == (64, 64, 3)
  # A flag that would change the model is refused in one line.
  changed = run('--logdir', logdir, '--mode', 'eval', '--cnn_depth', 8)
  assert changed.returncode != 0 and 'Traceback' not in changed.stderr
  assert '--cnn_depth' in changed.stderr


@pytest.mark.slow
@pytest.mark.xdist_group('trained_run')
def test_a_real_run_reads_as_done_to_the_sweep(trained_run):
  # The sweeps in tests/test_sweep.py run a stand-in: here the sweep reads
  # the files of a real run (tools.Logger's metrics.jsonl, config.json, the
  # lock file a finished run leaves empty).
  from dreamer_tf import sweep
  shared, first = trained_run
  assert first.returncode == 0, first.stderr[-3000:]
  returns = [m['test/return'] for m in read_metrics(shared)
             if 'test/return' in m]
  state = sweep.run_state(shared, 1500)
  assert (state.state, state.step, state.ret) == ('done', 1500, returns[-1])
  assert sweep.run_state(shared).state == 'done'  # --steps of config.json.
  # Planned longer: it began, and no exit of a sweep is recorded.
  assert sweep.run_state(shared, 2000).state == 'stopped'


def test_eval_of_a_logdir_without_checkpoint_is_one_line(tmp_path):
  (tmp_path / 'config.json').write_text('{"task": "dmc_cartpole_balance"}')
  result = run('--logdir', tmp_path, '--mode', 'eval', timeout=120)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'no checkpoint' in result.stderr


@pytest.mark.slow
@pytest.mark.xdist_group('trained_run')
def test_eval_of_a_checkpoint_of_another_action_space(tmp_path, trained_run):
  # A cartpole (1 action dim) checkpoint under a config that says walker
  # (6 dims): the shapes do not fit, which is one clear line. (Training in
  # several environment processes, which this test's own run did before,
  # is tested end to end with 3 of them in test_distribute.py.)
  shared, first = trained_run
  assert first.returncode == 0, first.stderr[-3000:]
  tmp_path = tmp_path / 'run'
  shutil.copytree(shared, tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  config['task'] = 'dmc_walker_walk'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  result = run('--logdir', tmp_path, '--mode', 'eval', timeout=300)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'does not fit' in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_atari_end_to_end(tmp_path):
  logdir = tmp_path / 'atari_pong'
  result = run('--logdir', logdir, '--task', 'atari_pong', *TINY,
               '--action_repeat', 4, '--time_limit', 400, '--steps', 1200)
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((logdir / 'config.json').read_text())
  assert (config['action_dist'], config['pcont'], config['expl']) == (
      'onehot', True, 'epsilon_greedy')
  episodes = sorted((logdir / 'episodes').glob('*.npz'))
  assert episodes
  with np.load(episodes[0]) as episode:
    assert episode['image'].shape[1:] == (64, 64, 3)
    assert episode['action'].shape[1] == 6
    assert set(episode['action'].sum(-1)[1:]) == {1.0}
  assert any('test/return' in m for m in read_metrics(logdir))
  assert updates(logdir) > 0


@pytest.mark.parametrize('flags,message', [
    (['--precision', '8'], '--precision'),
    (['--action_dist', 'foo'], '--action_dist'),
    (['--task', 'dmc_nothing_here'], 'dmc_nothing_here'),
    (['--task', 'atari_nogame'], 'atari_nogame'),
    (['--steps', 'many'], '--steps'),
    (['--action_dist', 'onehot', '--expl', 'additive_gaussian',
      '--task', 'atari_pong'], 'additive_gaussian'),
    (['--batch_length', '500', '--time_limit', '200'], 'batch_length'),
])
def test_bad_input_is_one_clear_line(tmp_path, flags, message):
  result = run('--logdir', tmp_path / 'run', *flags, timeout=120)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) <= 3 and message in result.stderr, result.stderr
  assert not (tmp_path / 'run').exists()  # Nothing heavy started.


def test_missing_rendering_backend_names_the_packages(tmp_path):
  result = run('--logdir', tmp_path / 'run', env={'MUJOCO_GL': 'osmesa'},
               timeout=120)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'libosmesa6' in result.stderr, result.stderr


def test_worker_modules_do_not_import_tensorflow():
  code = ('import sys, dreamer, wrappers, dreamer_tf.replay; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_presets_and_flag_precedence():
  import dreamer
  debug = dreamer.parse_args(['--logdir', 'x', '--preset', 'debug'])
  assert (debug.cnn_depth, debug.deter_size, debug.stoch_size,
          debug.num_units, debug.batch_size, debug.batch_length) == (
              4, 16, 4, 16, 4, 10)
  # Flags given on the command line win over the preset.
  cpu = dreamer.parse_args(['--logdir', 'x', '--preset', 'cpu',
                            '--batch_size', '8'])
  assert cpu.batch_size == 8 and cpu.eval_every == 2000
  assert cpu.train_steps == dreamer.define_config().train_steps
  # Atari switches on discrete actions unless the user says otherwise.
  atari = dreamer.parse_args(['--logdir', 'x', '--task', 'atari_pong',
                              '--pcont', 'false'])
  assert (atari.action_dist, atari.pcont, atari.expl) == (
      'onehot', False, 'epsilon_greedy')
  assert dreamer.parse_args(['--logdir', 'x', '--steps', '5e6']).steps == 5e6
  with pytest.raises(ValueError, match='--preset'):
    dreamer.parse_args(['--logdir', 'x', '--preset', 'gpu'])


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(tmp_path):
  # In the prefill, after its first episode. SIGTERM, as a scheduler sends
  # it, stops the chief of a multi_worker run in training
  # (test_distribute.py) and the sweeps' runs (test_sweep.py); both signals
  # go through one handler (test_interrupts.py, test_loop.py).
  import signal

  from runs import start_training
  logdir = tmp_path / 'run'
  process = start_training(logdir, episodes=1)
  try:
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 130, stderr[-2000:]
  assert 'Interrupted at step' in stdout
  import tensorflow as tf
  step = int(tf.train.load_checkpoint(str(logdir / 'checkpoints')).get_tensor(
      'step/.ATTRIBUTES/VARIABLE_VALUE'))
  assert step >= 200  # After the first episode.
  assert f'Interrupted at step {step}:' in stdout  # Saved where it stopped.
