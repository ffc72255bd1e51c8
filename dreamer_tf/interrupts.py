"""Ctrl-C and a scheduler's SIGTERM: a request to stop, honoured at the
run's next safe point.

Python calls a signal handler between any two bytecodes of the main thread:
also inside a finaliser or a fork hook, where an exception it raises is
printed and dropped ("Exception ignored in ..."), and inside an import,
where it leaves a module half-imported. A handler that raised
KeyboardInterrupt could therefore be lost: the run neither saved nor
stopped, and a scheduler killed it after its grace period. So the handler
here only records the signal, and the run calls `check` where stopping is
safe: between two environment steps (tools.simulate), two updates and two
phases of the start-up. `check` then raises KeyboardInterrupt, which the
run handles as before (it saves and exits 130).

A second Ctrl-C raises at once, for a run that hangs. A signal that was
ignored when `deferred` began (SIGINT in a shell's background job) stays
ignored.
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received = []  # The signal numbers received inside `deferred`.


def _record(signum, frame):
  if signum == signal.SIGINT and signal.SIGINT in _received:
    raise KeyboardInterrupt  # Ctrl-C twice: stop now.
  _received.append(signum)


@contextlib.contextmanager
def deferred():
  """Inside the block, SIGINT and SIGTERM only request a stop (`check`).
  The handlers before it are restored after it. Outside the main thread,
  where no handler can be set, it changes nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {}
  for signum in SIGNALS:
    if signal.getsignal(signum) != signal.SIG_IGN:
      previous[signum] = signal.signal(signum, _record)
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    _received.clear()


def requested():
  """True once SIGINT or SIGTERM came inside `deferred`."""
  return bool(_received)


def check():
  """A safe point: raises KeyboardInterrupt when a stop was requested."""
  if _received:
    raise KeyboardInterrupt
