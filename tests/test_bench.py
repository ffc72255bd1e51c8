"""The benchmark's commands run and say what they measured (tiny batches;
the timings themselves are never asserted)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import dreamer
from dreamer_tf import bench as bench_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--batch_size', '2', '--batch_length', '4', '--steps', '1',
        '--precision', '32', '--json']


def bench(*flags):
  result = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.bench', *TINY, *flags], cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
# Both compare `git worktree list` before and after: one worker runs them.
@pytest.mark.xdist_group('git_worktree')
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


@pytest.mark.xdist_group('git_worktree')
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


def test_variants_parse_each_value_as_its_flag_does():
  # No TensorFlow step: the settings as the child applies them.
  settings = lambda text: bench_lib.apply_settings(
      dreamer.define_config(), text)
  for text, value in (('False', False), ('false', False), ('0', False),
                      ('no', False), ('True', True), ('1', True)):
    assert settings(f'save_memory={text}').save_memory is value, text
  config = settings('deter_size=8,train_steps=5e2,kl_scale=0.5,'
                    'model_lr=1e-4,scan=loop,env:TF_NUM_INTEROP_THREADS=1')
  assert (config.deter_size, config.train_steps) == (8, 500)
  assert type(config.deter_size) is int and type(config.train_steps) is int
  assert (config.kl_scale, config.model_lr) == (0.5, 1e-4)
  assert config.scan == 'loop'
  assert not hasattr(config, 'env:TF_NUM_INTEROP_THREADS')
  assert vars(settings('')) == vars(dreamer.define_config())


@pytest.mark.parametrize('text, message', [
    ('save_memory=maybe', 'save_memory=maybe is not a boolean (true/false).'),
    ('deter_size=1.5', 'deter_size=1.5 is not an integer.'),
    ('kl_scale=half', 'kl_scale=half is not a number.'),
    ('save_memroy=true', 'save_memroy is not a flag of dreamer.py (did you '
     'mean save_memory? python dreamer.py --help lists them).'),
    ('scan', "'scan' is not flag=value (e.g. save_memory=true)."),
    ('precision=32', 'precision is set by the benchmark: use its '
     '--precision instead.'),
])
def test_a_bad_variant_is_one_line_before_any_benchmark(
    text, message, monkeypatch):
  with pytest.raises(ValueError) as error:
    bench_lib.apply_settings(dreamer.define_config(), text)
  assert str(error.value) == f'--variants: {message}'
  def no_benchmark(*args, **kwargs):
    raise AssertionError('a benchmark started')
  monkeypatch.setattr(bench_lib, 'run_json', no_benchmark)
  # main() sets a SIGTERM handler: keep pytest's.
  monkeypatch.setattr(bench_lib.signal, 'signal', lambda *args: None)
  with pytest.raises(SystemExit) as exit_:
    bench_lib.main(['--variants', 'scan=loop', text])
  assert exit_.value.code == f'bench: --variants: {message}'
