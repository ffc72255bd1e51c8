"""The run's checkpoints in <logdir>/checkpoints, with the fallback to the
one before when the newest cannot be read.

The index file `checkpoints/checkpoint` (TensorFlow's CheckpointState) names
checkpoints by their file names only, so a logdir can be moved, copied or
renamed: every name in it is looked up in this logdir's own folder, also the
absolute paths that earlier versions wrote after a fallback. Only the run's
owner (the trainer) rewrites the index; readers (--mode eval) fall back in
memory and write nothing."""

import os
import pathlib
import re
import shutil
import time

from dreamer_tf import progress, rundir

_NAME = re.compile(r'ckpt-(\d+)\.index')


class Checkpointer:
  """The agent's weights, its three optimizers' states and the step counter
  in <logdir>/checkpoints; the last 2 are kept. TensorFlow writes each under
  a temporary name and renames it, so a crash never leaves half of one. The
  run's owner (`owner=True`) removes the temporary folders a killed save
  leaves behind, rewrites the index after a restore and is the only one
  that saves; a reader (`owner=False`) never writes into the folder.

  Each checkpoint also records the agent's dtype policy (`policy`, a
  string). Resumed under another one, the loss scale restarts (see
  `_fit_loss_scale`); checkpoints written before the policy was recorded
  restore as before."""

  def __init__(self, agent, logdir, owner=False):
    import tensorflow as tf
    self._tf = tf
    self._agent = agent
    self._owner = owner
    self._directory = pathlib.Path(logdir) / 'checkpoints'
    if owner:
      for leftover in self._directory.glob('*_temp'):
        shutil.rmtree(leftover, ignore_errors=True)
    self._step = tf.Variable(0, dtype=tf.int64, name='step')
    with tf.device('CPU:0'):  # A string: no GPU kernels.
      self._policy = tf.Variable(
          agent.policy, dtype=tf.string, trainable=False, name='policy')
    items = dict(step=self._step, **agent.checkpoint_items())
    # Saved: the items and the policy. Restored, with every object matched:
    # the items only, so that a checkpoint without the policy (written
    # before it was recorded) still fits; the policy is read on its own.
    self._checkpoint = tf.train.Checkpoint(policy=self._policy, **items)
    self._restorer = tf.train.Checkpoint(**items)
    self._manager = self._make_manager()
    self._latest = None  # The checkpoint restored or saved by this object.

  def _make_manager(self):
    try:
      return self._tf.train.CheckpointManager(
          self._checkpoint, self._directory, max_to_keep=2)
    except ValueError:  # The index names no latest checkpoint: see restore.
      return None

  def _here(self, name):
    """A checkpoint named in the index, as a path in this folder."""
    return os.path.join(str(self._directory), os.path.basename(name))

  @property
  def latest(self):
    if self._latest:
      return self._latest
    latest = self._manager and self._manager.latest_checkpoint
    return latest and self._here(latest)

  @property
  def step(self):
    return int(self._step)

  def candidates(self):
    """(listed, found): the checkpoints the index names, newest first, each
    looked up by its name in this folder; then the other `ckpt-N` in the
    folder, highest N first."""
    try:
      state = self._tf.train.get_checkpoint_state(str(self._directory))
    except ValueError:  # An index that names no latest checkpoint.
      state = None
    listed = []
    if state is not None:
      names = [*state.all_model_checkpoint_paths, state.model_checkpoint_path]
      for name in reversed(names):
        if self._here(name) not in listed:
          listed.append(self._here(name))
    numbers = []
    if self._directory.is_dir():
      for path in self._directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
          numbers.append(int(match.group(1)))
    found = [self._here(f'ckpt-{number}') for number in sorted(numbers)[::-1]]
    return listed, [path for path in found if path not in listed]

  def restore(self):
    """Loads the newest checkpoint that can be read; False only when the
    folder holds no checkpoint at all. An unreadable one (truncated, deleted
    data) is skipped with a warning naming it, for the one before it; after
    the ones the index names come the other checkpoints in the folder. None
    readable is a ValueError, and so is a checkpoint of another task or model
    size. The owner then writes the index anew (relative names, without the
    unreadable newer ones); a reader changes nothing on disk."""
    listed, found = self.candidates()
    paths = listed + found
    for index, path in enumerate(paths):
      if found and path == found[0]:
        file = self._directory / 'checkpoint'
        problem = ('names none that can be read' if listed else
                   'cannot be read' if file.exists() else 'is missing')
        progress.say(f'Warning: the index {file} {problem}; trying the other '
                     f'checkpoints in {self._directory}, newest first.')
      try:
        if not os.path.exists(path + '.index'):
          raise FileNotFoundError('its files are missing')
        # The policy entry is read on its own (_saved_policy): expected
        # unmatched here, so TensorFlow does not warn about it.
        self._restorer.restore(path).assert_existing_objects_matched() \
            .expect_partial()
        saved = self._saved_policy(path)
      except (ValueError, AssertionError) as error:
        first = str(error).strip().splitlines()[0][:200]
        raise ValueError(
            f'the checkpoint {path} does not fit this task and model '
            f'(another task, action space or size?): {first}') from None
      except Exception as error:  # Truncated or missing files.
        first = (str(error).strip().splitlines() or [''])[0][:200]
        progress.say(f'Warning: cannot read the checkpoint {path} '
            f'({type(error).__name__}: {first})' +
            ('; trying the one before it.' if index + 1 < len(paths) else '.'))
        continue
      # The manager numbers the next checkpoint from the restored count.
      self._checkpoint.save_counter.assign(self._restorer.save_counter)
      self._fit_loss_scale(saved)
      self._latest = path
      if self._owner:  # Forget the unreadable newer ones: they'll be replaced.
        older = [p for p in listed[index + 1:] if os.path.exists(p + '.index')]
        self._write_index([*reversed(older), path])
        self._manager = self._make_manager()
      return True
    if paths:
      raise ValueError(f'no checkpoint in {self._directory} can be read '
                       '(see the warnings above): move the folder aside to '
                       'start training afresh.')
    return False

  def _saved_policy(self, path):
    """The dtype policy the checkpoint `path` records; None when it records
    none (written before this was recorded)."""
    tf = self._tf
    with tf.device('CPU:0'):
      policy = tf.Variable('', dtype=tf.string, trainable=False)
    tf.train.Checkpoint(policy=policy).restore(path).expect_partial()
    return policy.numpy().decode() or None

  def _fit_loss_scale(self, saved):
    """After a restore: the loss scales fit the agent's policy, trained
    under `saved` (None: unknown).

    Resumed under mixed_float16 from another policy (mixed_bfloat16 on a
    CPU, float32), the loss scale restored is 1 (none) and dynamic scaling
    would take some 30,000 updates to grow it back while float16 gradients
    underflow: each optimizer restarts at its initial scale (2**15), with a
    notice from the owner. From a checkpoint that records no policy, so do
    the optimizers whose restored scale is 1. Resumed from mixed_float16
    under another policy, the scale is unused: it is reset quietly to the 1
    of a fresh agent. The same policy (or an unknown one, not float16)
    keeps the restored state exactly."""
    policy = self._agent.policy
    if saved == policy or (saved is None and policy != 'mixed_float16'):
      return
    agent = self._agent
    optimizers = [agent.model_opt, agent.actor_opt, agent.value_opt]
    if saved is None:
      optimizers = [opt for opt in optimizers if float(opt.loss_scale) <= 1]
    for opt in optimizers:
      opt.reset_loss_scale()
    if not optimizers or policy != 'mixed_float16' or not self._owner:
      return
    start = int(optimizers[0].initial_scale)
    if saved:
      progress.say(f'Notice: this checkpoint was trained under {saved} and '
                   f'resumes under {policy}: the loss scale restarts at '
                   f'{start}.')
    else:
      progress.say('Notice: this checkpoint records no precision and its '
                   'loss scale is 1 (trained without loss scaling?); it '
                   f'resumes under {policy}: the loss scale restarts at '
                   f'{start}.')

  def _write_index(self, paths):
    """Writes the index naming `paths` (oldest first) by file name only, as
    CheckpointManager does, in one rename. The timestamps are recent and
    increasing, so that the manager keeps and sweeps these checkpoints."""
    from google.protobuf import text_format
    names = [os.path.basename(path) for path in paths]
    now = time.time()
    stamps = [now - len(names) + i for i in range(len(names))]
    state = self._tf.compat.v1.train.generate_checkpoint_state_proto(
        os.path.abspath(self._directory), names[-1],
        all_model_checkpoint_paths=names,
        all_model_checkpoint_timestamps=stamps,
        last_preserved_timestamp=stamps[0] - 1)
    rundir.write_atomic(self._directory / 'checkpoint',
                        text_format.MessageToString(state))

  def save(self, step):
    if not self._owner:
      raise RuntimeError('only the owner of the run (owner=True) saves '
                         f'checkpoints in {self._directory}')
    if self._manager is None:  # restore() found no checkpoint beside it.
      (self._directory / 'checkpoint').unlink()
      self._manager = self._make_manager()
    self._step.assign(step)
    self._latest = self._manager.save()
    return self._latest
