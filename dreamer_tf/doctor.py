"""The Dreamer debugging checklist, read off a run's metrics.

  python -m dreamer_tf.doctor --logdir ./logdir/dmc_walker_walk/dreamer/0

Reads `<logdir>/metrics.jsonl` and `<logdir>/config.json` (of a finished run
or one in progress) and prints one row per check: its recent value, the
trend since the start, a verdict (ok / watch / problem / too early) and the
rule it used; then, for each problem, the remedy and the flag that applies
it. Exit status 0 when no check is a problem, 1 otherwise (2 for bad input).
`dreamer.py` runs the same checks while it trains and prints one line the
first time a check turns into a problem. docs/doctor.md explains every
threshold. Imports no TensorFlow.
"""

import argparse
import json
import math
import pathlib
import sys

from dreamer_tf import rundir

OK, WATCH, PROBLEM, EARLY = 'ok', 'watch', 'problem', 'too early'

# An action entry with |a| above this counts as saturated (at the bounds of
# [-1, 1]); used by the train step's `action_sat` and the episodes'.
SATURATED = 0.99

# Metrics whose non-finite values mean the training diverged.
LOSSES = ('model_loss', 'actor_loss', 'value_loss')
# The optimizers' gradient norms: non-finite when an update was skipped.
# With loss scaling (float16: the records have `loss_scale`) that is an
# overflow, normal, and the run reports the update as skipped
# (`<name>_skipped`, its window mean the share skipped) and leaves its norm
# out of the window's mean; logs written before that have an infinite mean.
# Without loss scaling a non-finite gradient is a problem.
GRAD_NORMS = ('model_grad_norm', 'actor_grad_norm', 'value_grad_norm')
SKIPPED = ('model_skipped', 'actor_skipped', 'value_skipped')

# Config values the checks use, with the defaults of dreamer.py.
DEFAULTS = dict(prefill=5000, train_every=1000, pcont=False, free_nats=3.0,
                action_dist='tanh_normal')


class Result:
  """One check's outcome: `value` and `trend` are short texts for the table,
  `since` the step from which a problem has held."""

  def __init__(self, name, verdict, rule, value='-', trend='-', since=None,
               remedy=None, meaning=None):
    self.name, self.verdict, self.rule = name, verdict, rule
    self.value, self.trend, self.since = value, trend, since
    self.remedy, self.meaning = remedy, meaning

  def __repr__(self):
    return f'Result({self.name!r}, {self.verdict!r}, {self.value!r})'


# ----------------------------------------------------------------------------
# Reading a run.

def read_history(logdir):
  """The records of `<logdir>/metrics.jsonl` in order (dicts with `step`);
  malformed lines (e.g. the last one of a killed run) are skipped."""
  path = pathlib.Path(logdir) / 'metrics.jsonl'
  records = []
  if not path.exists():
    return records
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get('step'), int):
      records.append(record)
  return records


def read_config(logdir):
  """The run's config.json (read by rundir, which owns it) over the
  defaults the checks need."""
  return dict(DEFAULTS, **(rundir.read_config(logdir) or {}))


def series(history, key):
  """(steps, values) of the records that have `key`."""
  pairs = [(r['step'], r[key]) for r in history
           if isinstance(r.get(key), (int, float))]
  return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _mean(values):
  return sum(values) / len(values)


def _streak_start(steps, values, bad):
  """The first step of the trailing run of values for which `bad` holds."""
  since = None
  for step, value in zip(reversed(steps), reversed(values)):
    if not bad(value):
      break
    since = step
  return since


def _trend(values, digits=3, window=3):
  """'start -> now (+x%)' over the means of the first and last `window`."""
  if len(values) < 2:
    return '-'
  first, last = _mean(values[:window]), _mean(values[-window:])
  text = f'{first:.{digits}g} -> {last:.{digits}g}'
  if first and math.isfinite(first) and math.isfinite(last):
    text += f' ({100 * (last - first) / abs(first):+.0f}%)'
  return text


def _too_few(name, rule, values, needed, unit='points'):
  """A 'too early' Result when `values` has fewer than `needed` entries."""
  if len(values) < needed:
    return Result(name, EARLY, rule, trend=f'{len(values)} of {needed} '
                  f'{unit}')
  return None


def _threshold_check(name, history, key, low_is_bad, ok, watch, rule,
                     remedy, meaning, min_points=3, start=0, window=3):
  """A check of the recent mean of `key` against two thresholds: with
  `low_is_bad`, ok >= ok, watch >= watch, else problem (the reverse
  otherwise). Too early with fewer than `min_points` values after `start`."""
  kept = [(s, v) for s, v in zip(*series(history, key)) if s >= start]
  steps, values = [s for s, _ in kept], [v for _, v in kept]
  early = _too_few(name, rule, values, min_points, 'points')
  if early:
    return early
  now = _mean(values[-window:])
  if low_is_bad:
    verdict = OK if now >= ok else WATCH if now >= watch else PROBLEM
    bad = lambda v: v < watch
  else:
    verdict = OK if now <= ok else WATCH if now <= watch else PROBLEM
    bad = lambda v: v > watch
  since = _streak_start(steps, values, bad) if verdict == PROBLEM else None
  return Result(name, verdict, rule, f'{now:.3g}', _trend(values), since,
                remedy, meaning)


# ----------------------------------------------------------------------------
# The checks.

def check_finite(history, config):
  rule = 'no NaN/Inf loss; skipped steps <= 1% (problem > 5%)'
  remedy = ('lower the learning rates (--model_lr, --actor_lr, --value_lr), '
            'keep --grad_clip, or train in --precision 32')
  meaning = 'the training produced non-finite numbers'
  train = [r for r in history if any(k in r for k in LOSSES + GRAD_NORMS)]
  if not train:
    return Result('finite numbers', EARLY, rule, trend='no train step yet')
  scaled = any('loss_scale' in r or any(k in r for k in SKIPPED)
               for r in train)
  # A non-finite loss is never right; a non-finite gradient norm only
  # without loss scaling (with it, an overflow: a skipped update).
  keys = LOSSES if scaled else LOSSES + GRAD_NORMS
  bad = [r['step'] for r in train if _not_finite(r, keys)]
  if any(k in r for r in train for k in SKIPPED):
    rule = ('no NaN/Inf loss; skipped updates <= 1% over the last 3 '
            'windows (problem > 5%), after the loss scale settled')
    steps, shares = _skip_shares(train[_settled(train):])
  else:
    steps = [r['step'] for r in train if _number(r.get('skip_frac'))]
    shares = [r['skip_frac'] for r in train if _number(r.get('skip_frac'))]
  skip = shares[-1] if shares else 0.0
  value = f'{len(bad)} NaN/Inf, {100 * skip:.1f}% skipped'
  if bad:
    return Result('finite numbers', PROBLEM, rule, value, since=bad[0],
                  remedy=remedy, meaning=meaning)
  verdict = OK if skip <= 0.01 else WATCH if skip <= 0.05 else PROBLEM
  since = _streak_start(steps, shares, lambda v: v > 0.05) \
      if verdict == PROBLEM else None
  return Result('finite numbers', verdict, rule, value, since=since,
                remedy=remedy, meaning='many train steps had non-finite '
                'gradients and were skipped')


def _number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _not_finite(record, keys):
  return any(_number(record.get(k)) and not math.isfinite(record[k])
             for k in keys)


def _settled(train):
  """Under loss scaling, the index of the first train record after the loss
  scale settled. It starts high (2**15) and halves on each overflow, the
  update skipped, until the gradients fit (docs/doctor.md): it has settled
  with the first record in which every optimizer applied an update (each
  `<name>_skipped` below 1), or in which it stood at its floor of 1 (then
  a skip is no overflow)."""
  for index, record in enumerate(train):
    skipped = [record[k] for k in SKIPPED if _number(record.get(k))]
    floor = _number(record.get('loss_scale')) and record['loss_scale'] <= 1
    if (skipped and max(skipped) < 1) or floor:
      return index + 1
  return len(train)


def _skip_shares(train, window=3):
  """(steps, shares) under loss scaling: at each record, the share of
  skipped updates over the last `window` records, a record's share being
  that of its most skipping optimizer (the mean of `<name>_skipped`)."""
  steps, own = [], []
  for record in train:
    values = [record[k] for k in SKIPPED if _number(record.get(k))]
    if values:
      steps.append(record['step'])
      own.append(max(values))
  shares = [_mean(own[max(0, i + 1 - window):i + 1])
            for i in range(len(own))]
  return steps, shares


def check_reconstruction(history, config):
  rule = 'image_mse now / first <= 0.5 ok, <= 0.9 watch'
  steps, values = series(history, 'image_mse')
  early = _too_few('reconstruction', rule, values, 4, 'points')
  if early:
    return early
  ratio = _mean(values[-3:]) / values[0] if values[0] else math.inf
  verdict = OK if ratio <= 0.5 else WATCH if ratio <= 0.9 else PROBLEM
  since = _streak_start(steps, values, lambda v: v > 0.9 * values[0]) \
      if verdict == PROBLEM else None
  return Result(
      'reconstruction', verdict, rule, f'{_mean(values[-3:]):.3g}',
      _trend(values), since,
      remedy='train the world model more before acting: --pretrain 1000, '
      'more --train_steps; lower --model_lr if the error grows',
      meaning='the reconstruction error is not falling')


def check_kl(history, config):
  rule = 'kl >= 1 nat (collapse below), <= 10 x max(free_nats, 1)'
  steps, values = series(history, 'kl')
  early = _too_few('KL (posterior vs prior)', rule, values, 3, 'points')
  if early:
    return early
  now = _mean(values[-3:])
  high = 10 * max(float(config['free_nats']), 1.0)
  if now < 1.0:
    return Result(
        'KL (posterior vs prior)', PROBLEM, rule, f'{now:.3g} nats',
        _trend(values), _streak_start(steps, values, lambda v: v < 1.0),
        remedy='KL collapse: more free nats (--free_nats 5), KL balancing '
        '(--kl_balance 0.8), or a smaller --kl_scale',
        meaning='the posterior has collapsed onto the prior: the latent '
        'ignores the images')
  verdict = OK if now <= high else WATCH
  return Result('KL (posterior vs prior)', verdict, rule, f'{now:.3g} nats',
                _trend(values))


def _trained_from(config):
  """The step after which 5 training occasions have passed."""
  return int(config['prefill']) + 5 * int(config['train_every'])


def check_reward(history, config):
  rule = 'reward_corr >= 0.5 ok, >= 0.2 watch (after 5 train occasions)'
  _, returns = series(history, 'train/return')
  if returns and max(abs(r) for r in returns) == 0:
    return Result('reward prediction', EARLY, rule,
                  trend='no reward seen yet')
  return _threshold_check(
      'reward prediction', history, 'reward_corr', True, 0.5, 0.2, rule,
      remedy='train the world model more (--pretrain, --train_steps); '
      'squash large rewards with --clip_rewards tanh',
      meaning='predicted rewards do not follow the true ones',
      start=_trained_from(config))


def check_pcont(history, config):
  rule = 'pcont_acc >= 0.95 ok, >= 0.9 watch (with --pcont)'
  if not config.get('pcont'):
    return None
  return _threshold_check(
      'continuation prediction', history, 'pcont_acc', True, 0.95, 0.9, rule,
      remedy='weigh the continuation loss more: --pcont_scale 20',
      meaning='predicted episode ends do not match the terminations',
      start=_trained_from(config))


def check_imagined_actions(history, config):
  # Never a problem on its own: runs that learn sit at 0.98 (docs/doctor.md);
  # the policy-actions check below is the one that catches a stuck actor.
  rule = 'action_sat <= 0.9 ok, else watch (untrained: 0.6)'
  if config.get('action_dist') != 'tanh_normal':
    return None
  return _threshold_check(
      'imagined actions', history, 'action_sat', False, 0.9, 1.0, rule,
      remedy='lower --actor_lr, or train the model longer first (--pretrain)',
      meaning='the actor samples almost only actions at the bounds')


# The policy-actions check calls a saturated evaluation policy stuck only
# once the run has trained this many occasions after the prefill without
# its test return rising (docs/doctor.md).
STUCK_AFTER = 15


def _beats(value, start, margin=0.4):
  """Whether a test return `value` is clearly above `start`: by more than
  `margin` times the larger magnitude of the two (at least 1)."""
  return value - start > margin * max(abs(start), abs(value), 1.0)


def returns_rise(returns, first=3, last=5):
  """Whether the test returns rose: the best of the `last` evaluations
  after the `first` ones beats the mean of the `first` (`_beats`: for
  positive returns, by a factor of more than 1 / (1 - 0.4) = 1.67). The
  best, not a mean: single test episodes are noisy, and a policy that
  learns has some clearly better episodes, a stuck one none
  (docs/doctor.md). Returns (rises, start, best)."""
  start = _mean(returns[:first])
  best = max(returns[first:][-last:])
  return _beats(best, start), start, best


def check_policy_actions(history, config):
  rule = (f'test/action_sat > 0.9 and no rise in test/return after '
          f'{STUCK_AFTER} train occasions: problem; <= 0.5 or rising: ok')
  if config.get('action_dist') != 'tanh_normal':
    return None
  steps, values = series(history, 'test/action_sat')
  return_steps, returns = series(history, 'test/return')
  early = _too_few('policy actions', rule, values, 5, 'evaluations')
  if early or len(returns) < 5:
    return early or Result('policy actions', EARLY, rule,
                           trend=f'{len(returns)} of 5 test returns')
  now = _mean(values[-3:])
  rises, start, best = returns_rise(returns)
  value = f'{now:.3g} (test return {start:.4g} -> best {best:.4g})'
  # A bang-bang policy (at the bounds) is how Dreamer often acts on walker
  # tasks: saturation is a problem only when the policy does not learn.
  if now <= 0.5 or rises:
    return Result('policy actions', OK, rule, value, _trend(values))
  trained = int(config['prefill']) + STUCK_AFTER * int(config['train_every'])
  if now <= 0.9 or steps[-1] < trained:
    return Result('policy actions', WATCH, rule, value, _trend(values))
  # Stuck since the saturation began, or since the last evaluation with a
  # clearly better return than the start, if later.
  since = _streak_start(steps, values, lambda v: v > 0.9)
  good = [s for s, r in zip(return_steps[3:], returns[3:]) if _beats(r, start)]
  after = next((s for s in steps if good and s > good[-1]), None)
  if since is None or (after is not None and after > since):
    since = after
  return Result(
      'policy actions', PROBLEM, rule, value, _trend(values), since,
      remedy='lower --actor_lr, train the model longer first (--pretrain), '
      'or a smaller --action_init_std',
      meaning='the evaluation policy is stuck at the action bounds and its '
      'test return does not rise')


def check_values(history, config):
  rule = 'value_gap / max(|return_mean|, 1) <= 0.25 ok, <= 1 watch'
  steps, gaps = series(history, 'value_gap')
  _, returns = series(history, 'return_mean')
  early = _too_few('values vs returns', rule, gaps, 5, 'points')
  if early:
    return early
  ratios = [g / max(abs(r), 1.0) for g, r in zip(gaps, returns)]
  history_ratio = [dict(step=s, ratio=x) for s, x in zip(steps, ratios)]
  result = _threshold_check(
      'values vs returns', history_ratio, 'ratio', False, 0.25, 1.0, rule,
      remedy='a lower or higher --value_lr, a longer --horizon, or check '
      '--discount',
      meaning='the critic is off the scale of the lambda returns',
      min_points=5)
  result.value = (f'{result.value} (gap {_mean(gaps[-3:]):.3g}, return '
                  f'{_mean(returns[-3:]):.3g})')
  return result


def check_model_loss(history, config):
  rule = 'model_loss lower than at the start'
  steps, values = series(history, 'model_loss')
  early = _too_few('model loss falls', rule, values, 4, 'points')
  if early:
    return early
  falling = _mean(values[-3:]) < _mean(values[:3])
  return Result('model loss falls', OK if falling else WATCH, rule,
                f'{_mean(values[-3:]):.6g}', _trend(values, digits=6))


def check_return(history, config):
  rule = 'test/return of the last 3 evals above the first 3'
  steps, values = series(history, 'test/return')
  early = _too_few('test return rises', rule, values, 4, 'evaluations')
  if early:
    return early
  rising = _mean(values[-3:]) > _mean(values[:3])
  return Result('test return rises', OK if rising else WATCH, rule,
                f'{_mean(values[-3:]):.4g}', _trend(values, digits=4))


CHECKS = (check_finite, check_reconstruction, check_kl, check_reward,
          check_pcont, check_imagined_actions, check_policy_actions,
          check_values, check_model_loss, check_return)


def diagnose(history, config):
  """Every applicable check's Result for a list of metric records."""
  config = dict(DEFAULTS, **config)
  results = [check(history, config) for check in CHECKS]
  return [r for r in results if r is not None]


class Watcher:
  """Runs the checks during training; `update(history, step)` returns one
  line for each check that became a problem since the last call (each check
  is reported once per process)."""

  def __init__(self, config):
    self._config = dict(DEFAULTS, **config)
    self._reported = set()

  def update(self, history, step):
    lines = []
    for result in diagnose(history, self._config):
      if result.verdict == PROBLEM and result.name not in self._reported:
        self._reported.add(result.name)
        since = result.since if result.since is not None else step
        lines.append(
            f'[{step}] doctor: {result.name} is a problem since step '
            f'{since} ({result.meaning}; {result.value}). Remedy: '
            f'{result.remedy}.')
    return lines


# ----------------------------------------------------------------------------
# The command.

def format_table(results, step):
  head = ('check', 'now', 'trend (start -> now)', 'verdict', 'rule')
  rows = [(r.name, r.value, r.trend, r.verdict, r.rule) for r in results]
  widths = [max(len(str(row[i])) for row in [head] + rows)
            for i in range(len(head))]
  fmt = lambda row: '  '.join(str(c).ljust(w)
                              for c, w in zip(row, widths)).rstrip()
  lines = [f'Health of the run at step {step}:', fmt(head),
           fmt(['-' * w for w in widths])]
  lines += [fmt(row) for row in rows]
  problems = [r for r in results if r.verdict == PROBLEM]
  if problems:
    lines.append('')
    for r in problems:
      lines.append(f'problem: {r.name} since step {r.since}: {r.meaning}.')
      lines.append(f'  remedy: {r.remedy}.')
  else:
    early = [r.name for r in results if r.verdict == EARLY]
    lines.append('')
    lines.append('No problems' + (
        f'; too early to tell for {len(early)} of {len(results)} checks '
        '(too few points).' if early else '.'))
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m dreamer_tf.doctor', description=__doc__.split('\n')[0])
  parser.add_argument('--logdir', required=True,
                      help='The run folder (holds metrics.jsonl).')
  args = parser.parse_args(argv)
  logdir = pathlib.Path(args.logdir).expanduser()
  if not (logdir / 'metrics.jsonl').exists():
    print(f'doctor: error: no metrics.jsonl in {logdir}: is it a run folder '
          '(dreamer.py --logdir)?', file=sys.stderr)
    return 2
  try:
    config = read_config(logdir)
  except rundir.LogdirError as error:
    print(f'doctor: error: {error}', file=sys.stderr)
    return 2
  history = read_history(logdir)
  step = history[-1]['step'] if history else 0
  results = diagnose(history, config)
  print(format_table(results, step))
  return 1 if any(r.verdict == PROBLEM for r in results) else 0


if __name__ == '__main__':
  sys.exit(main())
