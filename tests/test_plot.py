"""Tests of dreamer_tf.plot: the command end to end, and the paper data."""

import json
import re
import shutil
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
  # A milestone is scored at the paper's logged step nearest it (305,000
  # here), which seed 1 (ended at 300,000) did not reach; seed 0's last
  # return at or before it is the one at 300,000.
  [between] = plot.milestone_table(runs, (299_999,))[0]['milestones']
  assert (between['ours'], between['n']) == (700, 1)


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


# ------------------------------------------------------------- statistics

FIXTURE = ROOT / 'tests' / 'fixtures' / 'reference_run' / TASK / 'reference'


def test_iqm_by_hand():
  assert plot.iqm([4, 1, 3, 2]) == 2.5  # the middle two of four
  # n = 5: the scores at the quartiles count 0.3, the median 0.4.
  assert np.isclose(plot.iqm([0, 0, 0, 10, 100]), 0.3 * 0 + 0.4 * 0 + 0.3 * 10)
  # n = 6: (x2 + 2 x3 + 2 x4 + x5) / 6 of the sorted scores.
  assert np.isclose(plot.iqm([50, 8, 4, 2, 1, 0]), (1 + 4 + 8 + 8) / 6)
  # n = 9: 2.25 scores per quarter, the boundary ones count 0.75.
  assert np.isclose(plot.iqm([1, 3, 5, 7, 9, 11, 13, 15, 17]), 9)
  assert np.isclose(plot.iqm([100, 1, 2, 3, 4, 5, 6, 7, 8]),
                    (0.75 * 3 + 4 + 5 + 6 + 0.75 * 7) / 4.5)
  # The same as scipy's 25 % trimmed mean when n is divisible by 4 only.
  from scipy.stats import trim_mean
  x = np.random.default_rng(0).normal(size=(3, 12))
  assert np.allclose(plot.iqm(x, axis=1), trim_mean(x, 0.25, axis=1))
  assert np.allclose(plot.iqm(x.T, axis=0), trim_mean(x, 0.25, axis=1))
  assert not np.isclose(plot.iqm([0, 0, 0, 10, 100]),
                        trim_mean([0, 0, 0, 10, 100], 0.25))


def test_aggregates_over_tasks_by_hand():
  tasks = [np.array([100., 300.]), np.array([500.]),
           np.array([600., 800., 1000.])]  # task means 200, 500, 800
  assert plot.mean_over_tasks(*tasks) == 500
  assert plot.median_over_tasks(*tasks) == 500
  assert plot.median_over_tasks(*tasks[:2]) == 350
  # Each task weighs 1/3, split over its seeds: sorted scores cover
  # 100 [0, 1/6], 300 [1/6, 1/3], 500 [1/3, 2/3], 600 [2/3, 7/9], ...
  iqm = (300 * (1 / 3 - 1 / 4) + 500 / 3 + 600 * (3 / 4 - 2 / 3)) / 0.5
  assert np.isclose(plot.iqm_over_tasks(*tasks), iqm)
  assert np.isclose(iqm, 1450 / 3)
  # The same number of seeds everywhere: the IQM of the pooled scores.
  same = [np.array([0., 40.]), np.array([100., 20.])]
  assert np.isclose(plot.iqm_over_tasks(*same), plot.iqm([0, 40, 100, 20]))
  # Vectorised as scipy.stats.bootstrap calls it: resamples on axis 0.
  batch = [np.tile(t, (4, 1)) for t in tasks]
  for name, statistic in plot.AGGREGATES.items():
    assert np.allclose(statistic(*batch, axis=-1), statistic(*tasks)), name


def test_seed_interval_by_hand():
  # Two seeds: the resampled means are 400, 500 or 600 (1/4, 1/2, 1/4).
  assert plot.seed_estimate([400, 600]) == plot.Estimate(500, 400, 600, 2)
  one = plot.seed_estimate([700])
  assert one == plot.Estimate(700, None, None, 1)
  assert plot._cell(one) == '700 [n/a] n=1'
  assert plot.seed_estimate([]).value is None
  assert plot._cell(plot.seed_estimate([])) == '-'
  same = plot.seed_estimate([1000, 1000, 1000])  # a degenerate resampling
  assert (same.value, same.low, same.high) == (1000, 1000, 1000)
  assert plot.task_estimate([[1, 2], [5]], 'mean').low is None  # n/a


def test_interval_contains_the_true_mean_most_of_the_time(monkeypatch):
  monkeypatch.setattr(plot, 'RESAMPLES', 2000)
  rng = np.random.default_rng(1)
  trials = 200
  hits = 0
  for _ in range(trials):
    est = plot.seed_estimate(rng.normal(500, 150, size=20))
    hits += est.low <= 500 <= est.high
  # A 95 % percentile interval from 20 normal scores covers ~93 %.
  assert 0.88 * trials <= hits <= 0.99 * trials, hits
  # Across 3 tasks (the true mean over tasks is 500), stratified.
  hits = 0
  for _ in range(trials):
    tasks = [rng.normal(mu, 100, size=10) for mu in (200, 500, 800)]
    est = plot.task_estimate(tasks, 'mean')
    hits += est.low <= 500 <= est.high
  assert 0.88 * trials <= hits <= 0.99 * trials, hits
  assert plot.seed_estimate([1., 5., 2.]) == plot.seed_estimate([1., 5., 2.])


def test_bootstrap_is_stratified_by_task():
  """Each task keeps its number of seeds in every resample: a pooled mean
  of 2 zeros and 3 hundreds is then always 60 (a bootstrap of the 5 pooled
  scores would vary)."""
  pooled = lambda *t, axis=-1: np.mean(np.concatenate(t, axis=axis), axis=axis)
  assert plot.bootstrap_interval([[0, 0], [100, 100, 100]], pooled) == (60, 60)
  low, high = plot.bootstrap_interval([[0, 0, 100, 100, 100]], pooled)
  assert low < 30 and high > 90


def test_paper_scores_at_the_final_step():
  seeds = [r for r in json.loads(PAPER.read_text()) if r['task'] == TASK]
  final = max(x for r in seeds for x in r['xs'])
  assert plot.paper_final_step(TASK) == final == 4_905_000
  # Seeds that stopped earlier than 50,000 steps before it do not count.
  expect = [r['ys'][-1] for r in seeds if r['xs'][-1] == final]
  assert len(expect) == 4
  assert plot.paper_scores(TASK, final) == expect
  assert plot.paper_scores(TASK, 6e6) == []
  assert plot.paper_value(TASK, 6e6) is None
  assert plot.stat_steps(TASK) == [
    ('1e5', 105_000), ('5e5', 505_000), ('1e6', 1_005_000), ('final', final)]
  assert plot.paper_step(TASK, 3e5) == 305_000
  assert plot.paper_step(TASK, 6e6) == 6e6  # no paper point near it
  assert plot.stat_steps('dmc_no_such_task') == [
    ('1e5', 1e5), ('5e5', 5e5), ('1e6', 1e6)]


def test_statistics_per_task_and_across(tmp_path):
  logdir = tmp_path / 'logdir'
  for seed, returns in RETURNS.items():
    write_run(logdir / TASK / 'dreamer' / str(seed), returns)
  walker = {0: {100_000: 100, 500_000: 300}, 1: {100_000: 200, 500_000: 500},
            2: {100_000: 600, 500_000: 700}}
  for seed, returns in walker.items():
    write_run(logdir / 'dmc_walker_walk' / 'dreamer' / str(seed), returns,
              truncate=False)
  write_run(logdir / 'dmc_unknown_task' / 'dreamer' / '0', RETURNS[0])
  stats = plot.statistics(plot.find_runs(logdir))
  cells = {(r['task'], r['label']): r['cells'] for r in stats['per_task']}
  assert cells['dmc_walker_walk', '1e5']['dreamer'].value == 300
  assert cells['dmc_walker_walk', '1e5']['dreamer'].n == 3
  assert cells['dmc_unknown_task', '1e5']['dreamer'].low is None  # 1 seed
  assert cells['dmc_unknown_task', '1e5']['paper'].value is None
  assert ('dmc_unknown_task', 'final') not in cells
  paper = plot.paper_scores('dmc_walker_walk', 1e5)
  assert cells['dmc_walker_walk', '1e5']['paper'].value == np.mean(paper)
  assert stats['left_out'] == ['dmc_unknown_task']
  across = {(r['label'], r['statistic']): r for r in stats['across']}
  assert set(across) == {(s, n) for s in ('1e5', '5e5')
                         for n in ('mean', 'median', 'IQM')}
  row = across['1e5', 'mean']
  assert row['tasks'] == [TASK, 'dmc_walker_walk']
  assert row['ours'].value == (500 + 300) / 2 and row['ours'].n == 2
  both = [plot.paper_scores(t, 1e5) for t in row['tasks']]
  assert np.isclose(row['paper'].value, np.mean([np.mean(p) for p in both]))
  assert row['ours'].low < row['ours'].value < row['ours'].high
  # Seeds 400, 600 | 100, 200, 600 weigh 1/4 | 1/6 each. Sorted they
  # cover 100 [0, 1/6], 200 [1/6, 1/3], 400 [1/3, 7/12], then the 600s.
  iqm = (200 * (1 / 3 - 1 / 4) + 400 * (7 / 12 - 1 / 3)
         + 600 * (3 / 4 - 7 / 12)) / 0.5
  assert np.isclose(iqm, 1300 / 3)
  assert np.isclose(across['1e5', 'IQM']['ours'].value, iqm)
  text = plot.format_statistics(stats)
  assert "steps (final: its last): 1e5 at 1.05e5, 5e5 at 5.05e5, 1e6 at " \
      '1.005e6, final at 4.905e6 (tasks without paper data: at the ' \
      'milestones).' in text
  assert all(line.startswith('  ') for line in text.splitlines()
             if TASK in line)
  out = tmp_path / 'statistics.csv'
  plot.write_statistics_csv(stats, out)
  lines = out.read_text().splitlines()
  assert lines[0] == 'scope,task,method,of,step,step_label,statistic,value,' \
      'low,high,n'
  assert f'tasks,{TASK};dmc_walker_walk,dreamer,,105000,1e5,mean,400.0,' \
      in '\n'.join(lines)


def test_reference_run_is_plotted_beside_ours(tmp_path):
  """The hand-written reference-format runs (Infinity and NaN in their
  training lines) are drawn and tabled beside ours."""
  logdir, out = tmp_path / 'logdir', tmp_path / 'plots'
  for seed, returns in RETURNS.items():
    write_run(logdir / TASK / 'dreamer' / str(seed), returns)
  shutil.copytree(FIXTURE, logdir / TASK / 'reference')
  res = run_cli('--logdir', str(logdir), '--out', str(out))
  assert res.returncode == 0, res.stderr
  assert '/reference/' not in res.stderr  # every line of it parsed
  assert (out / f'{TASK}.png').read_bytes()[:8] == PNG_MAGIC
  rows = [re.split(r'\s{2,}', line.strip()) for line in res.stdout.splitlines()
          if line.startswith(TASK + ' ')]
  # The milestone table takes the last episode <= the paper's step nearest
  # the milestone (1.05e5 for 1e5): the reference's at 105,000, where the
  # paper's point is, not its one before at 5,000.
  assert rows == [
    [TASK, 'dreamer', '2', '500 (n=2)', '472', '950 (n=2)', '982', '-', '988'],
    [TASK, 'reference', '2', '400 (n=2)', '472', '860 (n=2)', '982',
     '970 (n=2)', '988']]
  stats = [re.split(r'\s{2,}', line.strip()) for line in res.stdout.splitlines()
           if line.startswith(f'  {TASK} ')]
  assert stats[0] == [TASK, '1e5', '500 [400, 600] n=2', '400 [300, 500] n=2',
                      '472 [440, 505] n=5']
  assert stats[2][2:4] == ['-', '970 [950, 990] n=2']
  assert '  reference  1e6   IQM        970 [950, 990] tasks=1' in res.stdout
  runs = plot.find_runs(logdir)
  reference = [r for r in runs if r.method == 'reference']
  assert [r.returns.tolist() for r in reference] == [
    [136.2, 300, 640.5, 850, 990], [136.0, 500, 702.2, 870, 950]]
  assert [r.last_step for r in reference] == [1_006_000, 1_006_000]
  fig, has_paper = plot.task_figure(TASK, runs)
  labels = fig.axes[0].get_legend_handles_labels()[1]
  assert has_paper
  assert {'dreamer mean (2 seeds)', 'reference mean (2 seeds)',
          'Dreamer paper mean'} <= set(labels)


def write_provenance(run_dir, *records):
  with open(run_dir / 'provenance.jsonl', 'a') as f:
    for commit, tf in records:
      f.write(json.dumps({'commit': commit, 'dirty': False, 'versions': {
        'tensorflow': tf}, 'host': 'h', 'devices': 'CPU'}) + '\n')


def test_runs_from_different_code_are_named(tmp_path):
  logdir = tmp_path / 'logdir'
  dirs = [logdir / TASK / 'dreamer' / str(s) for s in range(3)]
  for d in dirs:
    write_run(d, RETURNS[0], truncate=False)
  write_provenance(dirs[0], ('a' * 40, '2.21.0'))
  write_provenance(dirs[1], ('a' * 40, '2.21.0'), ('a' * 40, '2.21.0'))
  shutil.copytree(FIXTURE, logdir / TASK / 'reference')  # none: not compared
  res = run_cli('--logdir', str(logdir), '--out', str(tmp_path / 'o'))
  assert res.returncode == 0 and 'different code' not in res.stderr
  # The run resumed with other code and TensorFlow (dirs[2] has no record).
  write_provenance(dirs[1], ('b' * 40, '2.20.0'))
  with open(dirs[0] / 'provenance.jsonl', 'a') as f:
    f.write('{"truncated\n')  # a malformed line is skipped
  res = run_cli('--logdir', str(logdir), '--out', str(tmp_path / 'o'))
  assert res.returncode == 0, res.stderr
  warnings = [line for line in res.stderr.splitlines()
              if 'different code' in line]
  assert warnings == [
    'warning: the dreamer runs in this comparison come from different code: '
    'commits aaaaaaaaaa (2 runs), bbbbbbbbbb (1 run); TensorFlow 2.20.0 '
    '(1 run), 2.21.0 (2 runs).']


def test_milestones_flag_picks_the_compared_steps(tmp_path, capsys):
  # A short run is compared at the steps it reached: 5,000 is a step the
  # paper logged (5e3 + k * 1e5), so both sides are scored there.
  logdir = tmp_path / 'logdir'
  write_run(logdir / TASK / 'dreamer' / '0', {1000: 10, 4000: 40, 6000: 99},
            last_step=6000)
  write_run(logdir / TASK / 'dreamer' / '1', {1000: 20, 4000: 60, 6000: 99},
            last_step=6000)
  status = plot.main(['--logdir', str(logdir), '--out', str(tmp_path / 'p'),
                      '--milestones', '5000'])
  out = capsys.readouterr().out
  assert status == 0
  [row] = [re.split(r'\s{2,}', line.strip()) for line in out.splitlines()
           if line.startswith(TASK + ' ')]
  assert row[:4] == [TASK, 'dreamer', '2', '50 (n=2)']  # (40 + 60) / 2
  assert row[4] == f'{paper_means(TASK, [5000])[0]:.0f}'
  assert plot.main(['--logdir', str(logdir), '--milestones', '1e5,x']) == 1
  assert '--milestones' in capsys.readouterr().err
