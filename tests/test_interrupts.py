"""Ctrl-C and SIGTERM only request a stop (dreamer_tf.interrupts); the run
stops at its next safe point. The run loop's side: tests/test_loop.py."""

import signal

import pytest

from dreamer_tf import interrupts

pytestmark = [pytest.mark.quick, pytest.mark.usefixtures('sigint_catchable')]


@pytest.mark.parametrize('name', ['SIGINT', 'SIGTERM'])
def test_a_signal_waits_for_the_next_check(name):
  signum = getattr(signal, name)
  before = signal.getsignal(signum)
  with interrupts.deferred():
    signal.raise_signal(signum)   # Nothing raised here...
    assert interrupts.requested()
    with pytest.raises(KeyboardInterrupt):
      interrupts.check()           # ...but at the safe point.
  assert signal.getsignal(signum) == before
  assert not interrupts.requested()
  interrupts.check()  # The request ended with the block.


def test_a_second_ctrl_c_stops_at_once():
  with interrupts.deferred():
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)


def test_no_request_no_stop():
  with interrupts.deferred():
    interrupts.check()
    assert not interrupts.requested()


def test_an_ignored_ctrl_c_stays_ignored():
  # A shell's background job starts with SIGINT ignored.
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with interrupts.deferred():
      assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
      signal.raise_signal(signal.SIGINT)
      assert not interrupts.requested()
      interrupts.check()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_signal_held_by_a_team_step_reaches_the_request():
  # The chief of a multi_worker run holds signals during a collective step;
  # after it, they go to the handler before it (here: the request).
  from dreamer_tf import distribute
  with interrupts.deferred():
    with distribute._signals_held():
      signal.raise_signal(signal.SIGTERM)
      signal.raise_signal(signal.SIGINT)  # Even a second one waits.
      assert not interrupts.requested()
    assert interrupts.requested()
    with pytest.raises(KeyboardInterrupt):
      interrupts.check()
