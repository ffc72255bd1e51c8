"""The logdir lock when its file is deleted or replaced (issue 19): the
owner finds out at its next check, and acquire() never holds a file that
is no longer at the path. Refusing a second lock while the first is held is
tested in test_safety.py. Pure Python, no TensorFlow."""

import errno
import fcntl
import os

import pytest

from dreamer_tf import rundir

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).

REAL_FLOCK = fcntl.flock


def test_the_owner_is_told_when_its_lock_file_is_deleted(tmp_path):
  lock = rundir.Lock(tmp_path)
  lock.acquire()
  assert lock.check() is None
  (tmp_path / 'lock').unlink()
  problem = lock.check()
  assert problem.startswith(f'{tmp_path / "lock"} was deleted or replaced '
                            'while this run trained (it is gone)')
  assert '\n' not in problem and 'stops without saving' in problem
  # What no check in acquire() can prevent: the deleted file is out of
  # reach, so the next trainer gets in. The first owner then names it.
  second = rundir.Lock(tmp_path)
  assert second.acquire() is None
  assert f'now names pid {os.getpid()} on ' in lock.check()
  assert second.check() is None
  lock.release()
  second.release()


def test_the_owner_is_told_when_its_lock_file_is_replaced(tmp_path):
  lock = rundir.Lock(tmp_path)
  lock.acquire()
  (tmp_path / 'lock.new').write_text('')
  os.replace(tmp_path / 'lock.new', tmp_path / 'lock')
  assert 'deleted or replaced' in lock.check()
  assert '(it now names unknown owner)' in lock.check()
  lock.release()


def flock_then(action, times=1):
  """A flock that runs `action()` before the first `times` locks, as if
  another process acted between acquire()'s open and its flock."""
  calls = []
  def flock(handle, operation):
    if operation != fcntl.LOCK_UN and len(calls) < times:
      calls.append(operation)
      action()
    return REAL_FLOCK(handle, operation)
  return flock, calls


def test_a_lock_file_deleted_before_the_flock_is_retried(tmp_path,
                                                         monkeypatch):
  path = tmp_path / 'lock'
  fake, calls = flock_then(path.unlink)
  monkeypatch.setattr(rundir.fcntl, 'flock', fake)
  lock = rundir.Lock(tmp_path)
  assert lock.acquire() is None
  assert len(calls) == 1 and path.exists()
  assert lock.check() is None     # The file held is the one at the path,
  monkeypatch.undo()
  with pytest.raises(rundir.LogdirError, match='another dreamer.py trains'):
    rundir.Lock(tmp_path).acquire()  # so a second trainer is refused.
  lock.release()


def test_a_lock_file_replaced_and_taken_before_the_flock_is_refused(
    tmp_path, monkeypatch):
  path = tmp_path / 'lock'
  other = []
  def replace_and_take():
    """Another trainer deletes the file, creates its own and locks it."""
    path.unlink()
    other.append(rundir.Lock(tmp_path))
    other[0].acquire()
  fake, _ = flock_then(replace_and_take)
  monkeypatch.setattr(rundir.fcntl, 'flock', fake)
  with pytest.raises(rundir.LogdirError,
                     match=f'another dreamer.py trains .*pid {os.getpid()}'):
    rundir.Lock(tmp_path).acquire()
  assert other[0].check() is None
  other[0].release()


def test_a_lock_file_replaced_again_and_again_is_one_line(tmp_path,
                                                          monkeypatch):
  path = tmp_path / 'lock'
  fake, calls = flock_then(path.unlink, times=100)
  monkeypatch.setattr(rundir.fcntl, 'flock', fake)
  with pytest.raises(rundir.LogdirError) as error:
    rundir.Lock(tmp_path).acquire()
  assert len(calls) == rundir.Lock.ATTEMPTS
  assert str(error.value) == (
      f'{path} was deleted or replaced {rundir.Lock.ATTEMPTS} times while '
      'this process tried to lock it: stop whatever deletes it, or use '
      'another --logdir.')


def test_a_filesystem_without_locks_is_not_called_another_trainer(
    tmp_path, monkeypatch):
  def no_locks(handle, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(rundir.fcntl, 'flock', no_locks)
  with pytest.raises(rundir.LogdirError) as error:
    rundir.Lock(tmp_path).acquire()
  assert str(error.value).startswith(
      f'cannot lock {tmp_path / "lock"}: {os.strerror(errno.ENOLCK)} (the '
      'filesystem may not support locks)')
