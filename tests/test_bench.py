"""The benchmark's commands run and say what they measured (tiny batches;
the timings themselves are never asserted)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--batch_size', '2', '--batch_length', '4', '--steps', '1',
        '--precision', '32', '--json']


def bench(*flags):
  result = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.bench', *TINY, *flags], cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_profile_covers_every_phase_of_the_step():
  out = bench('--profile')
  result = json.loads(out.strip().splitlines()[-1])
  phases = [row['phase'] for row in result['rows']]
  assert phases[:2] == ['encoder', 'RSSM observe (4 steps)']
  assert 'imagination (15 steps)' in phases
  assert sum('optimizer' in phase for phase in phases) == 3
  for row in result['rows']:
    if 'optimizer' not in row['phase']:  # Those have no forward/backward.
      assert abs(row['forward_s'] + row['backward_s'] - row['total_s']) < 1e-9
    assert row['total_s'] > 0
  assert result['whole_s'] > 0 and 0 < result['busy'] <= 1.05
  assert 'sum of the phases' in out and 'cores busy' in out


def test_against_compares_with_a_commit_in_a_temporary_worktree():
  before = subprocess.run(['git', 'worktree', 'list'], cwd=ROOT,
                          capture_output=True, text=True).stdout
  out = bench('--against', 'HEAD', '--rounds', '1')
  result = json.loads(out.strip().splitlines()[-1])
  assert [row['version'] for row in result['rows']] == ['new', 'old']
  assert 'precision 32: new / old = step ' in out
  after = subprocess.run(['git', 'worktree', 'list'], cwd=ROOT,
                         capture_output=True, text=True).stdout
  assert after == before          # The worktree is gone again.


def test_against_stopped_by_sigterm_removes_its_worktree():
  # A scheduler's or `timeout`'s SIGTERM must not leave a worktree behind.
  worktrees = lambda: subprocess.run(
      ['git', 'worktree', 'list'], cwd=ROOT, capture_output=True,
      text=True).stdout
  before = worktrees()
  process = subprocess.Popen(
      [sys.executable, '-m', 'dreamer_tf.bench', *TINY, '--against', 'HEAD'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while 'bench-against-' not in worktrees():
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 143 and 'Traceback' not in stderr, stderr
  assert worktrees() == before


def test_against_a_missing_commit_is_one_line():
  result = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.bench', '--against', 'no-such-ref'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert "--against 'no-such-ref' is not a commit" in result.stderr
