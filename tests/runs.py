"""Real dreamer.py processes for the tests, at --preset debug sizes."""

import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def catch_sigint():
  """In a child process before it starts Python: SIGINT at its default, so
  that Python turns it into KeyboardInterrupt even when the tests run in the
  background (a shell's background job starts with SIGINT ignored, and
  Python keeps an ignored SIGINT ignored)."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_training(logdir, episodes=4, *flags, timeout=300):
  """Starts a long cartpole_balance run in `logdir` (no evaluation or save
  before 100,000 steps unless `flags` say otherwise) and returns the
  process once `episodes` episodes are stored (4: past the prefill of 500
  steps and the pretraining)."""
  process = subprocess.Popen(
      [sys.executable, 'dreamer.py', '--logdir', str(logdir), '--task',
       'dmc_cartpole_balance', '--preset', 'debug', '--steps', '100000',
       '--eval_every', '100000', *map(str, flags)],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=catch_sigint,
      # Unbuffered: what a killed process printed is still read.
      env=dict(os.environ, PYTHONUNBUFFERED='1'))
  deadline = time.time() + timeout
  try:
    while len(list((pathlib.Path(logdir) / 'episodes').glob('*.npz'))) < \
        episodes:
      assert process.poll() is None, process.communicate()[1][-2000:]
      assert time.time() < deadline, 'no episodes in time'
      time.sleep(0.5)
  except BaseException:
    process.kill()
    raise
  return process
