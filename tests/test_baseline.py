"""Baseline policies through the training wrappers (rendered in a worker)."""

import json
import subprocess
import sys

import numpy as np

from dreamer_tf import baseline


def test_zero_and_random_policies_on_cartpole():
  # time_limit 40 at action repeat 2: 20 agent steps, rewards in [0, 2] each.
  zero = baseline.policy_returns('dmc_cartpole_balance', 'zero', 2,
                                 time_limit=40)
  random = baseline.policy_returns('dmc_cartpole_balance', 'random', 2,
                                   time_limit=40)
  assert len(zero) == len(random) == 2
  for value in zero + random:
    assert 0 < value <= 40
  # The pole starts upright: doing nothing for 20 steps keeps it nearly so.
  assert min(zero) > 30


def test_command_prints_json():
  result = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.baseline',
       '--task', 'dmc_cartpole_balance',
       '--episodes', '1', '--time_limit', '20', '--policies', 'zero', '--json'],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  data = json.loads(result.stdout.strip().splitlines()[-1])
  assert data['zero']['mean'] == np.mean(data['zero']['returns'])
  bad = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.baseline', '--task', 'dmc_nope_x'],
      capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and 'Traceback' not in bad.stderr
