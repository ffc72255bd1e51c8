"""Fixtures shared by several test files."""

import signal
import subprocess
import sys

import pytest

from runs import ROOT


def pytest_collection_modifyitems(items):
  """The slow tests (real training runs, marker `slow`) first, the quick
  tier last, each in the order of the files: within a file under `-n 2
  --dist loadfile`, and across files under `--dist loadgroup
  --no-loadscope-reorder`, where a long test started last would keep one
  worker busy minutes after the other ran out of work."""
  def rank(item):
    return (item.get_closest_marker('slow') is None,
            item.get_closest_marker('quick') is not None)
  items.sort(key=rank)  # Stable: the files' order within each rank.


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """One finished tiny training run, started once for every test that reads
  it: `python dreamer.py --task dmc_cartpole_balance --preset debug --steps
  1500` in a logdir named as the README names them. Returns (logdir, the
  completed process). Tests that change the run work on a copy
  (`shutil.copytree`), so the others see it as it was written."""
  logdir = tmp_path_factory.mktemp('shared') / 'dmc_cartpole_balance' / \
      'dreamer' / '0'
  result = subprocess.run(
      [sys.executable, 'dreamer.py', '--logdir', str(logdir), '--task',
       'dmc_cartpole_balance', '--preset', 'debug', '--steps', '1500'],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  return logdir, result


@pytest.fixture
def sigint_catchable():
  """SIGINT turned into KeyboardInterrupt, as in a terminal, during the
  test: a shell's background job (nohup, &) starts with SIGINT ignored, and
  dreamer_tf.interrupts keeps an ignored SIGINT ignored."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)
