"""Tests of dreamer_tf.plot: the command end to end, and the paper data."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from dreamer_tf import plot

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / 'dreamer_tf' / 'scores' / 'dreamer.json'
TASK = 'dmc_cartpole_balance'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# seed -> {step: test return}; the table must pick the last value <= milestone.
RETURNS = {
  0: {0: 20, 50_000: 200, 100_000: 400, 300_000: 700, 500_000: 900},
  1: {0: 30, 50_000: 250, 100_000: 600, 300_000: 800, 500_000: 1000},
}


def write_run(run_dir, returns, last_step=520_000, truncate=True):
  """A metrics.jsonl with test returns, other metrics and broken lines."""
  run_dir.mkdir(parents=True)
  lines = []
  steps = set(range(0, last_step + 1, 20_000)) | set(returns)
  for step in sorted(s for s in steps if s <= last_step):
    lines.append(json.dumps({'step': step, 'train/loss': 1.0 / (step + 1)}))
    if step in returns:
      lines.append(json.dumps({'step': step, 'test/return': returns[step],
                   'test/length': 1000}))
  lines.insert(3, 'not json at all')
  text = '\n'.join(lines) + '\n'
  if truncate:
    text += '{"step": 540000, "test/ret'  # a crash cut the last line
  (run_dir / 'metrics.jsonl').write_text(text)


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'dreamer_tf.plot', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def paper_means(task, milestones):
  """Independent plain-python paper means at the nearest logged step."""
  seeds = [r for r in json.loads(PAPER.read_text()) if r['task'] == task]
  out = []
  for m in milestones:
    vals = []
    for r in seeds:
      i = min(range(len(r['xs'])), key=lambda i: abs(r['xs'][i] - m))
      vals.append(r['ys'][i])
    out.append(round(sum(vals) / len(vals)))
  return out


def table_row(stdout, task):
  """Cells of the table line of task (columns are split by 2+ spaces)."""
  rows = [line for line in stdout.splitlines() if line.startswith(task + ' ')]
  assert len(rows) == 1, stdout
  return re.split(r'\s{2,}', rows[0].strip())


def test_command_plots_and_tabulates(tmp_path):
  logdir, out = tmp_path / 'logdir', tmp_path / 'plots'
  for seed, returns in RETURNS.items():
    write_run(logdir / TASK / 'dreamer' / str(seed), returns)
  res = run_cli('--logdir', str(logdir), '--out', str(out))
  assert res.returncode == 0, res.stderr
  assert 'Traceback' not in res.stderr
  assert 'malformed' in res.stderr  # the broken lines were reported

  png = out / f'{TASK}.png'
  assert str(png) in res.stdout
  data = png.read_bytes()
  assert data[:8] == PNG_MAGIC
  assert len(data) > 20_000

  paper = paper_means(TASK, [1e5, 5e5, 1e6])
  assert paper == [472, 982, 988]
  cells = table_row(res.stdout, TASK)
  assert cells[:3] == [TASK, 'dreamer', '2']
  assert cells[3:] == ['500 (n=2)', str(paper[0]), '950 (n=2)', str(paper[1]),
                       '-', str(paper[2])]


def test_logdir_can_be_a_run_or_task_folder(tmp_path):
  task_dir = tmp_path / 'logdir' / TASK
  write_run(task_dir / 'dreamer' / '0', RETURNS[0])
  write_run(task_dir / 'dreamer' / '1', RETURNS[1], last_step=300_000)
  runs = plot.find_runs(task_dir)
  assert [(r.task, r.method, r.seed) for r in runs] == [
    (TASK, 'dreamer', '0'), (TASK, 'dreamer', '1')]
  [one] = plot.find_runs(task_dir / 'dreamer' / '1')
  assert (one.task, one.seed, one.last_step) == (TASK, '1', 300_000)
  row = plot.milestone_table(runs)[0]['milestones']
  assert [(c['ours'], c['n']) for c in row] == [(500, 2), (900, 1), (None, 0)]
  [between] = plot.milestone_table(runs, (299_999,))[0]['milestones']
  assert (between['ours'], between['n']) == (500, 2)  # last return <= step


def test_config_names_the_task(tmp_path):
  run_dir = tmp_path / 'my_run'
  write_run(run_dir, RETURNS[0], truncate=False)
  (run_dir / 'config.json').write_text(json.dumps({'task': 'dmc_walker_walk'}))
  [run] = plot.find_runs(run_dir)
  assert run.task == 'dmc_walker_walk'
  assert plot.load_curve(run_dir)[1].tolist() == [20, 200, 400, 700, 900]


def test_task_without_paper_data_is_still_plotted(tmp_path):
  logdir = tmp_path / 'logdir'
  write_run(logdir / 'dmc_unknown_task' / 'dreamer' / '0', RETURNS[0])
  res = run_cli('--logdir', str(logdir), '--out', str(tmp_path / 'o'))
  assert res.returncode == 0, res.stderr
  assert 'no paper data' in res.stderr
  assert (tmp_path / 'o' / 'dmc_unknown_task.png').read_bytes()[:8] == PNG_MAGIC
  assert table_row(res.stdout, 'dmc_unknown_task')[3:] == [
    '400 (n=1)', '-', '900 (n=1)', '-', '-', '-']


def test_empty_logdir_fails_cleanly(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  no_returns = tmp_path / 'no_returns' / TASK / 'dreamer' / '0'
  no_returns.mkdir(parents=True)
  (no_returns / 'metrics.jsonl').write_text('{"step": 1000, "train/loss": 1}\n')
  for logdir in (empty, tmp_path / 'no_returns', tmp_path / 'missing'):
    res = run_cli('--logdir', str(logdir), '--out', str(tmp_path / 'out'))
    assert res.returncode == 1, res.stdout
    assert 'Traceback' not in res.stderr
    errors = [line for line in res.stderr.splitlines()
              if line.startswith('error')]
    assert len(errors) == 1 and str(logdir) in errors[0], res.stderr
  assert len(run_cli('--logdir', str(empty)).stderr.strip().splitlines()) == 1


def test_paper_curve_matches_raw_json():
  seeds = [r for r in json.loads(PAPER.read_text()) if r['task'] == TASK]
  assert len(seeds) == 5
  xs, mean, lo, hi = plot.paper_curve(TASK)
  all_xs = sorted({x for r in seeds for x in r['xs']})
  assert xs.tolist() == all_xs
  for i, x in enumerate(all_xs):
    vals = [r['ys'][r['xs'].index(x)] for r in seeds if x in r['xs']]
    assert np.isclose(mean[i], sum(vals) / len(vals))
    assert (lo[i], hi[i]) == (min(vals), max(vals))
  assert plot.paper_curve('dmc_no_such_task') is None
  assert round(plot.paper_value(TASK, 1e5)) == 472
