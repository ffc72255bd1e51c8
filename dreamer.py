"""Dreamer (V1): train an agent on DeepMind Control or Atari from pixels.

  python dreamer.py --logdir ./logdir/dmc_walker_walk/dreamer/0 --task dmc_walker_walk

Every key of `define_config()` is a command-line flag.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import types  # noqa: E402


def define_config():
  """Every setting, with the paper's defaults (DESIGN.md section 6)."""
  c = types.SimpleNamespace()
  # General.
  c.logdir = None            # Run folder: episodes, metrics, checkpoints.
  c.seed = 0                 # Seeds Python, NumPy, TensorFlow and the envs.
  c.steps = int(5e6)         # Total environment steps (frames) to train for.
  c.eval_every = int(1e4)    # Evaluate one episode and save every N steps.
  c.log_every = int(1e3)     # Write train metrics every N steps.
  c.log_scalars = True       # Write scalar metrics.
  c.log_images = True        # Write open-loop prediction videos.
  c.gpu_growth = True        # Let TensorFlow grow GPU memory as needed.
  c.precision = 16           # 16: mixed bfloat16 on CPU, float16 on GPU; 32.
  # Environment.
  c.task = 'dmc_walker_walk'  # dmc_<domain>_<task> or atari_<game>.
  c.envs = 1                 # Parallel training environments.
  c.parallel = 'none'        # none: all envs in one worker; process: one each.
  c.action_repeat = 2        # Environment steps per agent step.
  c.time_limit = 1000        # Episode length in environment steps.
  c.prefill = 5000           # Random-action environment steps before training.
  c.eval_noise = 0.0         # Exploration amount during evaluation.
  c.clip_rewards = 'none'    # none or tanh.
  # Model.
  c.deter_size = 200         # GRU state size (also the RSSM hidden size).
  c.stoch_size = 30          # Stochastic state size.
  c.num_units = 400          # Units of the dense heads and the actor.
  c.dense_act = 'elu'        # Activation of the dense heads and the actor.
  c.cnn_act = 'relu'         # Activation of the encoder and decoder.
  c.cnn_depth = 32           # Channel multiplier of the encoder and decoder.
  c.pcont = False            # Learn a continuation (discount) head.
  c.free_nats = 3.0          # KL below this (batch mean) gives no gradient.
  c.kl_scale = 1.0           # Weight of the KL term.
  c.pcont_scale = 10.0       # Weight of the continuation log-likelihood.
  c.weight_decay = 0.0       # Decoupled weight decay (0: off).
  c.weight_decay_pattern = r'.*'  # Regex of variable paths to decay.
  # Training.
  c.batch_size = 50          # Sequences per batch.
  c.batch_length = 50        # Steps per sequence.
  c.train_every = 1000       # Train every N environment steps.
  c.train_steps = 100        # Updates per training occasion.
  c.pretrain = 100           # Updates on the first occasion.
  c.model_lr = 6e-4          # World model learning rate.
  c.value_lr = 8e-5          # Value learning rate.
  c.actor_lr = 8e-5          # Actor learning rate.
  c.grad_clip = 100.0        # Global-norm gradient clipping.
  c.dataset_balance = False  # Bias training windows towards episode ends.
  # Behavior.
  c.discount = 0.99          # Discount of the imagined returns.
  c.disclam = 0.95           # Lambda of the imagined returns.
  c.horizon = 15             # Imagination horizon.
  c.action_dist = 'tanh_normal'  # tanh_normal or onehot.
  c.action_init_std = 5.0    # Initial std of the tanh-normal actor.
  c.expl = 'additive_gaussian'  # additive_gaussian, completely_random,
  #                               epsilon_greedy.
  c.expl_amount = 0.3        # Exploration amount.
  c.expl_decay = 0.0         # Halve the amount every N steps (0: constant).
  c.expl_min = 0.0           # Floor of the decayed amount.
  return c
