"""The health checks on synthetic metric histories made to show each
pathology, on a healthy one and on a short one; the command's exit status."""

import json
import math
import subprocess
import sys

import pytest

from dreamer_tf import doctor

CONFIG = dict(prefill=5000, train_every=1000, pcont=False, free_nats=3.0,
              action_dist='tanh_normal')
STEPS = list(range(5000, 25000, 1000))   # 20 log points.


def healthy(**changes):
  """A run like our CPU walker_stand run: every check is fine. `changes`
  maps a metric to a function (index, step) -> value that replaces it."""
  history = []
  for i, step in enumerate(STEPS):
    record = dict(
        step=step, model_loss=11440 - 6 * i, actor_loss=-20.0,
        value_loss=3.0, model_grad_norm=50.0, actor_grad_norm=5.0,
        value_grad_norm=8.0, image_mse=0.02 / (1 + i), kl=4.0 + 0.01 * i,
        reward_corr=min(0.9, 0.1 + 0.1 * i), action_sat=0.6,
        value_mean=10.0 + i, return_mean=10.5 + i, value_gap=1.0,
        skip_frac=0.0)
    record['train/return'] = 100.0 + 10 * i
    for key, value in changes.items():
      record[key] = value(i, step)
    history.append(record)
    if i % 2 == 0:  # An evaluation every 2000 steps.
      evaluation = {'step': step, 'test/return': 150.0 + 10 * i,
                    'test/action_sat': 1.0 if i < 4 else 0.2}
      for key in ('test/return', 'test/action_sat'):
        if key in changes:
          evaluation[key] = changes[key](i, step)
      history.append(evaluation)
  return history


def verdicts(history, config=CONFIG):
  return {r.name: r for r in doctor.diagnose(history, config)}


def test_a_healthy_run_has_no_problem():
  results = verdicts(healthy())
  assert {name: r.verdict for name, r in results.items()} == {
      'finite numbers': 'ok', 'reconstruction': 'ok',
      'KL (posterior vs prior)': 'ok', 'reward prediction': 'ok',
      'imagined actions': 'ok', 'policy actions': 'ok',
      'values vs returns': 'ok', 'model loss falls': 'ok',
      'test return rises': 'ok'}


def test_a_short_history_is_too_early_to_tell():
  results = verdicts(healthy()[:3])
  # Only the absence of NaN is a fact already; the rest would be guesses.
  assert results.pop('finite numbers').verdict == 'ok'
  assert {r.verdict for r in results.values()} == {'too early'}
  text = doctor.format_table(list(results.values()), 5000)
  assert 'too early to tell for 8 of 8 checks' in text


def test_kl_collapse():
  # The KL falls under 1 nat from step 15000 on.
  history = healthy(kl=lambda i, step: 4.0 if step < 15000 else 0.2)
  result = verdicts(history)['KL (posterior vs prior)']
  assert result.verdict == 'problem' and result.since == 15000
  assert '--free_nats' in result.remedy and '--kl_balance' in result.remedy
  assert verdicts(healthy(kl=lambda i, s: 1.5))[
      'KL (posterior vs prior)'].verdict == 'ok'
  assert verdicts(healthy(kl=lambda i, s: 45.0))[
      'KL (posterior vs prior)'].verdict == 'watch'


def test_saturated_actions():
  history = healthy(action_sat=lambda i, step: 0.99,
                    **{'test/action_sat': lambda i, step: 1.0})
  results = verdicts(history)
  # Saturated samples in imagination alone are worth a look, not a problem
  # (runs that learn sit near 0.98); a saturated evaluation policy is.
  assert results['imagined actions'].verdict == 'watch'
  assert results['policy actions'].verdict == 'problem'
  assert results['policy actions'].since == 5000
  assert '--actor_lr' in results['policy actions'].remedy
  # Between the thresholds: watch.
  history = healthy(**{'test/action_sat': lambda i, step: 0.7})
  assert verdicts(history)['policy actions'].verdict == 'watch'
  # Discrete actions have no saturation checks.
  names = verdicts(history, dict(CONFIG, action_dist='onehot'))
  assert 'imagined actions' not in names and 'policy actions' not in names


def test_uncorrelated_rewards():
  history = healthy(reward_corr=lambda i, step: 0.05)
  result = verdicts(history)['reward prediction']
  assert result.verdict == 'problem' and '--pretrain' in result.remedy
  # Before 5 training occasions after the prefill (step 10000) it is early.
  early = [r for r in history if r['step'] < 9000]
  assert verdicts(early)['reward prediction'].verdict == 'too early'
  # A sparse task with no reward yet cannot tell either.
  history = healthy(reward_corr=lambda i, step: 0.0,
                    **{'train/return': lambda i, step: 0.0})
  assert verdicts(history)['reward prediction'].verdict == 'too early'


def test_nan_losses_and_skipped_steps():
  history = healthy(model_loss=lambda i, step: math.nan if step >= 20000
                    else 11000.0)
  result = verdicts(history)['finite numbers']
  assert result.verdict == 'problem' and result.since == 20000
  history = healthy(skip_frac=lambda i, step: 0.02)
  assert verdicts(history)['finite numbers'].verdict == 'watch'
  history = healthy(skip_frac=lambda i, step: 0.2)
  assert verdicts(history)['finite numbers'].verdict == 'problem'


def test_values_diverging_from_returns():
  history = healthy(value_gap=lambda i, step: 5.0 * (1 + i),
                    return_mean=lambda i, step: 10.0)
  result = verdicts(history)['values vs returns']
  assert result.verdict == 'problem'
  # The gap passes 1 x the return at index 2 (step 7000): 15 > 10.
  assert result.since == 7000
  assert '--value_lr' in result.remedy


def test_reconstruction_that_does_not_improve_and_flat_returns():
  history = healthy(image_mse=lambda i, step: 0.02,
                    **{'test/return': lambda i, step: 100.0})
  results = verdicts(history)
  assert results['reconstruction'].verdict == 'problem'
  assert results['test return rises'].verdict == 'watch'


def test_watcher_says_each_problem_once():
  watcher = doctor.Watcher(CONFIG)
  history = healthy(kl=lambda i, step: 4.0 if step < 15000 else 0.2)
  assert watcher.update(history[:10], 10000) == []
  lines = watcher.update(history, 24000)
  assert len(lines) == 1
  assert 'KL (posterior vs prior) is a problem since step 15000' in lines[0]
  assert '--kl_balance 0.8' in lines[0]
  assert watcher.update(history, 24000) == []


def write_run(logdir, history, config=CONFIG):
  logdir.mkdir(parents=True)
  (logdir / 'config.json').write_text(json.dumps(config))
  with (logdir / 'metrics.jsonl').open('w') as f:
    for record in history:
      f.write(json.dumps(record) + '\n')
    f.write('{"step": 24000, "model_l')   # A line cut by a kill.


def run_doctor(logdir):
  return subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.doctor', '--logdir', str(logdir)],
      capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('history,status', [
    (healthy(), 0),
    (healthy(kl=lambda i, step: 0.1), 1),
])
def test_exit_status(tmp_path, history, status):
  write_run(tmp_path / 'run', history)
  result = run_doctor(tmp_path / 'run')
  assert result.returncode == status, result.stdout + result.stderr
  assert 'Health of the run at step 24000' in result.stdout
  assert ('problem: KL' in result.stdout) == (status == 1)


def test_bad_logdir_is_one_line(tmp_path):
  result = run_doctor(tmp_path / 'nothing')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'no metrics.jsonl' in result.stderr
