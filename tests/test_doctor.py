"""The health checks on synthetic metric histories made to show each
pathology, on a healthy one and on a short one; the command's exit status."""

import json
import math
import subprocess
import sys

import pytest

from dreamer_tf import doctor

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).

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
  flat = {'test/return': lambda i, step: 100.0 + (i % 4)}
  history = healthy(action_sat=lambda i, step: 0.99,
                    **{'test/action_sat': lambda i, step: 1.0}, **flat)
  results = verdicts(history)
  # Saturated samples in imagination alone are worth a look, not a problem
  # (runs that learn sit near 0.98); a saturated evaluation policy whose
  # test return does not rise is.
  assert results['imagined actions'].verdict == 'watch'
  assert results['policy actions'].verdict == 'problem'
  assert results['policy actions'].since == 5000
  assert '--actor_lr' in results['policy actions'].remedy
  # The same saturation with test returns that rise (150 -> 330): the
  # policy learns, bang-bang.
  history = healthy(**{'test/action_sat': lambda i, step: 1.0})
  assert verdicts(history)['policy actions'].verdict == 'ok'
  # Between the thresholds: watch when the return is flat, else ok.
  history = healthy(**{'test/action_sat': lambda i, step: 0.7}, **flat)
  assert verdicts(history)['policy actions'].verdict == 'watch'
  history = healthy(**{'test/action_sat': lambda i, step: 0.7})
  assert verdicts(history)['policy actions'].verdict == 'ok'
  # Discrete actions have no saturation checks.
  names = verdicts(history, dict(CONFIG, action_dist='onehot'))
  assert 'imagined actions' not in names and 'policy actions' not in names


def with_evaluations(history, evaluations):
  """`history` with its evaluation records replaced by `evaluations`, a
  list of (step, test/return, test/action_sat), in step order."""
  train = [r for r in history if 'test/return' not in r]
  tests = [{'step': step, 'test/return': ret, 'test/action_sat': sat}
           for step, ret, sat in evaluations]
  return sorted(train + tests, key=lambda r: r['step'])


# Issue 19 item 10: dmc_walker_walk --preset cpu (evaluations every 2000
# steps from the prefill at 5000). The evaluation policy stayed saturated
# (0.92-1.0) while its test return rose from 14-30 (6k-10k steps) to 211 and
# 153 (16k, 18k). The returns at 5k, 12k and 14k were not given: the flat
# 30, the worst case for the check, stands in for them.
WALKER_SAT = [1.0, 0.97, 0.92, 0.95, 0.99, 0.96, 0.93, 0.98, 1.0, 0.94]
WALKER_LEARNS = list(zip(
    [5000, 6000, 8000, 10000, 12000, 14000, 16000, 18000],
    [30.0, 14.0, 30.0, 22.0, 30.0, 30.0, 211.0, 153.0], WALKER_SAT))
# The same policy, its return flat at the untrained 14-30 to the end.
WALKER_STUCK = list(zip(
    [5000, 6000, 8000, 10000, 12000, 14000, 16000, 18000, 20000, 22000,
     24000],
    [30.0, 14.0, 30.0, 22.0, 30.0, 14.0, 22.0, 30.0, 30.0, 14.0, 30.0],
    WALKER_SAT + [0.97]))


def policy_verdicts(evaluations, config=CONFIG):
  """The policy-actions Result after each evaluation, as the run's Watcher
  sees the history then."""
  history = with_evaluations(healthy(), evaluations)
  results = []
  for step, _, _ in evaluations:
    seen = [r for r in history if r['step'] <= step]
    results.append(verdicts(seen, config)['policy actions'])
  return results


def test_a_saturated_policy_whose_return_rises_is_no_problem():
  results = policy_verdicts(WALKER_LEARNS)
  # Too early for 4 evaluations; then flat and saturated, but before 15
  # train occasions after the prefill (step 20000): watch; rising from the
  # 211 at 16000 on: ok.
  assert [r.verdict for r in results] == ['too early'] * 4 + [
      'watch', 'watch', 'ok', 'ok']
  assert results[4].value == '0.953 (test return 24.67 -> best 30)'
  assert 'best 211' in results[-1].value
  # Without the wait for 15 train occasions (train_every 1: judged from
  # step 5015) its flat start would be called stuck: the wait keeps the
  # check quiet until 14000, the rise from 16000 on.
  hurried = policy_verdicts(WALKER_LEARNS, dict(CONFIG, train_every=1))
  assert [r.verdict for r in hurried][4:] == [
      'problem', 'problem', 'ok', 'ok']
  watcher = doctor.Watcher(CONFIG)
  history = with_evaluations(healthy(), WALKER_LEARNS)
  for step, _, _ in WALKER_LEARNS:
    seen = [r for r in history if r['step'] <= step]
    assert not [line for line in watcher.update(seen, step)
                if 'policy actions' in line]


def test_a_saturated_policy_whose_return_stays_flat_is_stuck():
  results = policy_verdicts(WALKER_STUCK)
  assert [r.verdict for r in results] == ['too early'] * 4 + [
      'watch'] * 4 + ['problem'] * 3
  assert results[-1].since == 5000
  # The run's Watcher says it once, at the first evaluation from step
  # 20000 (prefill 5000 + 15 train occasions of 1000 steps).
  watcher = doctor.Watcher(CONFIG)
  history = with_evaluations(healthy(), WALKER_STUCK)
  said = []
  for step, _, _ in WALKER_STUCK:
    seen = [r for r in history if r['step'] <= step]
    said += [(step, line) for line in watcher.update(seen, step)
             if 'policy actions' in line]
  assert len(said) == 1 and said[0][0] == 20000
  assert 'policy actions is a problem since step 5000' in said[0][1]
  assert 'does not rise' in said[0][1]
  # The same, later in training: train_every sets when the check judges.
  late = policy_verdicts(WALKER_STUCK, dict(CONFIG, train_every=2000))
  assert 'problem' not in {r.verdict for r in late}


def test_policy_actions_on_the_reference_failure_and_edge_cases():
  # The reference on cartpole_balance at CPU settings: every action +-1 and
  # a return of exactly 136 for 30,000 steps.
  steps = range(5000, 35001, 2000)
  stuck = [(step, 136.0, 1.0) for step in steps]
  assert policy_verdicts(stuck)[-1].verdict == 'problem'
  # Unsaturated and flat: watch between 0.5 and 0.9, ok at or below 0.5.
  assert policy_verdicts([(s, 136.0, 0.7) for s in steps])[
      -1].verdict == 'watch'
  assert policy_verdicts([(s, 136.0, 0.5) for s in steps])[
      -1].verdict == 'ok'
  # A run that learned and fell back to the start, saturated: stuck again
  # once its last 5 evaluations show no rise.
  fell = [(step, 300.0 if 13000 <= step <= 17000 else 136.0, 1.0)
          for step in steps]
  results = policy_verdicts(fell)
  assert [r.verdict for r in results] == ['too early'] * 4 + ['ok'] * 7 + [
      'problem'] * 5   # From 27000: the 5 evaluations after 17000.
  assert results[-1].since == 19000
  # Negative returns rise too: -100 -> -50.
  rising = [(step, -100.0 if step < 15000 else -50.0, 1.0) for step in steps]
  assert policy_verdicts(rising)[-1].verdict == 'ok'
  # Too few evaluations: too early, whatever the saturation.
  result = policy_verdicts(stuck[:4])[-1]
  assert result.verdict == 'too early' and result.trend == '4 of 5 evaluations'


def test_rise_of_the_test_returns():
  rises = lambda returns: doctor.returns_rise(returns)[0]
  assert not rises([30.0, 14.0, 30.0, 22.0, 30.0, 14.0, 30.0])
  assert rises([30.0, 14.0, 30.0, 22.0, 30.0, 30.0, 211.0])
  # The best of the last 5 after the first 3, against the first 3's mean.
  assert doctor.returns_rise([10.0, 20.0, 30.0, 100.0, 0.0, 0.0, 0.0, 0.0,
                              0.0]) == (False, 20.0, 0.0)
  assert doctor.returns_rise([10.0, 20.0, 30.0, 34.0, 0.0]) == (
      True, 20.0, 34.0)   # 14 > 0.4 * 34 = 13.6.
  assert not rises([10.0, 20.0, 30.0, 33.0, 0.0])   # 13 < 13.2.
  # Returns near 0: by more than 0.4 (the scale is at least 1).
  assert not rises([0.0, 0.0, 0.0, 0.0, 0.3])
  assert rises([0.0, 0.0, 0.0, 0.0, 0.5])


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


def loss_scaled(history, skipped, scale=1024.0):
  """`history` as a float16 run (loss scaling) logs it: each train record
  has `loss_scale` and every optimizer's `<name>_skipped`, the share of its
  updates skipped in the window: `skipped(index)` for the index-th train
  record."""
  records, index = [], 0
  for record in history:
    record = dict(record)
    if 'model_loss' in record:
      record['loss_scale'] = scale
      for name in ('model', 'actor', 'value'):
        record[f'{name}_skipped'] = skipped(index)
      index += 1
    records.append(record)
  return records


def test_skipped_steps_under_loss_scaling_are_normal():
  finite = lambda history: verdicts(history)['finite numbers']
  # The loss scale settles in the first window (8 of its 100 updates
  # skipped), then one overflow per 2000 updates when it tries to grow.
  history = loss_scaled(healthy(), lambda i: 0.08 if i == 0 else
                        0.01 if i % 20 == 10 else 0.0)
  assert finite(history).verdict == 'ok'
  # Logs written before the norms of skipped updates were left out: an
  # infinite window mean of a norm is a skipped step, not a problem.
  old = loss_scaled(healthy(model_grad_norm=lambda i, step: math.inf if
                            i == 0 else 50.0), lambda i: 0.0)
  old = [{k: v for k, v in r.items() if not k.endswith('_skipped')}
         for r in old]
  assert finite(old).verdict == 'ok'
  # Without loss scaling it still is a problem, and so is a non-finite loss
  # with it.
  plain = [{k: v for k, v in r.items() if k != 'loss_scale'} for r in old]
  assert finite(plain).verdict == 'problem' and finite(plain).since == 5000
  history = loss_scaled(healthy(value_loss=lambda i, step: math.nan if
                                step == 9000 else 3.0), lambda i: 0.0)
  assert finite(history).verdict == 'problem' and finite(history).since == 9000
  # Windows of 2 updates: the loss scale takes three windows to settle.
  history = loss_scaled(healthy(), lambda i: [1.0, 1.0, 0.5][i] if i < 3
                        else 0.0)
  assert finite(history).verdict == 'ok'


def test_many_skipped_steps_under_loss_scaling():
  finite = lambda history: verdicts(history)['finite numbers']
  # Judged on the last 3 windows after the loss scale settled.
  history = loss_scaled(healthy(), lambda i: 0.08 if i == 0 else 0.03 if
                        i >= 17 else 0.0)
  assert finite(history).verdict == 'watch'
  history = loss_scaled(healthy(), lambda i: 0.08 if i == 0 else 0.2 if
                        i >= 15 else 0.0)
  result = finite(history)
  # The mean of the last 3 windows passes 5 % at the first 0.2 (20000).
  assert result.verdict == 'problem' and result.since == 20000
  assert result.value == '0 NaN/Inf, 20.0% skipped'
  # Every update skipped with the loss scale at its floor of 1: no
  # overflow, a gradient that is not finite.
  history = loss_scaled(healthy(), lambda i: 1.0, scale=1.0)
  assert finite(history).verdict == 'problem'


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
