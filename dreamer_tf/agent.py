"""The Dreamer agent: world model, actor and value, the train step and the
policy (docs/design.md sections 4 and 5). The run loop lives in dreamer.py."""

import contextlib

import tensorflow as tf
import tensorflow_probability as tfp

import tools
from dreamer_tf import distribute, doctor, networks
from dreamer_tf.rssm import RSSM

tfd = tfp.distributions

METRICS = (
    'model_loss', 'actor_loss', 'value_loss', 'image_loss', 'reward_loss',
    'div', 'prior_ent', 'post_ent', 'action_ent', 'model_grad_norm',
    'actor_grad_norm', 'value_grad_norm',
    # Health signals (docs/doctor.md): the KL before free nats, the values
    # against the lambda returns, the share of skipped non-finite steps.
    'kl', 'value_mean', 'return_mean', 'value_gap', 'skip_frac')



def dtype_policy(precision, gpu=None):
  """Keras dtype policy for `precision` 32 or 16. 16 means mixed_float16 on a
  GPU (with loss scaling) and mixed_bfloat16 on a CPU (no loss scaling); the
  explicit policy names are accepted too, to force a path in tests."""
  if precision in ('float32', 'mixed_bfloat16', 'mixed_float16'):
    return precision
  if int(precision) == 32:
    return 'float32'
  if int(precision) != 16:
    raise ValueError(f'--precision must be 16 or 32, got {precision!r}.')
  if gpu is None:
    gpu = bool(tf.config.list_physical_devices('GPU'))
  return 'mixed_float16' if gpu else 'mixed_bfloat16'


def free_nats_kl(post_dist, prior_dist, free_nats, balance=0.0):
  """max(mean KL(post || prior), free_nats): free nats on the batch mean, so
  below the threshold the KL term gives the model no gradient.

  With `balance` A in (0, 1] (KL balancing, as in DreamerV2), the mean KL is
  A * KL(sg(post) || prior) + (1 - A) * KL(post || sg(prior)): the same
  value, with a fraction A of its gradient going to the prior and 1 - A to
  the posterior (plain KL: all of it to both). Free nats apply to that
  balanced mean exactly as to the plain one: below the floor neither side
  gets any gradient. 0 means off.
  """
  if balance:
    prior_side = tf.reduce_mean(tfd.kl_divergence(_stopped(post_dist),
                                                  prior_dist))
    post_side = tf.reduce_mean(tfd.kl_divergence(post_dist,
                                                 _stopped(prior_dist)))
    div = balance * prior_side + (1.0 - balance) * post_side
  else:
    div = tf.reduce_mean(tfd.kl_divergence(post_dist, prior_dist))
  # Over several replicas, the floor applies to the global batch's mean.
  return tf.maximum(tools.global_mean(div), free_nats)


def _stopped(dist):
  """The same diagonal Gaussian with its parameters cut from the graph."""
  return tfd.MultivariateNormalDiag(
      tf.stop_gradient(dist.mean()), tf.stop_gradient(dist.stddev()))


def saturation(action):
  """Fraction of action entries with |a| > doctor.SATURATED (float32)."""
  action = tf.cast(action, tf.float32)
  return tf.reduce_mean(
      tf.cast(tf.abs(action) > doctor.SATURATED, tf.float32))


class Dreamer:
  """World model, actor and value with their three optimizers.

  `config` needs the model, training and behaviour flags of dreamer.py
  (docs/design.md section 6).
  `act_dim` is the action size (one-hot size for discrete actions). Batches
  are dicts of [B, T, ...] tensors: image uint8 [B, T, 64, 64, 3], action
  float32 [B, T, A], reward and discount float32 [B, T].
  `policy` is a dtype policy name or precision (see `dtype_policy`).
  `strategy`: a tf.distribute strategy to create the variables in and to
  train with (dreamer_tf/distribute.py); None trains on one device.
  """

  def __init__(self, config, act_dim, image_shape=(64, 64, 3), policy=None,
               strategy=None):
    self.strategy = strategy
    with strategy.scope() if strategy else contextlib.nullcontext():
      self._create(config, act_dim, image_shape, policy)
    step = tools.graph(self._train) if strategy is None else (
        distribute.Trainer(strategy, self._train))
    self.train = step
    if self.policy == 'mixed_float16':
      # Loss scaling skips the steps whose scaled gradient overflows (a few
      # at the start, normal): their metrics say so (`<name>_skipped`) and
      # leave out their infinite norm, which would make the logged mean of
      # the window infinite (docs/doctor.md).
      self.train = lambda *args, **kwargs: tools.Optimizer.applied_norms(
          step(*args, **kwargs))
    self.open_loop = tools.graph(lambda data: open_loop(self, data))

  def _create(self, config, act_dim, image_shape, policy):
    self.config = c = config
    self.policy = dtype_policy(c.precision if policy is None else policy)
    self.act_dim = act_dim
    dt = self.policy
    self.encoder = networks.ConvEncoder(c.cnn_depth, c.cnn_act, dtype=dt)
    self._unroll = c.scan == 'unrolled'
    self.dynamics = RSSM(c.stoch_size, c.deter_size, c.deter_size, dtype=dt,
                         unroll=self._unroll)
    self.decoder = networks.ConvDecoder(
        c.cnn_depth, c.cnn_act, image_shape, dtype=dt)
    self.reward = networks.DenseDecoder(
        (), 2, c.num_units, act=c.dense_act, dtype=dt, name='reward')
    self.pcont = networks.DenseDecoder(
        (), 3, c.num_units, 'binary', c.dense_act, dtype=dt,
        name='pcont') if c.pcont else None
    self.value = networks.DenseDecoder(
        (), 3, c.num_units, act=c.dense_act, dtype=dt, name='value')
    self.actor = networks.ActionDecoder(
        act_dim, 4, c.num_units, c.action_dist, c.dense_act,
        init_std=c.action_init_std, dtype=dt)
    self._build(image_shape)
    scale = self.policy == 'mixed_float16'
    opt = lambda name, parts, lr: tools.Optimizer(
        name, [v for p in parts for v in p.trainable_variables], lr,
        c.grad_clip, c.weight_decay, c.weight_decay_pattern, scale)
    self.model_parts = [self.encoder, self.dynamics, self.decoder, self.reward]
    self.model_parts += [self.pcont] if self.pcont is not None else []
    self.model_opt = opt('model', self.model_parts, c.model_lr)
    self.actor_opt = opt('actor', [self.actor], c.actor_lr)
    self.value_opt = opt('value', [self.value], c.value_lr)
    # Steps of this process and those with a non-finite gradient (skipped);
    # not checkpointed: skip_frac is the share since the process started.
    once = tf.VariableAggregation.ONLY_FIRST_REPLICA
    self._steps = tf.Variable(
        0.0, trainable=False, name='steps', aggregation=once)
    self._skipped = tf.Variable(
        0.0, trainable=False, name='skipped', aggregation=once)

  @property
  def updates(self):
    """Updates made so far (the model optimizer's step count)."""
    return int(self.model_opt.iterations.numpy())

  def _build(self, image_shape):
    """Creates every variable by calling each module once on zeros."""
    embed = self.encoder(tf.zeros((1, 1) + tuple(image_shape)))
    post, _ = self.dynamics.observe(embed, tf.zeros([1, 1, self.act_dim]))
    feat = self.dynamics.get_feat(post)
    heads = [self.decoder, self.reward, self.value, self.actor]
    for head in heads + ([self.pcont] if self.pcont is not None else []):
      head(feat)

  def checkpoint_items(self):
    """Everything a checkpoint holds: every module and optimizer state."""
    items = dict(encoder=self.encoder, dynamics=self.dynamics,
                 decoder=self.decoder, reward=self.reward, value=self.value,
                 actor=self.actor)
    if self.pcont is not None:
      items['pcont'] = self.pcont
    for opt in (self.model_opt, self.actor_opt, self.value_opt):
      for key, value in opt.checkpoint_items().items():
        items[f'{opt.name}_opt_{key}'] = value
    return items

  def variables(self):
    """Every variable of the checkpoint: weights and optimizer states."""
    items = self.checkpoint_items()
    modules = [m for k, m in items.items() if '_opt_' not in k]
    optimizers = (self.model_opt, self.actor_opt, self.value_opt)
    return ([v for m in modules for v in m.variables] +
            [v for o in optimizers for v in o.state()])

  def weights(self):
    """The trainable weights of every module."""
    return [v for p in self.model_parts + [self.actor, self.value]
            for v in p.trainable_variables]

  def param_counts(self):
    count = networks.count_params
    return dict(model=sum(count(p) for p in self.model_parts),
                actor=count(self.actor), value=count(self.value))

  def preprocess(self, data):
    """uint8 images to [-0.5, 0.5]; optional tanh-clipped rewards."""
    data = dict(data)
    data['image'] = tf.cast(data['image'], tf.float32) / 255.0 - 0.5
    if 'reward' in data and self.config.clip_rewards == 'tanh':
      data['reward'] = tf.tanh(data['reward'])
    return data

  def _train(self, data, noise=None):
    """One update of model, actor and value on a batch; returns metrics.

    `noise` (tests): None to draw the random numbers inside, or a dict of
    standard normals for the batch, split with it across replicas: prior
    and post [B, T, stoch] (the RSSM's samples while observing), actor [B,
    T, H, A] and imag [B, T, H, stoch] (the imagined actions, tanh_normal
    only, and states)."""
    data = self.preprocess(data)
    eps = (None, None) if noise is None else (
        (noise['prior'], noise['post']), (noise['actor'], noise['imag']))
    with tf.GradientTape() as model_tape:
      model_loss, post, metrics = self.world_model_loss(data, eps=eps[0])
    model_grads = self.model_opt.gradients(model_tape, model_loss)
    if self.config.save_memory:
      # Imagination starts once the world model's backward pass is done, so
      # the activations kept for it (mostly the convolutions') are freed
      # before imagination's are made: a lower peak, the same numbers, but
      # the two can no longer overlap.
      with tf.control_dependencies(model_grads):
        post = {k: tf.identity(v) for k, v in post.items()}
    with tf.GradientTape(persistent=True) as tape:
      imag_feat, imag_action = self.imagine_ahead(
          post, return_actions=True, eps=eps[1])
      actor_loss, value_loss = self.behavior_losses(imag_feat, metrics)
    # The updates come after every forward pass: imagination uses the world
    # model before this step's update, as in the reference.
    norms = [self.model_opt.update(model_grads),
             self.actor_opt.step(tape, actor_loss),
             self.value_opt.step(tape, value_loss)]
    del tape
    # `<name>_grad_norm`, and with loss scaling `<name>_skipped`.
    for opt, norm in zip((self.model_opt, self.actor_opt, self.value_opt),
                         norms):
      metrics.update(opt.metrics(norm))
    finite = tf.reduce_all(tf.math.is_finite(tf.stack(norms)))
    self._steps.assign_add(1.0)
    self._skipped.assign_add(1.0 - tf.cast(finite, tf.float32))
    metrics['skip_frac'] = self._skipped / self._steps
    if self.config.action_dist == 'tanh_normal':
      metrics['action_sat'] = saturation(imag_action)
    feat = tf.stop_gradient(self.dynamics.get_feat(post))
    metrics['action_ent'] = tf.reduce_mean(self.actor(feat).entropy())
    metrics.update(model_loss=model_loss, actor_loss=actor_loss,
                   value_loss=value_loss)
    if self.policy == 'mixed_float16':
      metrics['loss_scale'] = self.model_opt.loss_scale.read_value()
    return metrics

  def world_model_loss(self, data, eps=None):
    """Steps 1-4: model loss, posterior states [B, T, ...] and metrics."""
    c = self.config
    embed = self.encoder(data['image'])
    post, prior = self.dynamics.observe(embed, data['action'], eps=eps)
    feat = self.dynamics.get_feat(post)
    image_pred, reward_pred = self.decoder(feat), self.reward(feat)
    likes = dict(
        image=tf.reduce_mean(image_pred.log_prob(data['image'])),
        reward=tf.reduce_mean(reward_pred.log_prob(data['reward'])))
    # Validation signals (not in the loss): is the world model any good?
    checks = dict(
        image_mse=tf.reduce_mean(
            tf.square(tf.stop_gradient(image_pred.mean()) - data['image'])),
        reward_corr=tools.correlation(
            tf.stop_gradient(reward_pred.mean()), data['reward']))
    if self.pcont is not None:
      pcont_pred = self.pcont(feat)
      target = c.discount * data['discount']
      likes['pcont'] = c.pcont_scale * tf.reduce_mean(
          pcont_pred.log_prob(target))
      checks['pcont_acc'] = tf.reduce_mean(tf.cast(
          (pcont_pred.mean() > 0.5) == (data['discount'] > 0.5), tf.float32))
    prior_dist = self.dynamics.get_dist(prior)
    post_dist = self.dynamics.get_dist(post)
    div = free_nats_kl(post_dist, prior_dist, c.free_nats, c.kl_balance)
    model_loss = c.kl_scale * div - sum(likes.values())
    metrics = {f'{name}_loss': -like for name, like in likes.items()}
    metrics.update(checks)
    metrics.update(
        div=div, kl=tf.stop_gradient(tf.reduce_mean(
            tfd.kl_divergence(post_dist, prior_dist))),
        prior_ent=tf.reduce_mean(prior_dist.entropy()),
        post_ent=tf.reduce_mean(post_dist.entropy()))
    return model_loss, post, metrics

  def imagine_ahead(self, post, return_actions=False, eps=None):
    """Steps 5-6: from every posterior state (all but the last step when
    pcont is on), roll the prior `horizon` steps with the actor's sampled
    actions. Returns the features after each step, [H, B*T, F], and with
    `return_actions` also the actions that led there, [H, B*T, A]. `eps`:
    None, or standard-normal noise for the actor and the states, [B, T, H,
    A] and [B, T, H, stoch]."""
    if self.pcont is not None:
      post = {k: v[:, :-1] for k, v in post.items()}
      eps = None if eps is None else [e[:, :-1] for e in eps]
    flatten = lambda x: tf.reshape(x, [-1] + x.shape[2:].as_list())
    start = {k: flatten(tf.stop_gradient(v)) for k, v in post.items()}
    start['action'] = tf.zeros(
        [tf.shape(start['deter'])[0], self.act_dim], tf.float32)
    def step(prev, noise):
      feat = tf.stop_gradient(self.dynamics.get_feat(prev))
      if eps is None:
        action = self.actor(feat).sample()
        state = self.dynamics.img_step(prev, action)
      else:
        action = self.actor.sample_from(feat, noise[0])
        state = self.dynamics.img_step(prev, action, noise[1])
      return dict(state, action=tf.cast(action, tf.float32))
    inputs = tf.range(self.config.horizon) if eps is None else [
        tf.transpose(flatten(e), [1, 0, 2]) for e in eps]  # [H, B*T, ...]
    states = tools.scan(step, inputs, start, unroll=self._unroll)
    feat = self.dynamics.get_feat(states)
    return (feat, states['action']) if return_actions else feat

  def behavior_losses(self, imag_feat, metrics=None):
    """Steps 7-10: actor and value losses from the imagined features. With
    a `metrics` dict, adds the mean imagined value and lambda return and
    their mean absolute gap (value_mean, return_mean, value_gap)."""
    c = self.config
    reward = self.reward(imag_feat).mode()
    # One forward pass of the value head serves both losses. The actor's
    # loss differentiates through `value` into the features; the value loss
    # uses the copy whose gradient reaches the value head only, as the
    # reference's separate value tape on the stopped features does.
    value_dist, value_own = self.value.call_twice(imag_feat)
    value = value_dist.mode()
    if self.pcont is not None:
      pcont = self.pcont(imag_feat).mean()
    else:
      pcont = c.discount * tf.ones_like(reward)
    returns = tools.lambda_return(
        reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1],
        lambda_=c.disclam, axis=0, unroll=self._unroll)
    weight = tf.stop_gradient(tf.math.cumprod(
        tf.concat([tf.ones_like(pcont[:1]), pcont[:-2]], 0), 0))
    actor_loss = -tf.reduce_mean(weight * returns)
    value_loss = -tf.reduce_mean(
        weight * value_own[:-1].log_prob(tf.stop_gradient(returns)))
    if metrics is not None:
      value_now = tf.stop_gradient(value[:-1])
      returns_now = tf.stop_gradient(returns)
      metrics.update(
          value_mean=tf.reduce_mean(value_now),
          return_mean=tf.reduce_mean(returns_now),
          value_gap=tf.reduce_mean(tf.abs(value_now - returns_now)))
    return actor_loss, value_loss


class Policy:
  """Acting with a Dreamer agent (docs/design.md section 5), batched over N
  environments. Not to be confused with `Dreamer.actor`, the action network
  it samples from.

  `__call__(image, reset, state, training, amount)` takes images uint8
  [N, 64, 64, 3], a bool reset mask [N] (the latent and previous action of
  those envs are zeroed), the state returned by the previous call (or None),
  and returns float32 actions [N, A] and the new state. Training samples the
  actor and explores with `amount`; evaluation takes the mode and explores
  only when `amount` > 0 (eval_noise).
  """

  def __init__(self, agent):
    self._agent = agent
    self._discrete = agent.config.action_dist == 'onehot'
    self._expl = agent.config.expl
    self._step = tools.graph(self._policy)

  def __call__(self, image, reset, state, training, amount):
    if state is None:
      state = self._initial(len(image))
    return self._step(tf.constant(image), tf.constant(reset), state,
                      bool(training), tf.constant(amount, tf.float32))

  def _initial(self, batch):
    agent = self._agent
    return agent.dynamics.initial(batch), tf.zeros([batch, agent.act_dim])

  def _policy(self, image, reset, state, training, amount):
    agent = self._agent
    keep = 1.0 - tf.cast(reset, tf.float32)[:, None]
    latent, action = tf.nest.map_structure(lambda x: x * keep, state)
    embed = agent.encoder(agent.preprocess({'image': image})['image'])
    latent, _ = agent.dynamics.obs_step(latent, action, embed)
    dist = agent.actor(agent.dynamics.get_feat(latent))
    action = dist.sample() if training else dist.mode()
    action = tf.cond(amount > 0, lambda: self._explore(action, amount),
                     lambda: action)
    return action, (latent, action)

  def _explore(self, action, amount):
    if self._expl == 'additive_gaussian':
      noisy = action + amount * tf.random.normal(tf.shape(action))
      return tf.clip_by_value(noisy, -1, 1)
    if self._expl == 'completely_random':
      if self._discrete:
        return random_onehot(tf.shape(action))
      return tf.random.uniform(tf.shape(action), -1, 1)
    if self._expl == 'epsilon_greedy':
      pick = tf.random.uniform(tf.shape(action)[:1]) < amount
      return tf.where(pick[:, None], random_onehot(tf.shape(action)), action)
    raise ValueError(f'Unknown expl {self._expl!r}.')


def random_onehot(shape):
  indices = tf.random.uniform(shape[:1], 0, shape[1], tf.int32)
  return tf.one_hot(indices, shape[1], dtype=tf.float32)


OPEN_LOOP_HORIZONS = (1, 5, 10, 20, 40)


def open_loop(agent, data, context=5, count=6):
  """Open-loop prediction: observe `context` steps of each sequence, then
  imagine the rest from the actions alone. Returns the video of the first
  `count` sequences, uint8 [T, 3 * 64, count * 64, 3] with rows truth, model
  (reconstruction, then imagination) and error, and the mean squared pixel
  error of the imagined frame k steps after the context, `openl_mse_h<k>`,
  over the whole batch, for the horizons that fit the batch length."""
  data = agent.preprocess(data)
  embed = agent.encoder(data['image'])
  post, _ = agent.dynamics.observe(embed[:, :context],
                                   data['action'][:, :context])
  recon = agent.decoder(agent.dynamics.get_feat(post)).mode()
  start = {k: v[:, -1] for k, v in post.items()}
  prior = agent.dynamics.imagine(data['action'][:, context:], start)
  openl = agent.decoder(agent.dynamics.get_feat(prior)).mode()
  truth = data['image'] + 0.5
  sq_error = tf.reduce_mean(
      tf.square(openl + 0.5 - truth[:, context:]), [0, 2, 3, 4])
  metrics = {f'openl_mse_h{k}': sq_error[k - 1] for k in OPEN_LOOP_HORIZONS
             if k <= sq_error.shape[0]}
  model = tf.concat([recon, openl], 1)[:count] + 0.5
  truth = truth[:count]
  error = (model - truth + 1) / 2
  video = tf.concat([truth, model, error], 2)           # [N, T, 3H, W, C]
  video = tf.concat(tf.unstack(video, axis=0), 2)       # [T, 3H, N*W, C]
  video = tf.cast(tf.clip_by_value(video, 0, 1) * 255, tf.uint8)
  return video, metrics
