"""Helpers shared by the agent and the script: scans, returns, distributions,
the optimizer wrapper, acting, logging and schedules.

Everything here is a small pure function or a small class. Shapes follow the
reference: `static_scan` and `lambda_return` work on time-major tensors.
"""

import collections
import io
import json
import pathlib
import re

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from dreamer_tf import interrupts

tfd = tfp.distributions


# ----------------------------------------------------------------------------
# Graphs.


def graph(fn):
  """`fn` as a TensorFlow graph function: `tf.function` without AutoGraph.

  The agent's loops and branches over tensors are explicit (`tf.scan`,
  `tf.cond`), so AutoGraph's rewriting of the Python source would change no
  op of the graph; it only costs time, about a third of the first train
  step's tracing. Without it, a Python `if` or `while` on a tensor fails at
  tracing ("using a tf.Tensor as a Python bool") instead of being converted.
  """
  return tf.function(fn, autograph=False)


# ----------------------------------------------------------------------------
# Scans and returns.

def static_scan(fn, inputs, start, reverse=False):
  """Unrolled scan: `last = fn(last, inputs[t])` for every t (time-major).

  `inputs` and `start` are nested structures; every leaf of `inputs` has the
  same static length on axis 0. Returns the structure of `start` whose leaves
  are the stacked per-step outputs, [T, ...]. With `reverse`, the loop runs
  from the last step to the first and the outputs keep time order.
  """
  flat_inputs = tf.nest.flatten(inputs)
  length = flat_inputs[0].shape[0]
  if length is None:
    raise ValueError('static_scan needs a static length on axis 0.')
  steps = range(length - 1, -1, -1) if reverse else range(length)
  last, outputs = start, []
  for t in steps:
    step_inputs = tf.nest.pack_sequence_as(inputs, [x[t] for x in flat_inputs])
    last = fn(last, step_inputs)
    outputs.append(tf.nest.flatten(last))
  if reverse:
    outputs = outputs[::-1]
  stacked = [tf.stack(leaf, 0) for leaf in zip(*outputs)]
  return tf.nest.pack_sequence_as(start, stacked)


def symbolic_scan(fn, inputs, start, reverse=False):
  """`static_scan` as one symbolic loop (tf.scan, a tf.while_loop): the
  same steps and results, but the step is traced once instead of once per
  time step, so the graph and its tracing do not grow with the length."""
  return tf.scan(fn, inputs, start, reverse=reverse)


def scan(fn, inputs, start, reverse=False, unroll=True):
  """`static_scan` (the reference's unrolled loop) when `unroll`, else
  `symbolic_scan`; see `--scan` in dreamer.py."""
  return (static_scan if unroll else symbolic_scan)(
      fn, inputs, start, reverse=reverse)


def lambda_return(reward, value, pcont, bootstrap, lambda_, axis=0,
                  unroll=True):
  """TD(lambda) returns (docs/design.md section 4).

  R_t = r_t + c_t * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}), where the
  value after the last step and R after the last step are `bootstrap`.
  lambda=1 gives the discounted Monte-Carlo return with bootstrap, lambda=0 the
  one-step target. `reward`, `value`, `pcont` have the same shape with time on
  `axis`; `pcont` may be a Python number; `bootstrap` lacks the time axis.
  """
  if isinstance(pcont, (int, float)):
    pcont = pcont * tf.ones_like(reward)
  if reward.shape.ndims != value.shape.ndims:
    raise ValueError(f'reward {reward.shape} and value {value.shape} differ.')
  if axis != 0:
    perm = [axis] + [i for i in range(reward.shape.ndims) if i != axis]
    reward, value, pcont = (
        tf.transpose(x, perm) for x in (reward, value, pcont))
  if bootstrap is None:
    bootstrap = tf.zeros_like(value[-1])
  next_value = tf.concat([value[1:], bootstrap[None]], 0)
  inputs = reward + pcont * next_value * (1 - lambda_)
  returns = scan(
      lambda agg, cur: cur[0] + cur[1] * lambda_ * agg,
      (inputs, pcont), bootstrap, reverse=True, unroll=unroll)
  if axis != 0:
    returns = tf.transpose(returns, np.argsort(perm))
  return returns


def correlation(x, y):
  """Pearson correlation of all elements of x and y (0 when either is
  constant, where the correlation is undefined)."""
  x = tf.reshape(tf.cast(x, tf.float32), [-1])
  y = tf.reshape(tf.cast(y, tf.float32), [-1])
  x, y = x - tf.reduce_mean(x), y - tf.reduce_mean(y)
  denominator = tf.sqrt(tf.reduce_sum(x * x) * tf.reduce_sum(y * y))
  return tf.math.divide_no_nan(tf.reduce_sum(x * y), denominator)


# ----------------------------------------------------------------------------
# Distributions.

class TanhBijector(tfp.bijectors.Bijector):
  """y = tanh(x). The inverse clips |y| <= 1 to +-0.99999997 before atanh,
  computed in float32, so samples at the boundary give finite log-probs."""

  def __init__(self, validate_args=False, name='tanh'):
    super().__init__(
        forward_min_event_ndims=0, validate_args=validate_args, name=name)

  def _forward(self, x):
    return tf.nn.tanh(x)

  def _inverse(self, y):
    dtype = y.dtype
    y = tf.cast(y, tf.float32)
    y = tf.where(
        tf.abs(y) <= 1.0, tf.clip_by_value(y, -0.99999997, 0.99999997), y)
    return tf.cast(tf.atanh(y), dtype)

  def _forward_log_det_jacobian(self, x):
    # log(1 - tanh(x)^2) written so that it stays finite for large |x|.
    log2 = tf.math.log(tf.constant(2.0, x.dtype))
    return 2.0 * (log2 - x - tf.nn.softplus(-2.0 * x))


class SampleDist:
  """Wraps a distribution whose mode, mean and entropy have no closed form,
  estimating them from `samples` draws. The batch shape is the wrapped one.

  mode(): per batch element, the draw with the highest log-probability (the
  reference picks the best index of batch row 0 for every row;
  docs/design.md section 8).
  """

  def __init__(self, dist, samples=100):
    self._dist = dist
    self._samples = samples

  def __getattr__(self, name):
    return getattr(self._dist, name)

  def mean(self):
    return tf.reduce_mean(self._dist.sample(self._samples), 0)

  def mode(self):
    sample = self._dist.sample(self._samples)            # [S, *batch, A]
    logprob = self._dist.log_prob(sample)                # [S, *batch]
    best = tf.one_hot(tf.argmax(logprob, 0), self._samples, axis=0,
                      dtype=sample.dtype)                # [S, *batch]
    return tf.reduce_sum(sample * best[..., None], 0)

  def entropy(self):
    sample = self._dist.sample(self._samples)
    return -tf.reduce_mean(self._dist.log_prob(sample), 0)


class OneHotDist:
  """Categorical over one-hot vectors [..., K] with straight-through sample
  gradients: sample + probs - stop_gradient(probs). mode() is the one-hot
  argmax, mean() the probabilities. Everything is float32."""

  def __init__(self, logits):
    self._logits = tf.cast(logits, tf.float32)
    self._dist = tfd.Categorical(logits=self._logits)
    self._classes = self._logits.shape[-1]

  def _onehot(self, indices):
    return tf.one_hot(indices, self._classes, dtype=tf.float32)

  def log_prob(self, onehot):
    return self._dist.log_prob(tf.argmax(onehot, -1))

  def entropy(self):
    return self._dist.entropy()

  def mean(self):
    return tf.nn.softmax(self._logits)

  def mode(self):
    return self._onehot(tf.argmax(self._logits, -1))

  def sample(self, amount=None):
    indices = self._dist.sample(() if amount is None else amount)
    probs = self.mean()
    return self._onehot(indices) + probs - tf.stop_gradient(probs)


# ----------------------------------------------------------------------------
# Optimizer.

class Optimizer:
  """Adam with global-norm clipping, optional decoupled weight decay and
  dynamic loss scaling; one per part of the agent (model, actor, value).

  `step(tape, loss, variables)` takes the gradient of a float32 scalar loss,
  clips it to `clip` by global norm, and applies it unless some gradient is not
  finite (then the step is skipped, in every precision, as the reference's
  loss-scale optimizer does). Returns the global norm before clipping, of
  which `metrics(norm)` makes the metrics to log.

  With `loss_scale=True` (compute dtype float16) the backward pass starts from
  `scale` instead of 1 and the gradients are divided by it afterwards; the
  scale starts at 2**15, halves on a non-finite step and doubles after 2000
  finite steps in a row (TensorFlow's dynamic loss scale). `reset_loss_scale`
  puts it back to its start, as for a run resumed under another precision
  (dreamer_tf/checkpoint.py).

  Weight decay `var -= lr * wd * var` is applied, on variables whose path
  matches `wd_pattern`, in the same step. The reference's version never
  assigned (a no-op); this one works and defaults to off (docs/design.md
  section 8).
  """

  GROWTH_INTERVAL = 2000
  INITIAL_SCALE = 2.0 ** 15

  def __init__(self, name, variables, lr, clip=None, wd=0.0, wd_pattern='.*',
               loss_scale=False):
    self.name = name
    self.variables = list(variables)
    self._lr, self._clip, self._wd = lr, clip, wd
    self._decay = [v for v in self.variables if re.search(wd_pattern, v.path)]
    self._opt = _Adam(lr, name=f'{name}_adam')
    self._opt.build(self.variables)
    # Every replica computes the same update from the all-reduced gradients,
    # so the first replica's value is everyone's.
    once = tf.VariableAggregation.ONLY_FIRST_REPLICA
    # The scale a fresh optimizer starts from: 1 (unused) without scaling.
    self.initial_scale = self.INITIAL_SCALE if loss_scale else 1.0
    self.loss_scale = tf.Variable(
        self.initial_scale, trainable=False, dtype=tf.float32,
        name=f'{name}_loss_scale', aggregation=once)
    self._dynamic = loss_scale
    self._good_steps = tf.Variable(
        0, trainable=False, dtype=tf.int64, name=f'{name}_good_steps',
        aggregation=once)

  @property
  def iterations(self):
    return self._opt.iterations

  def checkpoint_items(self):
    """Objects to save: the Adam state and the loss-scale state."""
    return dict(
        adam=self._opt, loss_scale=self.loss_scale,
        good_steps=self._good_steps)

  def reset_loss_scale(self):
    """The loss scale back to `initial_scale`, no finite steps counted."""
    self.loss_scale.assign(self.initial_scale)
    self._good_steps.assign(0)

  def state(self):
    """Every variable the optimizer holds (Adam's, the loss scale's)."""
    return list(self._opt.variables) + [self.loss_scale, self._good_steps]

  def gradients(self, tape, loss):
    """Unscaled gradients of `loss`, taken from a scaled backward pass.

    Under a tf.distribute strategy with R replicas in sync, `loss` is this
    replica's loss on its share of the global batch (a mean over the share)
    and the gradient returned is the sum over replicas of the gradients of
    `loss / R`: the gradient of the mean over the global batch, the same on
    every replica (docs/design.md section 10)."""
    if loss.shape.ndims != 0:
      raise ValueError(f'{self.name} loss must be a scalar, got {loss.shape}.')
    scale = self.loss_scale.read_value() if self._dynamic else None
    seed, replicas = scale, num_replicas()
    if replicas > 1:
      seed = (1.0 if scale is None else scale) / replicas
    grads = tape.gradient(loss, self.variables, output_gradients=seed)
    missing = [v.path for v, g in zip(self.variables, grads) if g is None]
    if missing:
      raise ValueError(f'The {self.name} loss does not reach: {missing}.')
    grads = [tf.cast(g, tf.float32) for g in grads]
    if replicas > 1:
      grads = tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, grads)
    if self._dynamic:
      grads = [g / scale for g in grads]
    return grads

  def step(self, tape, loss):
    """One update from the gradient of `loss`; returns the global norm."""
    return self.update(self.gradients(tape, loss))

  def update(self, grads):
    """Clips `grads` (one per variable) and applies them unless they are
    not finite; returns their global norm before clipping."""
    norm = tf.linalg.global_norm(grads)
    finite = tf.math.is_finite(norm)
    if self._clip:
      grads, _ = tf.clip_by_global_norm(grads, self._clip, use_norm=norm)
    self._apply_if(finite, grads)
    if self._dynamic:
      self._update_scale(finite)
    return norm

  def metrics(self, norm):
    """The metrics of one update whose gradient had global norm `norm` (as
    `update` returns it): `<name>_grad_norm`, and with loss scaling also
    `<name>_skipped`, 1.0 when the update was skipped (the scaled gradient
    overflowed), else 0.0. Its mean over a window is the share skipped; the
    norm of a skipped step is infinite or NaN and must not be averaged with
    the others: see `applied_norms`."""
    metrics = {f'{self.name}_grad_norm': norm}
    if self._dynamic:
      metrics[f'{self.name}_skipped'] = self.skipped(norm)
    return metrics

  @staticmethod
  def skipped(norm):
    """1.0 (float32) when an update of global norm `norm` is skipped."""
    return 1.0 - tf.cast(tf.math.is_finite(norm), tf.float32)

  @staticmethod
  def applied_norms(metrics):
    """`metrics` (evaluated, of one step) without the `<name>_grad_norm` of
    each optimizer whose `<name>_skipped` is 1: the norms left are those of
    applied updates, so a window's mean of them stays finite when loss
    scaling skips a step."""
    metrics = dict(metrics)
    for key in [k for k in metrics if k.endswith('_skipped')]:
      if float(metrics[key]) > 0:
        metrics.pop(key[:-len('_skipped')] + '_grad_norm', None)
    return metrics

  def _apply_if(self, finite, grads):
    """Applies `grads` when `finite`. Under a tf.distribute strategy the
    condition is taken in the cross-replica context, as Keras's loss-scale
    optimizer does: a strategy cannot synchronise replicas (as Adam's update
    of mirrored variables does) inside a branch of a replica's tf.cond."""
    if not tf.distribute.has_strategy():
      tf.cond(finite, lambda: self._apply(grads), tf.no_op)
      return
    def cross_replica(strategy, finite, grads):
      finite = strategy.experimental_local_results(finite)[0]
      def apply():
        strategy.extended.call_for_each_replica(self._apply, args=(grads,))
      tf.cond(finite, apply, lambda: None)
    tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(finite, grads))

  def _apply(self, grads):
    if self._wd:
      # Through merge_call: mirrored variables change in the cross-replica
      # context (without a strategy, this is a plain assign).
      decay = lambda var: var.assign_sub(self._lr * self._wd * var)
      tf.distribute.get_replica_context().merge_call(
          lambda strategy: [strategy.extended.update(var, decay)
                            for var in self._decay])
    self._opt.apply(grads, self.variables)
    return tf.no_op()

  def _update_scale(self, finite):
    grow = tf.logical_and(
        finite, self._good_steps + 1 >= self.GROWTH_INTERVAL)
    scale = tf.where(
        finite, tf.where(grow, 2.0 * self.loss_scale, self.loss_scale),
        tf.maximum(self.loss_scale / 2.0, 1.0))
    self.loss_scale.assign(scale)
    self._good_steps.assign(
        tf.where(finite & ~grow, self._good_steps + 1,
                 tf.constant(0, tf.int64)))


class _Adam(tf.keras.optimizers.Adam):
  """Keras's Adam, minus its own all-reduce of the gradients under a
  tf.distribute strategy: `Optimizer.gradients` sums them across replicas
  already, before the global norm and the clipping, which must see the
  summed gradient (tests/test_distribute.py fails if Keras sums again)."""

  def _all_reduce_sum_gradients(self, grads_and_vars):
    return list(grads_and_vars)


def num_replicas():
  """Replicas in sync in the current tf.distribute replica context; 1
  outside of one (the default strategy)."""
  context = tf.distribute.get_replica_context()
  return context.num_replicas_in_sync if context is not None else 1


def global_mean(x):
  """The mean of the scalar `x` over all replicas in sync, with the
  gradient of this replica's `x`: its value is what a single device would
  compute on the global batch, and with the 1 / R loss scaling and the sum
  of gradients across replicas (`Optimizer.gradients`) its gradient is too.
  `x` itself when there is one replica."""
  replicas = num_replicas()
  if replicas == 1:
    return x
  total = tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, tf.stop_gradient(x))
  return x + tf.stop_gradient(total / replicas - x)


# ----------------------------------------------------------------------------
# Acting in environments.

def simulate(policy, envs, steps=0, episodes=0, state=None, on_episode=None,
             on_step=None, before_step=None):
  """Steps every environment of `envs` (a wrappers.Envs) with `policy` until
  `steps` agent steps (summed over envs) or `episodes` finished episodes.

  `policy(images uint8 [N, H, W, C], reset bool [N], agent_state)` returns
  (actions [N, A], agent_state). `on_episode(index, episode)` receives each
  finished episode (a dict of arrays from the Collect wrapper);
  `on_step(count)` is told how many agent steps were just taken;
  `before_step()` is called before every policy call (the run loop trains
  there). A stop requested by Ctrl-C or SIGTERM raises KeyboardInterrupt
  between two steps (dreamer_tf.interrupts). Returns the state to pass
  back in to continue the same episodes later.
  """
  count = len(envs)
  if state is None:
    state = dict(obs=[None] * count, done=np.ones(count, bool), agent=None)
  obs, done, agent_state = state['obs'], state['done'], state['agent']
  step = episode = 0
  while (steps and step < steps) or (episodes and episode < episodes):
    interrupts.check()  # Ctrl-C or SIGTERM stops between two steps.
    reset = done.copy()
    for index in np.flatnonzero(done):
      obs[index] = envs.reset(index)
    if before_step:
      before_step()
    images = np.stack([o['image'] for o in obs])
    actions, agent_state = policy(images, reset, agent_state)
    results = envs.step([np.asarray(a) for a in actions])
    step += count
    if on_step:
      on_step(count)
    for index, (ob, _, is_done, info) in enumerate(results):
      obs[index], done[index] = ob, is_done
      if is_done:
        episode += 1
        if on_episode:
          on_episode(index, info['episode'])
  return dict(obs=obs, done=done, agent=agent_state)


# ----------------------------------------------------------------------------
# Logging.

class Logger:
  """Scalars to `<logdir>/metrics.jsonl` (one JSON object per line with
  `step`) and to TensorBoard; videos to `<logdir>/videos/<name>-<step>.mp4`
  and to TensorBoard as animated GIFs. Scalars given between two `write`
  calls are averaged."""

  def __init__(self, logdir):
    self._logdir = pathlib.Path(logdir)
    self._writer = tf.summary.create_file_writer(str(self._logdir))
    self._scalars = collections.defaultdict(list)
    self._videos = {}

  def scalar(self, name, value):
    self._scalars[name].append(float(value))

  def video(self, name, frames):
    self._videos[name] = np.asarray(frames)

  def write(self, step):
    """Writes what was collected since the last call; returns the scalars."""
    scalars = {k: float(np.mean(v)) for k, v in self._scalars.items()}
    videos = self._videos
    self._scalars, self._videos = collections.defaultdict(list), {}
    if scalars:
      with (self._logdir / 'metrics.jsonl').open('a') as f:
        f.write(json.dumps(dict(step=int(step), **scalars)) + '\n')
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.scalar(name, value, step)
      for name, frames in videos.items():
        write_video(self._logdir / 'videos' / f'{name.replace("/", "_")}-'
                    f'{step}.mp4', frames)
        _gif_summary(name, frames, step)
    self._writer.flush()
    return scalars


def write_video(path, frames, fps=20):
  """Writes uint8 frames [T, H, W, C] as an MP4 through imageio's bundled
  ffmpeg; falls back to a GIF (and says so) when MP4 cannot be written."""
  import imageio
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
  except Exception as error:  # pylint: disable=broad-except
    path = path.with_suffix('.gif')
    imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
    print(f'Could not write MP4 ({error}); wrote {path} instead.')
  return path


def _gif_summary(name, frames, step):
  import imageio
  buffer = io.BytesIO()
  imageio.mimwrite(buffer, list(frames), format='GIF', duration=50, loop=0)
  height, width = frames.shape[1:3]
  metadata = tf.compat.v1.SummaryMetadata()
  metadata.plugin_data.plugin_name = 'images'
  tensor = tf.constant([str(width), str(height), buffer.getvalue()])
  tf.summary.write(name, tensor, step, metadata=metadata)


# ----------------------------------------------------------------------------
# Schedules.

class Every:
  """True once every `every` units of a growing counter; never when 0."""

  def __init__(self, every):
    self._every = every
    self._last = None

  def __call__(self, step):
    if not self._every:
      return False
    if self._last is None:
      self._last = step
      return True
    if step >= self._last + self._every:
      self._last += self._every * ((step - self._last) // self._every)
      return True
    return False
