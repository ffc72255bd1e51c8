"""Checkpoints that survive a move of the logdir, readers that write
nothing, no silent fresh start beside checkpoint files, and --mode eval
that keeps its result when it cannot write. Each test fails on the code
before these protections."""

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from dreamer_tf import evaluate
from dreamer_tf.checkpoint import Checkpointer

# One worker builds the file's agents (pytest.ini: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('checkpoint')


@pytest.fixture(scope='module')
def agents():
  """One tiny agent that saves and one that restores, for the whole file
  (each build takes seconds). Tests set the saved weights themselves."""
  from dreamer_tf import agent as agent_lib
  from tiny import tiny_config
  return agent_lib.Dreamer(tiny_config(), 2), agent_lib.Dreamer(
      tiny_config(), 2)


def weights(agent):
  return agent.encoder.trainable_variables[0]


def save_two(agent, logdir):
  """ckpt-1 at step 100 (weights 1.0) and ckpt-2 at step 200 (weights
  2.0), as the owner; returns both paths."""
  checkpoint = Checkpointer(agent, logdir, owner=True)
  paths = []
  for step, value in ((100, 1.0), (200, 2.0)):
    weights(agent).assign(tf_full(weights(agent), value))
    paths.append(checkpoint.save(step))
  return paths


def tf_full(variable, value):
  return np.full_like(variable.numpy(), value)


def corrupt(path):
  """Truncates a checkpoint's data, as a full disk or a kill might."""
  path = pathlib.Path(path)
  for data in path.parent.glob(path.name + '.data-*'):
    data.write_bytes(data.read_bytes()[:100])


def restored(agent, logdir, owner):
  """A fresh Checkpointer's restore() into `agent` (weights zeroed first):
  (returned value, step, the weights' value)."""
  weights(agent).assign(tf_full(weights(agent), 0.0))
  checkpoint = Checkpointer(agent, logdir, owner=owner)
  result = checkpoint.restore()
  return result, checkpoint.step, float(weights(agent).numpy().mean())


def hashes(folder):
  return {str(path.relative_to(folder)): hashlib.sha256(
      path.read_bytes()).hexdigest() if path.is_file() else 'folder'
      for path in sorted(pathlib.Path(folder).rglob('*'))}


def test_a_moved_logdir_resumes_the_checkpoint_it_fell_back_to(
    tmp_path, agents, capsys):
  saver, loader = agents
  logdir = tmp_path / 'cluster'
  _, newest = save_two(saver, logdir)
  corrupt(newest)
  assert restored(loader, logdir, owner=True) == (True, 100, 1.0)
  assert f'cannot read the checkpoint {newest}' in capsys.readouterr().out
  # The next rerun (the first one saved nothing) still resumes ckpt-1.
  assert restored(loader, logdir, owner=True) == (True, 100, 1.0)
  index = (logdir / 'checkpoints' / 'checkpoint').read_text()
  assert str(tmp_path) not in index  # Names only, no absolute paths.
  # Moved to another name (cluster storage -> laptop): the same checkpoint
  # for a reader (eval) and for the owner (a training rerun).
  moved = tmp_path / 'laptop'
  shutil.move(logdir, moved)
  assert restored(loader, moved, owner=False) == (True, 100, 1.0)
  assert restored(loader, moved, owner=True) == (True, 100, 1.0)
  # The next save replaces the unreadable ckpt-2, beside ckpt-1.
  checkpoint = Checkpointer(loader, moved, owner=True)
  assert checkpoint.restore()
  weights(loader).assign(tf_full(weights(loader), 3.0))
  assert checkpoint.save(300) == str(moved / 'checkpoints' / 'ckpt-2')
  assert restored(saver, moved, owner=False) == (True, 300, 3.0)
  assert sorted(p.name for p in (moved / 'checkpoints').glob('*.index')) == [
      'ckpt-1.index', 'ckpt-2.index']


def test_an_index_of_absolute_paths_is_read_in_the_logdir_it_is_in(
    tmp_path, agents, capsys):
  # Earlier versions wrote absolute paths after a fallback. A copy reads its
  # own files, even while the original is still there, and its owner never
  # deletes the original's.
  import tensorflow as tf
  saver, loader = agents
  original = tmp_path / 'original'
  first, _ = save_two(saver, original)
  tf.compat.v1.train.update_checkpoint_state(
      str(original / 'checkpoints'), first, all_model_checkpoint_paths=[first])
  assert str(original) in (original / 'checkpoints' / 'checkpoint').read_text()
  copy = tmp_path / 'copy'
  shutil.copytree(original, copy)
  weights(saver).assign(tf_full(weights(saver), 7.0))
  Checkpointer(saver, original, owner=True).save(700)  # Only the original.
  before = hashes(original)
  assert restored(loader, copy, owner=False) == (True, 100, 1.0)
  assert restored(loader, copy, owner=True) == (True, 100, 1.0)
  checkpoint = Checkpointer(loader, copy, owner=True)
  assert checkpoint.restore()
  for step in (800, 900, 1000):  # Sweeps the copy's old checkpoints.
    checkpoint.save(step)
  assert hashes(original) == before
  assert 'Warning' not in capsys.readouterr().out


def test_eval_falls_back_in_memory_and_writes_nothing(tmp_path, agents,
                                                      capsys):
  saver, loader = agents
  _, newest = save_two(saver, tmp_path)
  corrupt(newest)
  before = hashes(tmp_path / 'checkpoints')
  checkpoint = Checkpointer(loader, tmp_path)
  assert checkpoint.restore() and checkpoint.step == 100
  assert checkpoint.latest == str(tmp_path / 'checkpoints' / 'ckpt-1')
  assert f'cannot read the checkpoint {newest}' in capsys.readouterr().out
  assert hashes(tmp_path / 'checkpoints') == before
  with pytest.raises(RuntimeError, match='only the owner'):
    checkpoint.save(300)
  assert hashes(tmp_path / 'checkpoints') == before


@pytest.mark.parametrize('index', ['deleted', 'names_a_missing_one', 'empty'])
def test_checkpoint_files_are_never_ignored_for_a_fresh_start(
    tmp_path, agents, capsys, index):
  saver, loader = agents
  save_two(saver, tmp_path)
  file = tmp_path / 'checkpoints' / 'checkpoint'
  if index == 'deleted':
    file.unlink()
  elif index == 'names_a_missing_one':
    file.write_text('model_checkpoint_path: "/elsewhere/ckpt-7"\n'
                    'all_model_checkpoint_paths: "/elsewhere/ckpt-7"\n')
  else:
    file.write_text('')
  # The newest checkpoint in the folder, saying why.
  assert restored(loader, tmp_path, owner=False) == (True, 200, 2.0)
  out = capsys.readouterr().out
  assert 'trying the other checkpoints in' in out and 'newest first' in out
  assert restored(loader, tmp_path, owner=True) == (True, 200, 2.0)
  capsys.readouterr()
  # The owner wrote the index anew: the next restore needs no fallback.
  assert restored(loader, tmp_path, owner=False) == (True, 200, 2.0)
  assert 'Warning' not in capsys.readouterr().out
  # None of them readable: one error naming the folder, not a fresh start.
  file.unlink()
  for data in (tmp_path / 'checkpoints').glob('*.data-*'):
    data.write_bytes(b'')
  with pytest.raises(ValueError, match=f'no checkpoint in '
                     f'{tmp_path / "checkpoints"} can be read'):
    Checkpointer(loader, tmp_path, owner=True).restore()


def test_a_logdir_without_checkpoints_starts_afresh(tmp_path, agents):
  _, loader = agents
  assert Checkpointer(loader, tmp_path, owner=True).restore() is False
  assert not (tmp_path / 'checkpoints').exists()
  # Only an empty index (no checkpoint files): afresh too, and it saves.
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / 'checkpoint').write_text('')
  checkpoint = Checkpointer(loader, tmp_path, owner=True)
  assert checkpoint.restore() is False
  checkpoint.save(100)
  assert restored(loader, tmp_path, owner=False)[:2] == (True, 100)


# --- Task: evaluation keeps its result when it cannot write. ---

RESULT = dict(step=2500, returns=[10.0, 30.0], mean=20.0, std=10.0)


def episodes():
  return [dict(image=np.zeros((5, 64, 64, 3), np.uint8))]


def test_the_evaluation_result_is_reported_and_written(tmp_path, capsys):
  assert evaluate.report('dmc_cartpole_balance', RESULT, episodes(),
                         tmp_path / 'eval')
  out = capsys.readouterr()
  assert out.out.startswith('dmc_cartpole_balance at step 2500: return 20.0'
                            ' +- 10.0 over 2 episodes (min 10.0, max 30.0).')
  assert 'Wrote' in out.out and out.err == ''
  assert json.loads((tmp_path / 'eval' / 'returns.json').read_text()) == \
      RESULT
  assert (tmp_path / 'eval' / 'episode_0.mp4').stat().st_size > 0


def read_only(tmp_path):
  """Makes eval/ impossible to create: a read-only logdir, or (as root,
  where permissions do not stop writes) a file in the way. The reason the
  warning gives."""
  if os.geteuid() == 0:
    (tmp_path / 'eval').write_text('')
    return f'{tmp_path / "eval"} is a file, not a folder'
  tmp_path.chmod(0o555)
  return 'Permission denied'


def test_evaluation_prints_its_result_when_it_cannot_write(tmp_path, capsys):
  reason = read_only(tmp_path)
  try:
    saved = evaluate.report('dmc_cartpole_balance', RESULT, episodes(),
                            tmp_path / 'eval')
  finally:
    tmp_path.chmod(0o755)
  out = capsys.readouterr()
  assert saved is False
  assert 'at step 2500: return 20.0 +- 10.0' in out.out
  assert 'Wrote' not in out.out
  assert out.err == (f'dreamer.py: warning: cannot write '
                     f'{tmp_path / "eval" / "returns.json"}: {reason} '
                     '(the result above is not saved)\n')


def test_a_video_that_cannot_be_written_keeps_the_returns(
    tmp_path, capsys, monkeypatch):
  import tools
  def fail(path, frames):
    raise OSError(30, 'Read-only file system')
  monkeypatch.setattr(tools, 'write_video', fail)
  assert evaluate.report('dmc_cartpole_balance', RESULT, episodes(),
                         tmp_path / 'eval')
  out = capsys.readouterr()
  assert out.err == (f'dreamer.py: warning: cannot write '
                     f'{tmp_path / "eval" / "episode_0.mp4"}: Read-only file '
                     'system (no video)\n')
  assert f'Wrote {tmp_path / "eval" / "returns.json"}.' in out.out
  assert json.loads((tmp_path / 'eval' / 'returns.json').read_text()) == \
      RESULT


# --- Task: a precision change on resume restarts the loss scale. ---


@pytest.fixture(scope='module')
def precisions():
  """One tiny agent per 16-bit policy, forced as on a CPU (mixed_bfloat16,
  no loss scaling) and on a GPU (mixed_float16, loss scaling)."""
  from dreamer_tf import agent as agent_lib
  from tiny import tiny_config
  return {policy: agent_lib.Dreamer(tiny_config(), 2, policy=policy)
          for policy in ('mixed_bfloat16', 'mixed_float16')}


def optimizers(agent):
  return agent.model_opt, agent.actor_opt, agent.value_opt


def scales(agent):
  """Each optimizer's (loss scale, good steps)."""
  return [(float(opt.loss_scale.numpy()),
           int(opt.checkpoint_items()['good_steps'].numpy()))
          for opt in optimizers(agent)]


def set_scales(agent, values):
  for opt, (scale, good) in zip(optimizers(agent), values):
    opt.loss_scale.assign(scale)
    opt.checkpoint_items()['good_steps'].assign(good)


def notices(out):
  return [line for line in out.splitlines() if line.startswith('Notice')]


INITIAL = [(2.0 ** 15, 0)] * 3


def test_a_run_resumed_under_float16_restarts_its_loss_scale(
    tmp_path, precisions, capsys):
  bf16, f16 = precisions['mixed_bfloat16'], precisions['mixed_float16']
  weights(bf16).assign(tf_full(weights(bf16), 5.0))
  Checkpointer(bf16, tmp_path, owner=True).save(100)  # On a CPU.
  assert scales(bf16) == [(1.0, 0)] * 3
  set_scales(f16, [(4.0, 9)] * 3)
  # On a GPU: the weights, not the scale of 1 that would underflow.
  assert restored(f16, tmp_path, owner=True) == (True, 100, 5.0)
  assert scales(f16) == INITIAL
  assert notices(capsys.readouterr().out) == [
      'Notice: this checkpoint was trained under mixed_bfloat16 and resumes '
      'under mixed_float16: the loss scale restarts at 32768.']
  # A reader (--mode eval) resets it too, without the notice: it does not
  # train.
  set_scales(f16, [(4.0, 9)] * 3)
  assert restored(f16, tmp_path, owner=False) == (True, 100, 5.0)
  assert scales(f16) == INITIAL
  assert notices(capsys.readouterr().out) == []
  # Back on a CPU the scale is unused: reset quietly to 1.
  set_scales(f16, [(64.0, 3)] * 3)
  weights(f16).assign(tf_full(weights(f16), 6.0))
  Checkpointer(f16, tmp_path, owner=True).save(200)
  assert restored(bf16, tmp_path, owner=True) == (True, 200, 6.0)
  assert scales(bf16) == [(1.0, 0)] * 3
  assert notices(capsys.readouterr().out) == []


def test_a_resume_under_the_same_policy_keeps_the_loss_scale(
    tmp_path, precisions, capsys):
  f16 = precisions['mixed_float16']
  # After overflows and finite steps; a scale of 1 is kept too.
  kept = [(256.0, 17), (2.0 ** 17, 1999), (1.0, 5)]
  set_scales(f16, kept)
  weights(f16).assign(tf_full(weights(f16), 7.0))
  Checkpointer(f16, tmp_path, owner=True).save(300)
  set_scales(f16, INITIAL)
  assert restored(f16, tmp_path, owner=True) == (True, 300, 7.0)
  assert scales(f16) == kept
  assert notices(capsys.readouterr().out) == []


def save_old_format(agent, logdir, step):
  """A checkpoint as written before the policy was recorded: the step and
  the agent's items, nothing else."""
  import tensorflow as tf
  checkpoint = tf.train.Checkpoint(
      step=tf.Variable(step, dtype=tf.int64), **agent.checkpoint_items())
  manager = tf.train.CheckpointManager(
      checkpoint, logdir / 'checkpoints', max_to_keep=2)
  return manager.save()


def test_a_checkpoint_written_before_the_policy_was_recorded_restores(
    tmp_path, agents, precisions, capsys):
  saver, loader = agents  # float32: restored as before, scale 1 kept.
  weights(saver).assign(tf_full(weights(saver), 8.0))
  save_old_format(saver, tmp_path / 'float32', 400)
  assert restored(loader, tmp_path / 'float32', owner=True) == (
      True, 400, 8.0)
  assert scales(loader) == [(1.0, 0)] * 3
  assert notices(capsys.readouterr().out) == []
  # Trained under float16: the scales are kept, but for the one at 1.
  f16 = precisions['mixed_float16']
  set_scales(f16, [(512.0, 4), (1.0, 6), (2.0 ** 16, 8)])
  weights(f16).assign(tf_full(weights(f16), 9.0))
  save_old_format(f16, tmp_path / 'float16', 500)
  set_scales(f16, [(2.0, 1)] * 3)
  assert restored(f16, tmp_path / 'float16', owner=True) == (True, 500, 9.0)
  assert scales(f16) == [(512.0, 4), (2.0 ** 15, 0), (2.0 ** 16, 8)]
  assert len(notices(capsys.readouterr().out)) == 1
  # Trained on a CPU (scale 1), resumed on a GPU: restarts, saying so.
  bf16 = precisions['mixed_bfloat16']
  weights(bf16).assign(tf_full(weights(bf16), 10.0))
  save_old_format(bf16, tmp_path / 'cpu', 600)
  checkpoint = Checkpointer(f16, tmp_path / 'cpu', owner=True)
  assert checkpoint.restore() and checkpoint.step == 600
  assert float(weights(f16).numpy().mean()) == 10.0
  assert scales(f16) == INITIAL
  assert notices(capsys.readouterr().out) == [
      'Notice: this checkpoint records no precision and its loss scale is 1 '
      '(trained without loss scaling?); it resumes under mixed_float16: the '
      'loss scale restarts at 32768.']
  # The next save numbers on and records the policy: no notice again.
  assert checkpoint.save(700) == str(tmp_path / 'cpu' / 'checkpoints' /
                                     'ckpt-2')
  set_scales(f16, [(8.0, 2)] * 3)
  assert restored(f16, tmp_path / 'cpu', owner=True) == (True, 700, 10.0)
  assert scales(f16) == INITIAL
  assert notices(capsys.readouterr().out) == []
