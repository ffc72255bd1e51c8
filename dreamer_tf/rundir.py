"""The run folder (--logdir): who owns it, and what its stored config allows.

One training process owns a logdir at a time: `Lock` holds an exclusive
`fcntl` lock on `<logdir>/lock` (the kernel frees it when the process dies,
even on kill -9) and writes the owner's pid, host and start time into it,
so that a second process can name the first. A lock file deleted or
replaced while held is noticed by its owner at its next `Lock.check()`
(see `Lock`). Readers (`--mode eval`, the plot and doctor commands) never
take it.

A rerun is checked against `<logdir>/config.json` before anything is
written: flags that change the task, the action space or the model are
refused (`check_rerun`); the others may change, and `store_config` keeps the
old values under `_history`. Imports no TensorFlow.
"""

import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import pathlib
import platform
import socket
import subprocess

# Flags a resumed run cannot change: they define the task, its action space
# and episode length, or the shapes of the networks in the checkpoint.
FIXED = ('task', 'action_repeat', 'time_limit', 'action_dist', 'pcont',
         'deter_size', 'stoch_size', 'num_units', 'dense_act', 'cnn_act',
         'cnn_depth')

HISTORY = '_history'


def write_atomic(path, text):
  """Writes `text` to `path` under a temporary name beside it, then renames
  it over `path`: a reader sees the old file or the new one, never half of
  one. On failure the temporary file is removed and the OSError raised."""
  path = pathlib.Path(path)
  temporary = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    temporary.write_text(text)
    os.replace(temporary, path)
  except OSError:
    with contextlib.suppress(OSError):  # Nothing to remove, or read-only.
      temporary.unlink()
    raise


class LogdirError(ValueError):
  """A logdir that cannot be used; the message is one line with the fix."""


def create(logdir):
  """The --logdir folder as a Path, made if missing; LogdirError (one line)
  when it is a file or cannot be made."""
  logdir = pathlib.Path(logdir).expanduser()
  if logdir.exists() and not logdir.is_dir():
    raise LogdirError(f'--logdir {logdir} is a file, not a folder.')
  try:
    logdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise LogdirError(
        f'cannot create --logdir {logdir}: {error.strerror}.') from None
  return logdir


class Lock:
  """Exclusive ownership of a logdir by this process (see module doc).

  `acquire()` returns a notice (str) when it took over a stale lock, else
  None; raises LogdirError naming the owner when another process holds it.
  It locks the file it opened and then checks that this file is still the
  one at `<logdir>/lock` (it retries when the path was removed or replaced
  in between), so two processes never both hold the file at the path.

  What it cannot prevent: `<logdir>/lock` deleted (or replaced) while the
  owner holds it. The owner's lock is then on a file no other process can
  open, and the next trainer creates a new file there and locks it without
  a word. `check()` is how the first owner finds out: the run loop calls it
  before each checkpoint save and stops when it returns a message. So the
  guarantee is that, after such a deletion, the first owner stops at its
  next check; until then two trainers may write to the logdir.

  On a shared filesystem: since Linux 2.6.12 an NFS client emulates flock
  with a byte-range lock on the whole file through the NFS locking (the
  protocol's own on NFSv4, the lockd/NLM side protocol on NFSv3), so it
  holds across hosts unless the mount has `nolock` or `local_lock=flock`
  (or `all`), which make locks local to one client. SMB/CIFS propagates
  flock only since Linux 5.5; Lustre with its `flock` mount option (the
  default of recent versions; `localflock` locks per client, `noflock`
  refuses locks). Elsewhere treat the lock as protecting one host only.
  When the host holding it is gone, the server releases the lock once it
  notices: when the client's lease expires on NFSv4 (90 s by default on a
  Linux server), or when the client reboots and says so on NFSv3.
  Otherwise the lock file names the owner's host and pid: check that this
  process is gone, then delete the file.
  """

  # Times acquire() retries when the path is removed or replaced between
  # its open and its lock (each retry needs another process to race it).
  ATTEMPTS = 5

  def __init__(self, logdir):
    self.path = pathlib.Path(logdir) / 'lock'
    self._file = None

  def acquire(self):
    for _ in range(self.ATTEMPTS):
      handle = self._open_locked()
      if _same_file(handle, self.path):
        break
      handle.close()  # Unlocks the file no longer at the path.
    else:
      raise LogdirError(
          f'{self.path} was deleted or replaced {self.ATTEMPTS} times while '
          'this process tried to lock it: stop whatever deletes it, or use '
          'another --logdir.')
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

  def _open_locked(self):
    """Opens `self.path` (creating it) and locks it, or raises."""
    try:
      handle = open(self.path, 'a+')
    except OSError as error:
      raise LogdirError(f'cannot write to {self.path.parent}: '
                        f'{error.strerror}.') from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: another process holds it.
      owner = _read_owner(handle)
      handle.close()
      raise LogdirError(
          f'another dreamer.py trains in {self.path.parent} ({owner}): wait '
          'for it or stop it, or use another --logdir.') from None
    except OSError as error:  # E.g. ENOLCK: NFS without its lock service.
      handle.close()
      raise LogdirError(
          f'cannot lock {self.path}: {error.strerror} (the filesystem may '
          'not support locks): use a --logdir on another filesystem.'
      ) from None
    return handle

  def check(self):
    """None while the file this process locked is still `<logdir>/lock`;
    else one line saying it was deleted or replaced (then another trainer
    may have taken the logdir) and what to do."""
    if self._file is None:
      raise RuntimeError(f'{self.path} is not held by this process.')
    if _same_file(self._file, self.path):
      return None
    now = 'is gone'
    try:
      with open(self.path) as handle:
        now = f'now names {_read_owner(handle)}'
    except OSError:
      pass
    return (f'{self.path} was deleted or replaced while this run trained '
            f'(it {now}): another trainer may now write to '
            f'{self.path.parent}, so this run stops without saving; check '
            'that no other dreamer.py trains there, then rerun the command '
            'to resume from the last checkpoint.')

  def release(self):
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def lock_owner(logdir):
  """'pid N on HOST' while a process holds `<logdir>/lock`, else None, for
  readers such as `python -m dreamer_tf.sweep --status`: it never writes
  the file and never waits for the lock."""
  try:
    handle = open(pathlib.Path(logdir) / 'lock')
  except OSError:
    return None
  with handle:
    try:
      text = handle.read().strip()
    except OSError:
      return None
    if not text:  # No owner: never probed, so a starting run is not raced.
      return None
    try:
      fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        owner = json.loads(text)
        return f'pid {owner["pid"]} on {owner["host"]}'
      except (ValueError, TypeError, KeyError):
        return 'owner unknown'
    except OSError:  # No locks on this filesystem: cannot tell.
      return None
    fcntl.flock(handle, fcntl.LOCK_UN)
    return None  # A stale lock of a killed run.


def _same_file(handle, path):
  """Whether the open `handle` is the file now at `path`."""
  try:
    held, current = os.fstat(handle.fileno()), os.stat(path)
  except OSError:  # Gone (or, on NFS, a stale handle).
    return False
  return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def _read_owner(handle):
  try:
    handle.seek(0)
    owner = json.loads(handle.read() or 'null')
    return (f'pid {owner["pid"]} on {owner["host"]}, started '
            f'{owner["started"]}')
  except (OSError, ValueError, TypeError, KeyError):
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
  write_atomic(path, json.dumps(content, indent=2) + '\n')


# ---------------------------------------------------------------- provenance

# The checkout whose commit a run records: the folder holding dreamer_tf/.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The packages whose versions a run records: {key: distribution names to try,
# first found wins}. Read from the installed metadata: nothing is imported.
PACKAGES = {
    'tensorflow': ('tensorflow', 'tensorflow-cpu', 'tf-nightly'),
    'tensorflow_probability': ('tensorflow-probability', 'tfp-nightly'),
    'keras': ('keras',),
    'tf_keras': ('tf-keras',),
    'dm_control': ('dm-control',),
    'mujoco': ('mujoco',),
    'numpy': ('numpy',),
}


def provenance(devices_line):
  """What produced a run, as a JSON-ready dict: `commit` (the HEAD of the
  checkout at `REPO_ROOT`, or 'unknown' when that folder is not the top of
  a git checkout or git is missing), `dirty` (whether tracked files differ
  from that commit; None when unknown; untracked files do not count),
  `versions` ({key of PACKAGES: version or None when not installed}),
  `host`, `devices` (the line `hardware.setup_tensorflow` returned) and
  `python`. Runs git twice; imports no TensorFlow."""
  commit, dirty = _git_state(REPO_ROOT)
  return dict(commit=commit, dirty=dirty, versions=_versions(),
              host=socket.gethostname(), devices=devices_line,
              python=platform.python_version())


def store_provenance(logdir, info):
  """Appends `info` (see `provenance`) with the time to
  `<logdir>/provenance.jsonl`: one line per process start, so a run resumed
  by other code or on another host has a line for each."""
  line = json.dumps(dict(
      time=datetime.datetime.now().isoformat(timespec='seconds'), **info))
  with open(pathlib.Path(logdir) / 'provenance.jsonl', 'a') as handle:
    handle.write(line + '\n')


def _git_state(root):
  """(commit, dirty) of the checkout whose top folder is `root`."""
  out = _git(root, 'rev-parse', '--show-toplevel', 'HEAD')
  lines = out.split() if out else []
  # A root without its own .git inside another checkout is not ours.
  if len(lines) != 2 or not _same_path(lines[0], root):
    return 'unknown', None
  status = _git(root, 'status', '--porcelain', '--untracked-files=no')
  return lines[1], None if status is None else bool(status.strip())


def _git(root, *args):
  """The stdout of `git *args` run in `root`, or None if it failed."""
  try:
    done = subprocess.run(['git', *args], cwd=root, capture_output=True,
                          text=True, timeout=60)
  except (OSError, subprocess.SubprocessError):  # No git, no folder, hung.
    return None
  return done.stdout if done.returncode == 0 else None


def _same_path(a, b):
  try:
    return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()
  except OSError:
    return False


def _versions():
  versions = {}
  for key, names in PACKAGES.items():
    versions[key] = None
    for name in names:
      try:
        versions[key] = importlib.metadata.version(name)
        break
      except importlib.metadata.PackageNotFoundError:
        continue
  return versions
