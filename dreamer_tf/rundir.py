"""The run folder (--logdir): who owns it, and what its stored config allows.

One training process owns a logdir at a time: `Lock` holds an exclusive
`fcntl` lock on `<logdir>/lock` (the kernel frees it when the process dies,
even on kill -9) and writes the owner's pid, host and start time into it,
so that a second process can name the first. Readers (`--mode eval`, the
plot and doctor commands) never take it.

A rerun is checked against `<logdir>/config.json` before anything is
written: flags that change the task, the action space or the model are
refused (`check_rerun`); the others may change, and `store_config` keeps the
old values under `_history`. Imports no TensorFlow.
"""

import datetime
import fcntl
import json
import os
import pathlib
import socket

# Flags a resumed run cannot change: they define the task, its action space
# and episode length, or the shapes of the networks in the checkpoint.
FIXED = ('task', 'action_repeat', 'time_limit', 'action_dist', 'pcont',
         'deter_size', 'stoch_size', 'num_units', 'dense_act', 'cnn_act',
         'cnn_depth')

HISTORY = '_history'


class LogdirError(ValueError):
  """A logdir that cannot be used; the message is one line with the fix."""


class Lock:
  """Exclusive ownership of a logdir by this process (see module doc).
  `acquire()` returns a notice (str) when it took over a stale lock, else
  None; raises LogdirError naming the owner when another process holds it."""

  def __init__(self, logdir):
    self.path = pathlib.Path(logdir) / 'lock'
    self._file = None

  def acquire(self):
    try:
      handle = open(self.path, 'a+')
    except OSError as error:
      raise LogdirError(f'cannot write to {self.path.parent}: '
                        f'{error.strerror}.') from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      owner = _read_owner(handle)
      handle.close()
      raise LogdirError(
          f'another dreamer.py trains in {self.path.parent} ({owner}): wait '
          'for it or stop it, or use another --logdir.') from None
    previous = _read_owner(handle)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(dict(
        pid=os.getpid(), host=socket.gethostname(),
        started=datetime.datetime.now().isoformat(timespec='seconds'))))
    handle.flush()
    self._file = handle
    if previous != 'unknown owner':
      return f'Took over the lock of a run that is gone ({previous}).'
    return None

  def release(self):
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _read_owner(handle):
  handle.seek(0)
  try:
    owner = json.loads(handle.read() or 'null')
    return (f'pid {owner["pid"]} on {owner["host"]}, started '
            f'{owner["started"]}')
  except (ValueError, TypeError, KeyError):
    return 'unknown owner'


def read_config(logdir):
  """The stored config of a run (without its history), or None."""
  path = pathlib.Path(logdir) / 'config.json'
  if not path.exists():
    return None
  try:
    stored = json.loads(path.read_text())
  except ValueError as error:
    raise LogdirError(f'{path} is not valid JSON ({error}): restore it or '
                      'use another --logdir.') from None
  stored.pop(HISTORY, None)
  return stored


def check_rerun(logdir, config):
  """Refuses, in one line naming every such flag with its stored and new
  value, a rerun that changes a FIXED flag. Returns the other changed
  flags as {name: (stored, new)}."""
  stored = read_config(logdir)
  if stored is None:
    return {}
  new = vars(config)
  fixed = [f'--{k} {stored[k]!r} -> {new[k]!r}' for k in FIXED
           if k in stored and stored[k] != new[k]]
  if fixed:
    raise LogdirError(
        f'{logdir} holds a run with other settings: ' + ', '.join(fixed) +
        '. These define the task or the model and cannot change on resume: '
        'rerun with the stored values, or use another --logdir.')
  return {k: (stored[k], new[k]) for k in new
          if k in stored and stored[k] != new[k] and k != 'logdir'}


def store_config(logdir, config, changes):
  """Writes config.json (through a temporary file), keeping the earlier
  values of changed flags in its `_history` list."""
  path = pathlib.Path(logdir) / 'config.json'
  history = []
  if path.exists():
    try:
      history = json.loads(path.read_text()).get(HISTORY, [])
    except ValueError:
      history = []
  if changes:
    history.append(dict(
        time=datetime.datetime.now().isoformat(timespec='seconds'),
        changed={k: dict(old=old, new=new) for k, (old, new) in
                 sorted(changes.items())}))
  content = dict(vars(config))
  if history:
    content[HISTORY] = history
  temporary = path.with_name('config.json.tmp')
  temporary.write_text(json.dumps(content, indent=2) + '\n')
  os.replace(temporary, path)
