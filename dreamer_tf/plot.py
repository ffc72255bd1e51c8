"""Plot our test returns against the Dreamer paper's learning curves.

  python -m dreamer_tf.plot --logdir ./logdir --out plots/

Runs are folders holding a ``metrics.jsonl`` (one JSON object per line, each
with an integer ``step`` = environment steps; lines with ``test/return`` are
evaluation returns). The usual layout is ``<logdir>/<task>/<method>/<seed>/``;
``--logdir`` may also point at a task folder, a run folder or the file itself.

For each task this writes ``<out>/<task>.png``: every seed as a thin line, the
mean over seeds as a thick line, the paper's Dreamer mean with its min-max band
over seeds, and other methods' final scores as dashed horizontal lines. It then
prints a table of our return and the paper's mean at 1e5, 5e5 and 1e6 steps and
writes the same numbers to ``<out>/summary.csv``.

Milestone rules (see ``run_value`` and ``paper_value``):
 ours:  per seed, the last test return logged at a step <= milestone, counted
    only if the run logged anything at a step >= milestone; the table
    shows the mean over the seeds that count and how many they are.
 paper: per paper seed, the return at the logged step nearest the milestone,
    averaged over the paper's seeds.

This module deliberately does not import TensorFlow, and imports matplotlib
only when drawing (with the Agg canvas, no pyplot, no global backend change).
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


def paper_value(task, milestone):
  """Mean over paper seeds of the return at the step nearest milestone."""
  seeds = paper_seeds(task)
  if not seeds:
    return None
  return float(np.mean([y[np.argmin(np.abs(x - milestone))] for x, y in seeds]))


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
  """
  rows = []
  for (task, method), group in _by(runs, 'task', 'method').items():
    cells = []
    for m in milestones:
      vals = [v for v in (run_value(r, m) for r in group) if v is not None]
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
  """Draw all runs of one task (any methods) with the paper data to a PNG."""
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
  fig.savefig(path, dpi=110)
  return has_paper


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
  args = parser.parse_args(argv)
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
  rows = milestone_table(runs)
  write_csv(rows, out / 'summary.csv')
  print(f'wrote {out / "summary.csv"}')
  print()
  print(format_table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
