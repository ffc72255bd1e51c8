"""The run loop's schedule, in-process and in seconds: the real `Run` with
fake environments, a fake agent, policy, checkpoint and logger (no model, no
rendering). The expected schedules below are worked out by hand from the
flags, as docs/design.md section 5 states the schedule."""

import json

import numpy as np
import pytest
from fakes import IMAGE, FakeEnvs, make_fake_run

import dreamer
import wrappers
from dreamer_tf import faults, replay, rundir

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).


def config_for(logdir, **flags):
  config = dreamer.define_config()
  vars(config).update(dreamer.PRESETS['debug'])
  vars(config).update(
      logdir=logdir, prefill=500, train_every=300, train_steps=2,
      pretrain=3, eval_every=1000, log_every=600, time_limit=200,
      action_repeat=2, steps=1500)
  vars(config).update(flags)
  (logdir / 'episodes').mkdir(parents=True, exist_ok=True)
  return config


def episode_files(logdir):
  return sorted((logdir / 'episodes').glob('*.npz'))


def test_schedule_of_a_run_and_its_resume(tmp_path):
  config = config_for(tmp_path)
  run = make_fake_run(config)
  run.train_loop()
  agent, policy = run.agent, run.policy
  # Prefill: 500 steps of random actions, the policy is not called.
  training_calls = [step for step, training in policy.calls if training]
  assert training_calls[0] == 500
  # Steps advance by action_repeat per agent step, up to `steps`.
  assert training_calls == list(range(500, 1500, 2))
  assert run.step == 1500
  # Pretrain 3 at the first occasion, then 2 every 300 steps.
  assert agent.train_steps == [500] * 3 + [800] * 2 + [1100] * 2 + [1400] * 2
  assert agent.open_loop_steps == [500, 1100]   # Every 600 steps.
  # Evaluate (policy with training=False) before each collection chunk.
  eval_calls = sorted({step for step, training in policy.calls
                       if not training})
  assert eval_calls == [500]
  assert run.checkpoint.saves == [1500]
  # Episodes of 100 agent steps (200 env steps): 7 finished, 1400 steps.
  files = episode_files(tmp_path)
  assert len(files) == 7
  assert replay.count_steps(tmp_path / 'episodes', 2) == 1400
  with np.load(files[0]) as episode:
    assert episode['image'].shape == (101,) + IMAGE
  # Train metrics reach the logger at the log occasions.
  written = {step for step, names in run.logger.writes
             if 'openl_mse_h1' in names and 'model_loss' in names}
  assert written == {500, 1100}
  assert 'test/policy' in run.logger.videos
  assert 'train/openl' in run.logger.videos

  # Resume with more steps: the step comes from the checkpoint (1500, with
  # the unfinished episode) rather than the files (1400); no prefill, no
  # pretraining; training resumes at once.
  config = config_for(tmp_path, steps=2500)
  run = make_fake_run(config)
  assert run.restored and run.step == 1500
  run.train_loop()
  agent, policy = run.agent, run.policy
  training_calls = [step for step, training in policy.calls if training]
  assert training_calls == list(range(1500, 2500, 2))
  assert agent.train_steps == [1500] * 2 + [1800] * 2 + [2100] * 2 + \
      [2400] * 2
  assert agent.updates == 9 + 8
  assert agent.open_loop_steps == [1500, 2100]
  assert run.checkpoint.saves == [2500]
  assert len(episode_files(tmp_path)) == 7 + 5
  assert run.step == 2500


def test_two_evaluations_and_saves_and_the_end_between_occasions(tmp_path):
  # steps 2300: eval and save every 1000, the last chunk 300 steps long.
  config = config_for(tmp_path, steps=2300, train_every=1000, log_every=0)
  run = make_fake_run(config)
  run.train_loop()
  eval_steps = sorted({s for s, training in run.policy.calls if not training})
  assert eval_steps == [500, 1500]
  assert run.checkpoint.saves == [1500, 2300]
  assert run.agent.train_steps == [500] * 3 + [1500] * 2
  assert run.agent.open_loop_steps == []   # log_every 0: never.
  assert run.step == 2300


def test_two_envs_count_both(tmp_path):
  config = config_for(tmp_path, envs=2, steps=1000)
  run = make_fake_run(config)
  run.train_loop()
  training_calls = [s for s, training in run.policy.calls if training]
  # One policy call per agent step of both envs: 4 env steps per call.
  assert training_calls == list(range(500, 1000, 4))
  assert run.step == 1000
  # 2 x 100 agent steps per pair of episodes: 1000 steps make 4 episodes
  # (2 at 400 and 2 at 800) and leave 2 unfinished.
  assert len(episode_files(tmp_path)) == 4


def test_a_run_already_at_its_end_does_nothing(tmp_path):
  config = config_for(tmp_path, steps=1000)
  make_fake_run(config).train_loop()
  again = make_fake_run(config)
  again.train_loop()
  assert again.policy.calls == [] and again.agent.train_steps == []
  assert again.checkpoint.saves == [] and again.step == 1000


class Terminal:
  """A stdout that says it is an interactive terminal and keeps the text."""

  def __init__(self):
    self.text = ''

  def write(self, text):
    self.text += text

  def flush(self):
    pass

  def isatty(self):
    return True


def test_the_overall_progress_line_on_a_terminal(tmp_path, monkeypatch):
  terminal = Terminal()
  monkeypatch.setattr('sys.stdout', terminal)
  make_fake_run(config_for(tmp_path, steps=1000)).train_loop()
  screens = terminal.text.replace('\n', '\r').split('\r')
  lines = [s for s in screens if s.startswith('run ')]
  assert lines[0].startswith('run 0/1000 env steps   0%')
  assert any(s.startswith('run 500/1000 env steps  50%') for s in lines)
  assert any(s.startswith('run 1000/1000 env steps 100%') for s in lines)
  assert all(' left' in s and 'elapsed' in s for s in lines)
  # Resumed: counted from the resumed step, not from zero.
  terminal.text = ''
  make_fake_run(config_for(tmp_path, steps=1600)).train_loop()
  screens = terminal.text.replace('\n', '\r').split('\r')
  lines = [s for s in screens if s.startswith('run ')]
  assert lines[0].startswith('run 1000/1600 env steps  62%')
  assert lines[-1].startswith('run 1600/1600')


def test_no_progress_line_when_not_a_terminal(tmp_path, capsys):
  make_fake_run(config_for(tmp_path, steps=1000)).train_loop()
  out = capsys.readouterr().out
  assert 'env steps' not in out and '\r' not in out
  assert 'Done: 1000 environment steps.' in out


def test_a_check_that_turns_into_a_problem_is_said_once(tmp_path, capsys):
  # A collapsed KL from the first update on: the third logged point (at
  # step 1100, after 500 and 800) makes the check a problem, and the run
  # says so once, not on every log step.
  config = config_for(tmp_path, steps=3000, log_every=300)
  run = make_fake_run(config, {'model_loss': 1.0, 'kl': 0.1})
  run.train_loop()
  lines = [line for line in capsys.readouterr().out.splitlines()
           if 'doctor:' in line]
  assert len(lines) == 1, lines
  assert lines[0].startswith('[1100] doctor: KL (posterior vs prior) is a '
                             'problem since step 500')
  assert '--free_nats' in lines[0]


def test_a_nan_loss_stops_and_keeps_the_batch(tmp_path):
  import math

  import pytest
  run = make_fake_run(config_for(tmp_path), {'model_loss': math.nan})
  with pytest.raises(faults.NonFinite, match='model_loss = nan at step 500'):
    run.train_loop()
  with np.load(tmp_path / 'nan' / 'batch-500.npz') as batch:
    assert batch['image'].shape == (10,) + IMAGE
  info = json.loads((tmp_path / 'nan' / 'info-500.json').read_text())
  assert info['losses'] == {'model_loss': None} or math.isnan(
      info['losses']['model_loss'])
  assert info['last_checkpoint'] is None
  assert run.checkpoint.saves == []   # The bad state is never saved.


def test_a_nan_loss_is_skipped_and_counted_when_asked(tmp_path):
  import math
  run = make_fake_run(config_for(tmp_path, on_nan='skip'),
                      {'model_loss': math.nan})
  run.train_loop()
  assert run.step == 1500 and not (tmp_path / 'nan').exists()
  assert run._nan_steps == len(run.agent.train_steps) == 9


def test_a_non_finite_action_never_reaches_the_environment(tmp_path):
  import pytest
  run = make_fake_run(config_for(tmp_path))
  sent = []
  for envs in (run.train_envs, run.eval_env):
    envs.step = lambda actions, step=envs.step: (
        sent.append(actions) or step(actions))
  def nan_policy(images, reset, state, training, amount):
    return np.full((len(images), 1), np.nan, np.float32), state
  run.policy = nan_policy
  with pytest.raises(faults.NonFinite, match='non-finite action'):
    run.train_loop()
  assert all(np.all(np.isfinite(a)) for actions in sent for a in actions)


def test_a_foreign_file_does_not_count_and_is_moved_aside(tmp_path, capsys):
  config = config_for(tmp_path, steps=1000)
  make_fake_run(config).train_loop()
  # An empty file whose name claims 100,000 steps: it would end the run.
  bogus = tmp_path / 'episodes' / '20260101T000000-bogus-50001.npz'
  bogus.write_bytes(b'')
  run = make_fake_run(config_for(tmp_path, steps=2000))
  assert run.step == 1000
  assert (tmp_path / 'episodes' / 'rejected' / bogus.name).exists()
  assert f'moved {bogus.name}' in capsys.readouterr().out
  run.train_loop()
  assert run.step == 2000 and len(run.agent.train_steps) > 0


def test_a_full_disk_is_one_line_after_keeping_the_last_state(tmp_path,
                                                             capsys):
  import errno
  import os
  config = config_for(tmp_path, steps=1000)
  run = make_fake_run(config)
  run.train_loop()
  path = str(tmp_path / 'metrics.jsonl')
  def full(step):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
  run.logger.write = full
  status = faults.crashed(run, tmp_path, OSError(
      errno.ENOSPC, os.strerror(errno.ENOSPC), path))
  err = capsys.readouterr().err.strip()
  assert status == 1 and len(err.splitlines()) == 1
  assert err.startswith('dreamer.py: error: no space left on ')
  assert f'writing {path}' in err
  # The save was tried; it wrote no half state (the logger failed first).
  assert 'could not save a checkpoint' in err
  assert run.checkpoint.saves == [1000]


def test_a_deleted_lock_file_stops_the_run_before_it_saves(tmp_path):
  # Deleting <logdir>/lock lets a second trainer in; the owner must notice
  # at its next save and stop without writing a checkpoint.
  config = config_for(tmp_path)
  lock = rundir.Lock(tmp_path)
  lock.acquire()
  run = make_fake_run(config)
  run.lock = lock
  (tmp_path / 'lock').unlink()
  second = rundir.Lock(tmp_path)
  second.acquire()  # The intruder gets the new file.
  try:
    with pytest.raises(rundir.LogdirError, match='deleted or replaced'):
      run.train_loop()
  finally:
    second.release()
    lock.release()
  assert run.checkpoint.saves == []


@pytest.mark.parametrize('envs,prefill,time_limit,repeat', [
    (1, 500, 200, 2), (4, 500, 200, 2), (2, 500, 200, 2),
    (3, 600, 200, 2), (3, 595, 200, 2), (3, 594, 200, 2),
    (1, 500, 1000, 2), (2, 401, 201, 2), (2, 399, 201, 2),
    (2, 600, 200, 3), (2, 390, 200, 3), (1, 0, 200, 2),
    (6, 5000, 1000, 2), (5, 5000, 1000, 2),
])
def test_the_prefill_check_accepts_what_the_loop_can_train_on(
    tmp_path, monkeypatch, envs, prefill, time_limit, repeat):
  # check_config's arithmetic against Run._collect: it accepts exactly the
  # prefills that store an episode, which the first training waits for
  # (30 s, then a crash on every rerun: issue 19).
  monkeypatch.setattr(wrappers, 'check_task', lambda task: None)
  monkeypatch.setattr(wrappers, 'check_rendering', lambda: None)
  config = config_for(tmp_path, envs=envs, prefill=prefill, steps=prefill +
                      600, time_limit=time_limit, action_repeat=repeat)
  try:
    dreamer.check_config(config)
    accepted = True
  except ValueError as error:
    assert 'raise --prefill to ' in str(error), error
    accepted = False
  run = make_fake_run(config)
  if not accepted:
    run.prefill(prefill)
    assert run.step >= prefill and not episode_files(tmp_path)
    return
  run.train_loop()   # Would wait 30 s and raise without an episode.
  assert run.step >= config.steps and run.agent.updates > 0
  assert run.agent.train_steps[0] >= prefill


def test_a_prefill_rerun_after_a_kill_collects_new_episodes(tmp_path):
  # kill -9 during the prefill: the finished episodes stay, no checkpoint
  # and no logs (the prefill writes them at its end). The rerun prefills
  # on from the stored steps; its random actions must not replay those of
  # the killed process (the same seed would give the same episodes).
  def episodes_and_distinct_actions():
    stored = []
    for path in episode_files(tmp_path):
      with np.load(path) as episode:   # Entry 0 is the reset.
        stored.append(episode['action'][1:].tobytes())
    return len(stored), len(set(stored))
  config = config_for(tmp_path, prefill=1000, steps=2000)
  make_fake_run(config).prefill(500)   # Killed at 500: 2 episodes stored.
  assert episodes_and_distinct_actions() == (2, 2)
  rerun = make_fake_run(config)
  assert not rerun.restored and rerun.step == 400
  rerun.prefill(config.prefill - rerun.step)   # As train_loop does.
  # Episodes end at 600, 800 and 1000, each with actions of its own.
  assert episodes_and_distinct_actions() == (5, 5)
  # Killed again: the next rerun draws new actions again.
  again = make_fake_run(config_for(tmp_path, prefill=1400, steps=2000))
  assert again.step == 1000
  again.prefill(400)
  assert episodes_and_distinct_actions() == (7, 7)


class SignalOnStep(FakeEnvs):
  """Sends this process `signum` at agent step `at`, from inside a
  finaliser: Python drops an exception raised there ("Exception ignored
  in"), as it did in logging's fork hook when a SIGTERM's handler raised
  KeyboardInterrupt, and the run then neither saved nor stopped."""

  def __init__(self, count, config, signum, at):
    super().__init__(count, config)
    self._signum, self._at, self._steps = signum, at, 0

  def step(self, actions):
    import os

    class Finaliser:
      def __del__(inner):
        os.kill(os.getpid(), self._signum)
    self._steps += 1
    if self._steps == self._at:
      Finaliser()  # Freed at once: its __del__ runs here.
    return super().step(actions)


@pytest.mark.parametrize('signum,at', [
    ('SIGTERM', 400), ('SIGINT', 400), ('SIGTERM', 100), ('SIGINT', 100)])
def test_a_signal_inside_a_finaliser_still_stops_and_saves(
    tmp_path, capsys, sigint_catchable, signum, at):
  import signal

  from dreamer_tf import interrupts
  signum = getattr(signal, signum)
  config = config_for(tmp_path)
  run = make_fake_run(config)
  # Agent step 400: in the training, after the prefill's 250, at env step
  # 800 of 1500; agent step 100: in the prefill, at env step 200.
  run.train_envs = SignalOnStep(config.envs, config, signum, at)
  with interrupts.deferred():
    status = dreamer.train_to_end(run, tmp_path)
  step = 2 * at
  assert status == 130
  assert run.step == step and run.checkpoint.saves == [step]
  assert f'Interrupted at step {step}: saving a checkpoint.' in \
      capsys.readouterr().out
  assert run.train_envs.closed
