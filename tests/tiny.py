"""Tiny model sizes and random batches shared by the agent tests."""

import numpy as np
import tensorflow as tf

import dreamer


def tiny_config(**overrides):
  """The defaults with the sizes of `--preset debug` (the one definition of
  the tests' tiny sizes) and a 5-step imagination horizon. The loops are
  the reference's unrolled ones (the default), which the golden and
  gradient-routing tests check; --preset debug's symbolic loops are
  compared with them in test_agent."""
  config = dreamer.define_config()
  vars(config).update(dreamer.PRESETS['debug'])
  config.horizon = 5
  config.scan = 'unrolled'
  vars(config).update(overrides)
  return config


def random_batch(batch=3, length=6, act_dim=2, seed=0, onehot=False):
  rng = np.random.default_rng(seed)
  if onehot:
    action = np.eye(act_dim, dtype=np.float32)[
        rng.integers(0, act_dim, (batch, length))]
  else:
    action = rng.uniform(-1, 1, (batch, length, act_dim)).astype(np.float32)
  return dict(
      image=tf.constant(rng.integers(0, 256, (batch, length, 64, 64, 3)),
                        tf.uint8),
      action=tf.constant(action),
      reward=tf.constant(rng.normal(size=(batch, length)), tf.float32),
      discount=tf.constant(
          rng.choice([0.0, 1.0], (batch, length), p=[0.1, 0.9]), tf.float32))
