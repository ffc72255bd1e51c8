"""Fixtures shared by several test files."""

import subprocess
import sys

import pytest

from runs import ROOT


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
