"""What stops a run, and how it says so in one line: non-finite losses and
actions, and crashes (a dead worker, a full disk, a bug) after keeping the
training since the last save. Imports no TensorFlow."""

import errno
import json
import os
import pathlib
import re
import sys

import numpy as np


class NonFinite(RuntimeError):
  """A non-finite loss or action stops the run. `weights_ok`: the weights
  are still good (a non-finite update is never applied) and are saved; after
  a non-finite action they may not be, and nothing is saved."""

  def __init__(self, message, weights_ok=False):
    super().__init__(message)
    self.weights_ok = weights_ok


# Metrics that must be finite after every update.
FINITE = ('model_loss', 'actor_loss', 'value_loss')


def non_finite(metrics):
  """The names of FINITE whose value in `metrics` is NaN or infinite."""
  return [k for k in FINITE if k in metrics and
          not np.isfinite(float(metrics[k]))]


def finite_actions(actions, step=None):
  """The actions as an array; NonFinite if any is NaN or infinite (MuJoCo
  would crash the worker on it)."""
  actions = np.asarray(actions)
  if not np.all(np.isfinite(actions)):
    where = '' if step is None else f' at step {step}'
    raise NonFinite(
        f'the policy produced a non-finite action{where} '
        f'({actions.tolist()}); it was not sent to the environment. The '
        'weights or the observations hold NaN: resume from the last good '
        'checkpoint with lower learning rates.')
  return actions


def keep_nan_batch(logdir, step, batch, losses, checkpoint):
  """--on_nan stop: writes the batch of a non-finite update and what is
  known of it to <logdir>/nan/ and returns the NonFinite that stops the
  run (the weights are still good: the update was not applied)."""
  folder = pathlib.Path(logdir) / 'nan'
  folder.mkdir(exist_ok=True)
  path = folder / f'batch-{step}.npz'
  np.savez_compressed(path, **{k: np.asarray(v) for k, v in batch.items()})
  info = dict(step=step, losses=losses, batch=path.name,
              last_checkpoint=checkpoint.latest,
              last_checkpoint_step=checkpoint.step)
  (folder / f'info-{step}.json').write_text(json.dumps(info, indent=2))
  names = ', '.join(f'{k} = {v}' for k, v in losses.items())
  return NonFinite(
      f'{names} at step {step}: stopped; the batch is in {path}, the '
      'weights (the bad update was not applied) are saved, the checkpoint '
      f'before was {checkpoint.latest} (step {checkpoint.step}). '
      'Lower the learning rates, or pass --on_nan skip to skip such '
      'updates.', weights_ok=True)


def crashed(run, logdir, error):
  """Keeps the training since the last save, writes the traceback to
  <logdir>/crash.log and says both in one line."""
  import traceback
  text = ''.join(traceback.format_exception(error))
  saved = ''
  try:
    run.save()
    saved = f'saved a checkpoint at step {run.step}; '
  except Exception as save_error:  # E.g. the disk is full.
    reason = describe(save_error, logdir)
    saved = f'could not save a checkpoint: {reason}; '
  try:
    (logdir / 'crash.log').write_text(text)
    where = f'traceback in {logdir / "crash.log"}'
  except OSError:
    where = 'traceback not written'
  print(f'dreamer.py: error: {describe(error, logdir)} ({saved}{where}).',
        file=sys.stderr)
  return 1


def describe(error, logdir):
  """One line for an exception; a full disk (an OSError, or TensorFlow's
  error when saving) as `no space left on <device> writing <file>`; a lost
  worker of a multi_worker run as its own message, which names it."""
  from dreamer_tf import distribute
  text = str(error).strip()
  if isinstance(error, distribute.WorkerLost):
    return text.rstrip('.')  # crashed() adds what it saved, then a period.
  full = re.search(r'(/\S+?)(?:\.tempstate\d+)?; No space left on device',
                   text)
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    name = error.filename
  elif full:
    # TensorFlow writes a checkpoint into <name>_temp/ first.
    name = re.sub(r'_temp/.*$', '', full.group(1))
  else:
    first = text.splitlines()[0] if text else ''
    return f'{type(error).__name__}: {first}'
  device = _device_of(pathlib.Path(name or logdir))
  return f'no space left on {device} writing {name or "a file"}'


def _device_of(path):
  """The mount point holding `path` (what `df` would name)."""
  path = path.absolute()
  while not path.exists() or not os.path.ismount(path):
    if path.parent == path:
      break
    path = path.parent
  return str(path)
