"""One train step on one device and under MirroredStrategy over 2 logical
CPU devices, from the same weights, batch and random draws; writes both
results to an .npz for tests/test_distribute.py. A separate process: the CPU
can only be split before TensorFlow has started.

usage: python tests/mirrored_step.py OUTDIR POLICY:FREE_NATS [...]
  One OUTDIR/POLICY-FREE_NATS.npz per case, all in this one process (the
  CPU is split once, TensorFlow starts once).
  FREE_NATS: a number, or 'straddle': between the mean KL of the two
  replicas' halves of the batch, where a floor taken on each replica's own
  mean (instead of the global mean) would change the update.
"""

import pathlib
import sys

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parents[1]),
                str(pathlib.Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402

from dreamer_tf import distribute  # noqa: E402

# Before any other TensorFlow work: split the CPU.
STRATEGY = distribute.make_strategy('mirrored', 'CPU:0,CPU:1')

import tensorflow as tf  # noqa: E402

import tiny  # noqa: E402
from dreamer_tf import agent as agent_lib  # noqa: E402

B, T, A = 4, 6, 2


def noise_for(config, seed=1):
  """Standard normals for every random draw of the train step, with the
  batch on axis 0 so that each replica takes the slice of its sequences:
  the mirrored step then draws exactly what the single-device step does."""
  rng = np.random.default_rng(seed)
  shapes = dict(prior=(B, T, config.stoch_size), post=(B, T, config.stoch_size),
                actor=(B, T, config.horizon, A),
                imag=(B, T, config.horizon, config.stoch_size))
  return {k: tf.constant(rng.normal(size=s), tf.float32)
          for k, s in shapes.items()}


def half_kls(agent, data, noise):
  """The plain mean KL of each replica's half of the batch."""
  data = agent.preprocess(data)
  kls = []
  for part in (slice(0, B // 2), slice(B // 2, B)):
    eps = (noise['prior'][part], noise['post'][part])
    sub = {k: v[part] for k, v in data.items()}
    kls.append(float(agent.world_model_loss(sub, eps=eps)[2]['kl']))
  return kls


def main(out, policy, free_nats):
  config = tiny.tiny_config(free_nats=0.0)
  data = tiny.random_batch(B, T, A)
  noise = noise_for(config)
  tf.keras.utils.set_random_seed(0)  # The initial weights.
  single = agent_lib.Dreamer(config, A, policy=policy)
  kls = half_kls(single, data, noise)
  if free_nats == 'straddle':
    # Above the lower half's mean KL, below the global mean.
    config.free_nats = min(kls) + 0.25 * abs(kls[0] - kls[1])
  else:
    config.free_nats = float(free_nats)
  if policy == 'mixed_float16':
    # A loss scale whose first backward pass does not overflow (2**15, the
    # start, does on this model: both would skip the step and compare
    # nothing), to compare an applied update.
    for opt in (single.model_opt, single.actor_opt, single.value_opt):
      opt.loss_scale.assign(16.0)
  mirrored = agent_lib.Dreamer(config, A, policy=policy, strategy=STRATEGY)
  for source, target in zip(single.variables(), mirrored.variables()):
    target.assign(source)
  results = dict(kls=np.array(kls), free_nats=config.free_nats,
                 replicas=STRATEGY.num_replicas_in_sync)
  for name, agent in (('single', single), ('mirrored', mirrored)):
    metrics = agent.train(data, noise)
    for key in ('model_loss', 'actor_loss', 'value_loss', 'div',
                'model_grad_norm', 'actor_grad_norm', 'value_grad_norm',
                'image_loss', 'reward_loss', 'kl'):
      results[f'{name}/{key}'] = float(metrics[key])
    for index, var in enumerate(agent.weights()):
      results[f'{name}/weight{index}'] = np.asarray(var)
    results[f'{name}/loss_scale'] = float(agent.model_opt.loss_scale.numpy())
    results[f'{name}/updates'] = agent.updates
  np.savez(out, **results)


if __name__ == '__main__':
  outdir = pathlib.Path(sys.argv[1])
  for case in sys.argv[2:]:
    policy, free_nats = case.split(':')
    main(outdir / f'{policy}-{free_nats}.npz', policy, free_nats)
