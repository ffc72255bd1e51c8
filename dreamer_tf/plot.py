"""Plot our test returns against the Dreamer paper's learning curves.

  python -m dreamer_tf.plot --logdir ./logdir --out plots/

Runs are folders holding a ``metrics.jsonl`` (one JSON object per line, each
with an integer ``step`` = environment steps; lines with ``test/return`` are
evaluation returns). The usual layout is ``<logdir>/<task>/<method>/<seed>/``;
``--logdir`` may also point at a task folder, a run folder or the file itself.

For each task this writes ``<out>/<task>.png``: every seed as a thin line, the
mean over seeds as a thick line (one colour per method: ours, the reference
implementation's runs or any other method folder), the paper's Dreamer mean
with its min-max band over seeds, and other methods' final scores from the
paper as dashed horizontal lines. It then prints a table of each method's
return and the paper's mean at 1e5, 5e5 and 1e6 steps (``<out>/summary.csv``)
and the statistics (``<out>/statistics.csv``): per task and step the mean over
seeds with a 95 % bootstrap interval, and across tasks the mean, median and
interquartile mean with stratified bootstrap intervals, for each method and
for the paper's seeds on the same tasks (``statistics``; how each number is
taken: docs/reproduce.md). Runs of one method that came from different
commits or TensorFlow versions (their ``provenance.jsonl``) get one warning.

Milestone rules (see ``run_value`` and ``paper_scores``):
 ours:  per seed, the last test return logged at a step <= milestone, counted
    only if the run logged anything at a step >= milestone; the table
    shows the mean over the seeds that count and how many they are.
 paper: per paper seed, the return at the logged step nearest the milestone,
    if that step is within 50,000 steps of it, averaged over those seeds.

The format of metrics.jsonl is also the reference implementation's
(danijar/dreamer: episode lines {"step", "test/return", "test/length",
"episodes"}; training lines may hold Infinity or NaN, which are read and
ignored), so its runs can be put in a method folder beside ours.

This module deliberately does not import TensorFlow, imports scipy only for
the bootstrap and matplotlib only when drawing (with the Agg canvas, no
pyplot, no global backend change).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCORES = Path(__file__).resolve().parent / 'scores'
MILESTONES = (100_000, 500_000, 1_000_000)
RETURN_KEY = 'test/return'
# A paper seed has a score at a step if it logged a point this close to it:
# half the paper's logging interval of 1e5 steps (see `paper_scores`).
PAPER_TOLERANCE = 50_000
# The bootstrap: its confidence level, resamples, and the seed of the
# generator of each call (fixed, so the same runs give the same intervals).
CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass
class Run:
  """One training run: its identity, folder and test-return curve."""
  task: str
  method: str
  seed: str
  dir: Path
  steps: np.ndarray    # env steps of the test returns, ascending
  returns: np.ndarray  # test returns at those steps
  last_step: float     # largest step logged by the run (any metric), or nan


# ----------------------------------------------------------------- our runs

def _parse_line(line):
  """Return the record of one metrics line, or None if it is malformed."""
  try:
    rec = json.loads(line)
  except ValueError:
    return None
  if not isinstance(rec, dict) or not _is_number(rec.get('step')):
    return None
  if RETURN_KEY in rec and not _is_number(rec[RETURN_KEY]):
    return None
  return rec


def _is_number(x):
  return (isinstance(x, (int, float)) and not isinstance(x, bool)
          and math.isfinite(x))


def read_metrics(path):
  """Read a metrics.jsonl: (test steps, test returns, last logged step).

  Malformed lines (e.g. a last line truncated by a crash) are skipped with
  one warning per file on stderr. Arrays are sorted by step (stable, so a
  step logged twice keeps the later value last). last_step is nan if the
  file has no valid line.
  """
  steps, returns, last, bad = [], [], -math.inf, []
  with open(path, encoding='utf-8', errors='replace') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      rec = _parse_line(line)
      if rec is None:
        bad.append(lineno)
        continue
      last = max(last, rec['step'])
      if RETURN_KEY in rec:
        steps.append(rec['step'])
        returns.append(rec[RETURN_KEY])
  if bad:
    print(f'warning: {path}: skipped {len(bad)} malformed line(s) '
          f'(line {", ".join(map(str, bad[:5]))}'
          f'{", ..." if len(bad) > 5 else ""})', file=sys.stderr)
  order = np.argsort(steps, kind='stable')
  return (np.asarray(steps, float)[order], np.asarray(returns, float)[order],
          last if last > -math.inf else math.nan)


def load_curve(path):
  """Test-return curve of a metrics.jsonl (or its run folder):
  (steps, returns)."""
  path = Path(path)
  if path.is_dir():
    path = path / 'metrics.jsonl'
  steps, returns, _ = read_metrics(path)
  return steps, returns


def _identify(run_dir):
  """(task, method, seed) of a run folder.

  Method and seed are the last two components of the absolute path, the task
  the one before. If the run folder has a config.json with a string "task",
  that task wins (it is what the run trained on, and it covers paths too
  short to hold the layout). Missing components become '?'.
  """
  parts = ('?', '?', '?') + Path(run_dir).resolve().parts[1:]
  task, method, seed = parts[-3:]
  return _config_task(run_dir) or task, method, seed


def _config_task(run_dir):
  try:
    task = json.loads((Path(run_dir) / 'config.json').read_text()).get('task')
  except (OSError, ValueError, AttributeError):
    return None
  return task if isinstance(task, str) and task else None


def find_runs(logdir):
  """All runs under logdir (a logdir, task folder, run folder or metrics file).

  Returns Run objects sorted by (task, method, seed), including runs that
  have no test return yet (their arrays are empty). Unreadable files are
  skipped with a warning.
  """
  logdir = Path(logdir)
  files = ([logdir] if logdir.is_file()
           else sorted(logdir.rglob('metrics.jsonl')))
  runs = []
  for file in files:
    try:
      steps, returns, last = read_metrics(file)
    except OSError as e:
      print(f'warning: cannot read {file}: {e}', file=sys.stderr)
      continue
    task, method, seed = _identify(file.parent)
    runs.append(Run(task, method, seed, file.parent, steps, returns, last))
  return sorted(runs, key=lambda r: (r.task, r.method, _seed_key(r.seed)))


def _seed_key(seed):
  return (0, int(seed), '') if seed.isdigit() else (1, 0, seed)


def run_value(run, milestone):
  """Last test return at a step <= milestone, if the run reached milestone."""
  if not run.last_step >= milestone:  # also False for nan
    return None
  i = np.searchsorted(run.steps, milestone, side='right') - 1
  return float(run.returns[i]) if i >= 0 else None


def mean_curve(curves):
  """Mean of several (steps, returns) curves: (grid, mean).

  The grid is the union of their steps up to where the shortest one ends;
  each curve is linearly interpolated onto it.
  """
  end = min(steps[-1] for steps, _ in curves)
  grid = np.unique(np.concatenate([steps for steps, _ in curves]))
  grid = grid[grid <= end]
  return grid, np.mean([np.interp(grid, s, r) for s, r in curves], axis=0)


# ------------------------------------------------------------ paper scores

@functools.lru_cache(maxsize=None)
def _paper_records():
  return json.loads((SCORES / 'dreamer.json').read_text())


@functools.lru_cache(maxsize=None)
def _baseline_scores():
  return json.loads((SCORES / 'baselines.json').read_text())


def _paper_key(task, known):
  """The name of task in the score files ('cartpole_balance' -> 'dmc_...')."""
  for name in (task, 'dmc_' + task):
    if name in known:
      return name
  return None


def paper_seeds(task):
  """The paper's Dreamer curves of task as a list of (xs, ys) arrays."""
  key = _paper_key(task, {r['task'] for r in _paper_records()})
  return [(np.asarray(r['xs'], float), np.asarray(r['ys'], float))
          for r in _paper_records()
          if r['task'] == key and r['method'] == 'dreamer']


def paper_curve(task):
  """Paper's Dreamer curve of task: (xs, mean, min, max) over its seeds.

  At each step the statistics use the seeds that logged that step (some
  paper seeds stop earlier than others). Returns None if there is no data.
  """
  seeds = paper_seeds(task)
  if not seeds:
    return None
  xs = np.unique(np.concatenate([x for x, _ in seeds]))
  cols = [[y[x == step][0] for x, y in seeds if np.any(x == step)]
          for step in xs]
  return (xs, np.array([np.mean(c) for c in cols]),
          np.array([np.min(c) for c in cols]),
          np.array([np.max(c) for c in cols]))


def paper_scores(task, step):
  """Per paper seed, its return at its logged step nearest step, for the
  seeds that logged a step within PAPER_TOLERANCE of it (a seed that stopped
  earlier does not count); a list, empty if none (or no data)."""
  scores = []
  for x, y in paper_seeds(task):
    i = np.argmin(np.abs(x - step)) if len(x) else None
    if i is not None and abs(x[i] - step) <= PAPER_TOLERANCE:
      scores.append(float(y[i]))
  return scores


def paper_value(task, milestone):
  """Mean over paper seeds of `paper_scores`, or None if there are none."""
  scores = paper_scores(task, milestone)
  return float(np.mean(scores)) if scores else None


def paper_final_step(task):
  """The last step the paper logged for task (over its seeds), or None."""
  seeds = paper_seeds(task)
  return float(max(x[-1] for x, _ in seeds)) if seeds else None


def baselines(task):
  """Final scores of other methods on task: {method: score} (maybe empty)."""
  key = _paper_key(task, _baseline_scores())
  return dict(_baseline_scores().get(key, {})) if key else {}


# ------------------------------------------------------------------- table

def _by(runs, *fields):
  """Group runs by the given attributes, keeping their order."""
  groups = {}
  for run in runs:
    groups.setdefault(tuple(getattr(run, f) for f in fields), []).append(run)
  return groups


def milestone_table(runs, milestones=MILESTONES):
  """One row per (task, method): ours and the paper's return at milestones.

  Each row is {'task', 'method', 'seeds', 'milestones': [{'step', 'ours',
  'n', 'paper'}, ...]} where ours is the mean over the n seeds that reached
  the step (None if n == 0) and paper the paper's mean (None if no data).
  Both are taken at the step the paper logged nearest the milestone
  (`paper_step`: 1.05e5 for 1e5 on the DMC tasks), so that ours is not one
  evaluation earlier than the paper's point.
  """
  rows = []
  for (task, method), group in _by(runs, 'task', 'method').items():
    cells = []
    for m in milestones:
      at = paper_step(task, m)
      vals = [v for v in (run_value(r, at) for r in group) if v is not None]
      cells.append({'step': m, 'ours': float(np.mean(vals)) if vals else None,
                    'n': len(vals), 'paper': paper_value(task, m)})
    rows.append({'task': task, 'method': method, 'seeds': len(group),
                 'milestones': cells})
  return rows


def _step_name(step):
  """100000 -> '1e5', 2500000 -> '2.5e6'."""
  exp = int(math.floor(math.log10(step))) if step > 0 else 0
  mant = step / 10 ** exp
  return f'{mant:g}e{exp}'


def format_table(rows):
  """Text table; columns separated by at least two spaces, '-' = no value."""
  steps = [c['step'] for c in rows[0]['milestones']] if rows else MILESTONES
  head = ['task', 'method', 'seeds']
  for s in steps:
    head += [f'ours@{_step_name(s)}', f'paper@{_step_name(s)}']
  body = []
  for row in rows:
    line = [row['task'], row['method'], str(row['seeds'])]
    for c in row['milestones']:
      line.append('-' if c['ours'] is None else f"{c['ours']:.0f} (n={c['n']})")
      line.append('-' if c['paper'] is None else f"{c['paper']:.0f}")
    body.append(line)
  widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
  fmt = lambda r: '  '.join(c.ljust(w) if i < 2 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))
  return '\n'.join(fmt(r).rstrip() for r in [head] + body)


def write_csv(rows, path):
  """Write the milestone table in long form: one line per row and step."""
  with open(path, 'w', newline='') as f:
    out = csv.writer(f, lineterminator='\n')
    out.writerow(['task', 'method', 'seeds', 'step', 'ours', 'n', 'paper'])
    for row in rows:
      for c in row['milestones']:
        out.writerow([row['task'], row['method'], row['seeds'], c['step'],
                      '' if c['ours'] is None else round(c['ours'], 2), c['n'],
                      '' if c['paper'] is None else round(c['paper'], 2)])


# -------------------------------------------------------------- statistics
#
# The scores: per (task, method, step) one score per seed of ours
# (`run_value`: its last test episode at a step <= the step, if the run
# reached it) and per paper seed (`paper_scores`). The steps are the
# paper's logged steps nearest the milestones and its final step of the
# task (`stat_steps`). docs/reproduce.md says it all in prose.

@dataclass
class Estimate:
  """A point estimate with its bootstrap interval.

  value is None when there is no score; low and high are None when there is
  no interval (a sample with fewer than 2 seeds: shown as n/a). n counts the
  seeds (per task) or the tasks (across tasks).
  """
  value: float | None
  low: float | None
  high: float | None
  n: int


def iqm(x, weights=None, axis=-1):
  """Interquartile mean: the mean of the middle 50 % of the scores.

  Precisely: sort the scores and give each its weight (all equal if
  weights is None; weights are normalised to sum to 1), so that score i
  covers the interval [c_i - w_i, c_i] of [0, 1], c_i being the cumulative
  weight. The IQM is the average of the scores over [0.25, 0.75]: score i
  counts with the length of the overlap of its interval with [0.25, 0.75].
  With n equal weights and n divisible by 4 this is the mean of the middle
  n/2 scores, the same as scipy.stats.trim_mean(x, 0.25). Otherwise the two
  scores at the quartiles count in part: for n = 5 the IQM is
  0.3 x(2) + 0.4 x(3) + 0.3 x(4) (sorted x(1) <= ... <= x(5)), where
  trim_mean drops int(0.25 n) = 1 whole score at each end and gives
  (x(2) + x(3) + x(4)) / 3; for n = 9 the two boundary scores count 0.75
  each (9 / 4 = 2.25 scores per quarter). Ties get the same result in any
  order. Vectorised along axis; weights has the length of that axis.
  """
  x = np.moveaxis(np.asarray(x, float), axis, -1)
  w = np.ones(x.shape[-1]) if weights is None else np.asarray(weights, float)
  w = w / w.sum()
  order = np.argsort(x, axis=-1, kind='stable')
  xs, ws = np.take_along_axis(x, order, axis=-1), w[order]
  upper = np.cumsum(ws, axis=-1)
  overlap = np.clip(np.minimum(upper, 0.75) - np.maximum(upper - ws, 0.25),
                    0, None)
  return np.sum(overlap * xs, axis=-1) / np.sum(overlap, axis=-1)


def mean_over_tasks(*tasks, axis=-1):
  """Mean over tasks of each task's mean over its seeds (one array of seed
  scores per task; each task weighs the same)."""
  return np.mean(_task_means(tasks, axis), axis=0)


def median_over_tasks(*tasks, axis=-1):
  """Median over tasks of each task's mean over its seeds (the mean of the
  two middle tasks for an even number of tasks)."""
  return np.median(_task_means(tasks, axis), axis=0)


def iqm_over_tasks(*tasks, axis=-1):
  """`iqm` of the pooled seed scores of all tasks, each score weighted 1 /
  (tasks * seeds of its task), so each task weighs the same whatever its
  number of seeds; with the same number of seeds everywhere this is the
  plain IQM of the pooled scores (Agarwal et al. 2021)."""
  tasks = [np.moveaxis(np.asarray(t, float), axis, -1) for t in tasks]
  weights = np.concatenate([np.full(t.shape[-1], 1 / t.shape[-1])
                            for t in tasks])
  return iqm(np.concatenate(tasks, axis=-1), weights)


def _task_means(tasks, axis):
  return np.stack([np.mean(t, axis=axis) for t in tasks])


AGGREGATES = {'mean': mean_over_tasks, 'median': median_over_tasks,
              'IQM': iqm_over_tasks}


def bootstrap_interval(samples, statistic):
  """The CONFIDENCE percentile bootstrap interval of statistic(*samples).

  scipy.stats.bootstrap with paired=False resamples each sample (array)
  with replacement independently, keeping its size, RESAMPLES times, from a
  generator seeded with BOOTSTRAP_SEED. With one sample per task this is a
  stratified bootstrap: seeds are resampled within their task, every
  resample keeps every task and its number of seeds. statistic takes one
  array per sample and an axis keyword. Returns (low, high), or (None,
  None) when a sample has fewer than 2 scores.
  """
  samples = [np.asarray(s, float) for s in samples]
  if not samples or min(len(s) for s in samples) < 2:
    return None, None
  from scipy import stats
  res = stats.bootstrap(samples, statistic, n_resamples=RESAMPLES,
                        paired=False, vectorized=True,
                        confidence_level=CONFIDENCE, method='percentile',
                        rng=np.random.default_rng(BOOTSTRAP_SEED))
  return (float(res.confidence_interval.low),
          float(res.confidence_interval.high))


def seed_estimate(scores):
  """Mean over seeds with its bootstrap interval (n/a below 2 seeds)."""
  if not len(scores):
    return Estimate(None, None, None, 0)
  low, high = bootstrap_interval([scores], _mean)
  return Estimate(float(np.mean(scores)), low, high, len(scores))


def _mean(x, axis=-1):
  return np.mean(x, axis=axis)


def task_estimate(per_task, name):
  """AGGREGATES[name] over per_task (one array of seed scores per task) with
  its stratified bootstrap interval (n/a if a task has fewer than 2)."""
  if not per_task:
    return Estimate(None, None, None, 0)
  statistic = AGGREGATES[name]
  low, high = bootstrap_interval(per_task, statistic)
  return Estimate(float(statistic(*per_task)), low, high, len(per_task))


def stat_steps(task, milestones=MILESTONES):
  """(label, step) pairs of task: each milestone (label '1e5' etc.) at the
  paper's logged step nearest it (`paper_step`), then 'final', the paper's
  last logged step, if the paper has the task."""
  steps = [(_step_name(m), paper_step(task, m)) for m in milestones]
  final = paper_final_step(task)
  return steps + [('final', final)] if final is not None else steps


def paper_step(task, milestone):
  """The step the paper logged nearest milestone (within PAPER_TOLERANCE),
  else milestone itself: 1e5 -> 1.05e5 for the DMC tasks, whose points lie
  at 5e3 + k * 1e5. Our evaluations with the default --prefill 5000 and
  --eval_every 1e4 lie at 5e3 + k * 1e4, so both are scored at one step."""
  seeds = paper_seeds(task)
  if not seeds:
    return milestone
  xs = np.unique(np.concatenate([x for x, _ in seeds]))
  nearest = float(xs[np.argmin(np.abs(xs - milestone))])
  return nearest if abs(nearest - milestone) <= PAPER_TOLERANCE else milestone


def run_scores(runs, step):
  """The `run_value` of each run that has one at step."""
  return [v for v in (run_value(r, step) for r in runs) if v is not None]


def statistics(runs, milestones=MILESTONES):
  """Per task and across tasks, ours (per method) and the paper's.

  Returns {'methods': [...], 'per_task': [...], 'across': [...], 'left_out':
  [...]}. A per_task row is {'task', 'label', 'step', 'cells': {method or
  'paper': Estimate}} (`seed_estimate` of the seed scores). An across row
  is {'method', 'label', 'statistic', 'tasks': [...], 'ours': Estimate,
  'paper': Estimate}: the statistic (AGGREGATES) over the tasks that have
  paper data (DMC: returns on one 0-1000 scale) and at least one score of
  the method and one of the paper at that step, the same tasks for both.
  left_out names the tasks without paper data, not aggregated.
  """
  methods = [method for (method,) in _by(runs, 'method')]
  per_task, scores = [], {}
  for (task,), group in _by(runs, 'task').items():
    by_method = {m: g for (m,), g in _by(group, 'method').items()}
    for label, step in stat_steps(task, milestones):
      cells = {}
      for method in methods:
        ours = run_scores(by_method.get(method, []), step)
        cells[method] = seed_estimate(ours)
        scores[task, label, method] = ours
      paper = paper_scores(task, step)
      cells['paper'] = seed_estimate(paper)
      scores[task, label, 'paper'] = paper
      per_task.append(dict(task=task, label=label, step=step, cells=cells))
  tasks = [t for (t,) in _by(runs, 'task')]
  left_out = [t for t in tasks if paper_final_step(t) is None]
  labels = [_step_name(m) for m in milestones] + ['final']
  across = []
  for method in methods:
    for label in labels:
      common = [t for t in tasks if scores.get((t, label, method))
                and scores.get((t, label, 'paper'))]
      if not common:
        continue
      for name in AGGREGATES:
        across.append(dict(
            method=method, label=label, statistic=name, tasks=common,
            ours=task_estimate([scores[t, label, method] for t in common],
                               name),
            paper=task_estimate([scores[t, label, 'paper'] for t in common],
                                name)))
  return dict(methods=methods, per_task=per_task, across=across,
              left_out=left_out)


def _cell(est, count='n'):
  """'500 [400, 600] n=2', '400 [n/a] n=1' or '-' (no score)."""
  if est.value is None:
    return '-'
  ci = ('n/a' if est.low is None
        else f'{est.low:.0f}, {est.high:.0f}')
  return f'{est.value:.0f} [{ci}] {count}={est.n}'


def _columns(head, body, indent='  '):
  widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
  return [indent + '  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
          for r in [head] + body]


def format_statistics(stats):
  """The two statistics tables as text (every table line indented)."""
  level = f'{CONFIDENCE:.0%}'
  head = ['task', 'step'] + stats['methods'] + ['paper']
  body = [[row['task'], row['label']]
          + [_cell(row['cells'][m]) for m in stats['methods'] + ['paper']]
          for row in stats['per_task']]
  steps = {}
  for row in stats['per_task']:
    if row['task'] not in stats['left_out']:
      steps.setdefault(row['label'], set()).add(_step_name(row['step']))
  at = ', '.join(f"{label} at {' or '.join(sorted(names))}"
                 for label, names in steps.items())
  lines = [f'Per task: mean test return over seeds [{level} bootstrap '
           'interval] n=seeds; n/a: fewer than 2 seeds.',
           "Scored at the paper's logged steps (final: its last): "
           + (at or '-') + (' (tasks without paper data: at the milestones)'
                            if stats['left_out'] else '')
           + '. How: docs/reproduce.md.']
  lines += _columns(head, body)
  lines += ['', f'Across tasks: over seeds and tasks [{level} stratified '
            'bootstrap interval] tasks=number of tasks; the paper on the '
            'same tasks.']
  if stats['across']:
    head = ['method', 'step', 'statistic', 'ours', 'paper']
    body = [[r['method'], r['label'], r['statistic'],
             _cell(r['ours'], 'tasks'), _cell(r['paper'], 'tasks')]
            for r in stats['across']]
    lines += _columns(head, body)
  else:
    lines.append('  none: no task has scores of ours and of the paper.')
  if stats['left_out']:
    lines.append('  Left out (no paper data, maybe not on the 0-1000 scale): '
                 + ', '.join(stats['left_out']) + '.')
  return '\n'.join(lines)


def write_statistics_csv(stats, path):
  """Both statistics tables in long form, one line per estimate.

  scope is 'task' (per task: statistic 'mean', n = seeds) or 'tasks'
  (across tasks: n = tasks, listed in task separated by ';'). method is a
  method of ours or 'paper'; for the paper across tasks, of names the
  method whose tasks it is on. Empty low/high: no interval.
  """
  def fmt(x):
    return '' if x is None else round(x, 2)
  with open(path, 'w', newline='') as f:
    out = csv.writer(f, lineterminator='\n')
    out.writerow(['scope', 'task', 'method', 'of', 'step', 'step_label',
                  'statistic', 'value', 'low', 'high', 'n'])
    for row in stats['per_task']:
      for method, est in row['cells'].items():
        out.writerow(['task', row['task'], method, '', int(row['step']),
                      row['label'], 'mean', fmt(est.value), fmt(est.low),
                      fmt(est.high), est.n])
    for row in stats['across']:
      steps = {s['step'] for s in stats['per_task']
               if s['label'] == row['label'] and s['task'] in row['tasks']}
      step = int(steps.pop()) if len(steps) == 1 else ''
      for method, of, est in ((row['method'], '', row['ours']),
                              ('paper', row['method'], row['paper'])):
        out.writerow(['tasks', ';'.join(row['tasks']), method, of, step,
                      row['label'], row['statistic'], fmt(est.value),
                      fmt(est.low), fmt(est.high), est.n])


# -------------------------------------------------------------- provenance

def read_provenance(run_dir):
  """The records of `<run_dir>/provenance.jsonl` (one per process start,
  written by `rundir.store_provenance`), [] if there is none; malformed
  lines are skipped."""
  try:
    text = (Path(run_dir) / 'provenance.jsonl').read_text(errors='replace')
  except OSError:
    return []
  records = []
  for line in text.splitlines():
    try:
      rec = json.loads(line)
    except ValueError:
      continue
    if isinstance(rec, dict):
      records.append(rec)
  return records


def _code_of(rec):
  """(commit, TensorFlow version) labels of one provenance record."""
  commit = str(rec.get('commit') or 'unknown')
  if commit != 'unknown':
    commit = commit[:10] + ('-dirty' if rec.get('dirty') else '')
  versions = rec.get('versions')
  tf = versions.get('tensorflow') if isinstance(versions, dict) else None
  return commit, str(tf or 'unknown')


def provenance_warnings(runs):
  """One line per method whose runs (all tasks and seeds, each start of a
  resumed run) came from different commits (a commit with uncommitted
  changes counts as another) or different TensorFlow versions, according
  to their provenance.jsonl; runs without one are not compared."""
  lines = []
  for (method,), group in _by(runs, 'method').items():
    commits, tfs = {}, {}
    for run in group:
      for commit, tf in {_code_of(r) for r in read_provenance(run.dir)}:
        commits.setdefault(commit, set()).add(run.dir)
        tfs.setdefault(tf, set()).add(run.dir)
    parts = [f'{what} ' + ', '.join(f'{k} ({len(v)} run'
                                    f'{"s" if len(v) > 1 else ""})'
                                    for k, v in sorted(seen.items()))
             for what, seen in (('commits', commits),
                                ('TensorFlow', tfs)) if len(seen) > 1]
    if parts:
      lines.append(f'warning: the {method} runs in this comparison come '
                   f'from different code: {"; ".join(parts)}.')
  return lines


# ------------------------------------------------------------------- plots

def _draw_paper(ax, task, xmax):
  """Paper mean and min-max band up to just past xmax; False if no data."""
  curve = paper_curve(task)
  if curve is None:
    return False
  xs, mean, lo, hi = curve
  end = np.searchsorted(xs, xmax) + 1
  n = len(paper_seeds(task))
  ax.fill_between(xs[:end], lo[:end], hi[:end], color='0.5', alpha=0.25,
                  lw=0, label=f'Dreamer paper min-max ({n} seeds)')
  ax.plot(xs[:end], mean[:end], color='k', lw=1.5, label='Dreamer paper mean')
  return True


def _draw_baselines(ax, task, first_color):
  for i, (name, score) in enumerate(sorted(baselines(task).items())):
    ax.axhline(score, color=f'C{(first_color + i) % 10}', ls='--', lw=1.2,
               label=f'{name} (final)')


def _draw_ours(ax, runs, color, method):
  """Each seed thin, the mean over seeds thick (one seed: just thick)."""
  if len(runs) == 1:
    r = runs[0]
    ax.plot(r.steps, r.returns, color=color, lw=2.2,
            label=f'{method} (seed {r.seed})')
    return
  for i, r in enumerate(runs):
    ax.plot(r.steps, r.returns, color=color, lw=0.8, alpha=0.45,
            label=f'{method} seeds' if i == 0 else None)
  grid, mean = mean_curve([(r.steps, r.returns) for r in runs])
  ax.plot(grid, mean, color=color, lw=2.5,
          label=f'{method} mean ({len(runs)} seeds)')


def plot_task(task, runs, path):
  """Draw all runs of one task (any methods) with the paper data to a PNG.
  Returns whether the paper has data for task."""
  fig, has_paper = task_figure(task, runs)
  fig.savefig(path, dpi=110)
  return has_paper


def task_figure(task, runs):
  """The figure of `plot_task` (a matplotlib Figure, Agg canvas) and
  whether the paper has data for task. Each method (ours, the reference's
  or any other) gets its own colour."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import EngFormatter
  fig = Figure(figsize=(8, 5), layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  xmax = max(max(r.last_step, r.steps[-1]) for r in runs)
  has_paper = _draw_paper(ax, task, xmax)
  methods = _by(runs, 'method')
  for i, ((method,), group) in enumerate(methods.items()):
    _draw_ours(ax, group, f'C{i % 10}', method)
  _draw_baselines(ax, task, len(methods))
  if not has_paper:
    ax.text(0.5, 0.02, 'no paper data for this task', transform=ax.transAxes,
            ha='center', va='bottom', color='0.4')
  ax.set(title=task, xlabel='environment steps', ylabel='test return',
         xlim=(0, xmax * 1.02 if xmax > 0 else 1))
  ax.xaxis.set_major_formatter(EngFormatter(sep=''))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='best')
  return fig, has_paper


# --------------------------------------------------------------------- cli

def _safe_name(task):
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in task)
  return safe or 'task'


def main(argv=None):
  """Command line entry point; returns the exit status."""
  parser = argparse.ArgumentParser(prog='python -m dreamer_tf.plot',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--logdir', default='./logdir',
                      help='logdir, task folder, run folder or metrics.jsonl')
  parser.add_argument('--out', default='plots', help='folder for the PNGs')
  parser.add_argument(
      '--milestones', default=','.join(str(m) for m in MILESTONES),
      help='environment steps at which the tables compare returns, '
      'comma-separated (each is scored at the paper\'s logged step nearest '
      'it, e.g. 1.05e5 for 1e5; default: %(default)s)')
  args = parser.parse_args(argv)
  try:
    milestones = tuple(int(float(m)) for m in args.milestones.split(','))
  except ValueError:
    print(f'error: --milestones {args.milestones!r} is not a comma-separated '
          'list of steps, e.g. 100000,500000', file=sys.stderr)
    return 1
  logdir, out = Path(args.logdir), Path(args.out)
  if not logdir.exists():
    print(f'error: logdir {logdir} does not exist', file=sys.stderr)
    return 1
  runs = []
  for run in find_runs(logdir):
    if len(run.steps):
      runs.append(run)
    else:
      print(f'warning: {run.dir}: no {RETURN_KEY} yet, skipped',
            file=sys.stderr)
  if not runs:
    print(f'error: no runs with {RETURN_KEY} in a metrics.jsonl under {logdir}',
          file=sys.stderr)
    return 1
  out.mkdir(parents=True, exist_ok=True)
  for (task,), group in _by(runs, 'task').items():
    path = out / f'{_safe_name(task)}.png'
    if not plot_task(task, group, path):
      print(f'note: no paper data for {task}; plotted without the band',
            file=sys.stderr)
    print(f'wrote {path}')
  for line in provenance_warnings(runs):
    print(line, file=sys.stderr)
  rows = milestone_table(runs, milestones)
  write_csv(rows, out / 'summary.csv')
  print(f'wrote {out / "summary.csv"}')
  stats = statistics(runs, milestones)
  write_statistics_csv(stats, out / 'statistics.csv')
  print(f'wrote {out / "statistics.csv"}')
  print()
  print(format_table(rows))
  print()
  print(format_statistics(stats))
  return 0


if __name__ == '__main__':
  sys.exit(main())
