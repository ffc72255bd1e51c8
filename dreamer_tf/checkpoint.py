"""The run's checkpoints in <logdir>/checkpoints, with the fallback to the
one before when the newest cannot be read."""

import pathlib
import shutil

from dreamer_tf import progress


class Checkpointer:
  """The agent's weights, its three optimizers' states and the step counter
  in <logdir>/checkpoints; the last 2 are kept. TensorFlow writes each under
  a temporary name and renames it, so a crash never leaves half of one; the
  run's owner (`owner=True`) removes the temporary folders a killed save
  leaves behind."""

  def __init__(self, agent, logdir, owner=False):
    import tensorflow as tf
    self._tf = tf
    self._directory = pathlib.Path(logdir) / 'checkpoints'
    if owner:
      for leftover in self._directory.glob('*_temp'):
        shutil.rmtree(leftover, ignore_errors=True)
    self._step = tf.Variable(0, dtype=tf.int64, name='step')
    self._checkpoint = tf.train.Checkpoint(
        step=self._step, **agent.checkpoint_items())
    self._manager = self._make_manager()

  def _make_manager(self):
    return self._tf.train.CheckpointManager(
        self._checkpoint, self._directory, max_to_keep=2)

  @property
  def latest(self):
    return self._manager.latest_checkpoint

  @property
  def step(self):
    return int(self._step)

  def restore(self):
    """Loads the newest checkpoint that can be read; False if there is none.
    An unreadable one (truncated, deleted data) is skipped with a warning
    naming it, for the one before it; none readable is a ValueError, and so
    is a checkpoint of another task or model size."""
    paths = list(reversed(self._manager.checkpoints))
    for index, path in enumerate(paths):
      try:
        self._checkpoint.restore(path).assert_existing_objects_matched()
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
      if index:  # Forget the unreadable newer ones: they will be replaced.
        self._tf.compat.v1.train.update_checkpoint_state(
            str(self._directory), path, all_model_checkpoint_paths=[path])
        self._manager = self._make_manager()
      return True
    if paths:
      raise ValueError(f'no checkpoint in {self._directory} can be read '
                       '(see the warnings above): move the folder aside to '
                       'start training afresh.')
    return False

  def save(self, step):
    self._step.assign(step)
    return self._manager.save()
