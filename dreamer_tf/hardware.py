"""Before any other TensorFlow work: the seeds, GPU memory growth, the
tf.distribute strategy and the line saying what the run computes on."""

import random
import shutil

import numpy as np

from dreamer_tf import distribute

# Worker i of a multi_worker run seeds with --seed + i * WORKER_SEED_STRIDE,
# so that its replicas draw other RSSM and action noise than the same
# replicas of the other workers; the chief (worker 0) and single-host runs
# keep --seed. Far above the seeds one usually runs side by side, so that
# worker 1 of --seed 0 does not repeat a chief's --seed 1.
WORKER_SEED_STRIDE = 1_000_000


def start(config, strategy='default'):
  """TensorFlow for a process that trains or evaluates, once its flags are
  checked: imported quietly, then GPU memory growth and the strategy
  (`setup_tensorflow`), then the seeds of this worker. Returns the strategy
  (None for 'default') and the devices line."""
  import dreamer_tf
  dreamer_tf.quiet_tensorflow()
  strategy, devices = setup_tensorflow(config, strategy)
  seed_everything(config.seed, distribute.worker_index(strategy))
  return strategy, devices


def seed_everything(seed, worker=0):
  """Seeds Python's, NumPy's and TensorFlow's global generators for worker
  `worker` (its index in a multi_worker run; 0 on the chief and with one
  host, which keeps `seed`)."""
  import tensorflow as tf
  seed = seed + worker * WORKER_SEED_STRIDE
  random.seed(seed)
  np.random.seed(seed % 2**32)  # NumPy takes no more than 32 bits.
  tf.random.set_seed(seed)


def setup_tensorflow(config, strategy='default'):
  """GPU memory growth and the tf.distribute strategy (None for
  'default'), before any other TensorFlow work; with several workers, they
  check that they share the chief's --logdir (distribute.check_logdir).
  Returns the strategy and the line saying what the run computes on."""
  import tensorflow as tf
  gpus = tf.config.list_physical_devices('GPU')
  if config.gpu_growth:
    for gpu in gpus:
      tf.config.experimental.set_memory_growth(gpu, True)
  strategy = distribute.make_strategy(strategy, config.devices)
  distribute.check_batch(distribute.replicas(strategy), config.batch_size)
  if distribute.workers(strategy) > 1:
    distribute.check_logdir(strategy, config.logdir)
  return strategy, describe_devices(config, gpus, strategy)


def describe_devices(config, gpus, strategy=None):
  """One line: the devices and the dtype policy; on a machine with an
  NVIDIA GPU that TensorFlow does not see, also how to fix that."""
  from dreamer_tf import agent as agent_lib
  policy = agent_lib.dtype_policy(config.precision, gpu=bool(gpus))
  if strategy is None:
    names = ', '.join(gpu.name.replace('/physical_device:', '')
                      for gpu in gpus) or 'CPU'
  else:
    names = distribute.describe(strategy, config.batch_size)
  line = f'Devices: {names}; dtype policy {policy}.'
  if not gpus and shutil.which('nvidia-smi'):
    line += (' This machine has an NVIDIA GPU (nvidia-smi) but TensorFlow '
             'sees none: pip install "tensorflow[and-cuda]==2.21.0" brings '
             'the CUDA libraries (README, "GPUs").')
  return line
