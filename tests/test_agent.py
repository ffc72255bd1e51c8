"""The agent: shapes, parameter counts, gradient routing, precision, overfit."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow import keras

import dreamer
import tools
from dreamer_tf import agent as agent_lib
from dreamer_tf import networks
from dreamer_tf.rssm import RSSM
from tiny import random_batch, tiny_config


def full_config(**overrides):
  config = dreamer.define_config()
  vars(config).update(overrides, precision=32)
  return config


@pytest.mark.quick
def test_shapes_at_default_sizes():
  encoder = networks.ConvEncoder()
  assert encoder(tf.zeros([2, 3, 64, 64, 3])).shape == (2, 3, 1024)
  decoder = networks.ConvDecoder()
  assert decoder(tf.zeros([2, 3, 230])).mean().shape == (2, 3, 64, 64, 3)
  rssm = RSSM()
  post, prior = rssm.observe(tf.zeros([2, 7, 1024]), tf.zeros([2, 7, 6]))
  for state in (post, prior):
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(
        mean=(2, 7, 30), std=(2, 7, 30), stoch=(2, 7, 30), deter=(2, 7, 200))
  assert rssm.get_feat(post).shape == (2, 7, 230)
  imagined = rssm.imagine(tf.zeros([2, 4, 6]))
  assert imagined['deter'].shape == (2, 4, 200)
  assert rssm.get_feat(imagined).shape == (2, 4, 230)


# docs/design.md section 3, read off the reference code.
PARAMS = [
    (1, False, 'tanh_normal', 5_295_820, 574_402, 556_920),
    (6, False, 'tanh_normal', 5_296_820, 578_412, 557_920),
    (6, True, 'onehot', 5_710_421, 576_006, 557_920),
    (18, True, 'onehot', 5_712_821, 580_818, 560_320),
]


@pytest.mark.quick
@pytest.mark.parametrize('act_dim,pcont,dist,model,actor,rssm', PARAMS)
def test_parameter_counts(act_dim, pcont, dist, model, actor, rssm):
  agent = agent_lib.Dreamer(
      full_config(pcont=pcont, action_dist=dist), act_dim)
  assert agent.param_counts() == dict(model=model, actor=actor, value=413_601)
  parts = {p.name: networks.count_params(p) for p in agent.model_parts}
  expected = dict(encoder=690_144, decoder=3_795_555, reward=253_201,
                  rssm=rssm)
  if pcont:
    expected['pcont'] = 413_601
  assert parts == expected


@pytest.mark.quick
def test_free_nats_gate_the_kl_gradient():
  rssm = RSSM(4, 16, 16)
  action = tf.random.normal([3, 5, 2], seed=2)
  embed = tf.random.normal([3, 5, 8], seed=1)
  # A small embedding keeps the posterior near the prior (mean KL < 3); a
  # large one pushes it far away (mean KL > 3). The threshold stays at 3.
  for scale, below in ((0.01, True), (30.0, False)):
    with tf.GradientTape() as tape:
      post, prior = rssm.observe(scale * embed, action)
      post_dist, prior_dist = rssm.get_dist(post), rssm.get_dist(prior)
      div = agent_lib.free_nats_kl(post_dist, prior_dist, 3.0)
    mean_kl = float(tf.reduce_mean(
        tfp.distributions.kl_divergence(post_dist, prior_dist)))
    assert (mean_kl < 3.0) == below, mean_kl
    assert float(div) == pytest.approx(max(mean_kl, 3.0))
    grads = tape.gradient(div, rssm.trainable_variables)
    norm = sum(float(tf.reduce_sum(tf.abs(g))) for g in grads if g is not None)
    assert (norm > 0) == (not below), (mean_kl, norm)


def _variables(agent):
  named = {}
  for name in ('encoder', 'dynamics', 'decoder', 'reward', 'pcont', 'actor',
               'value'):
    module = getattr(agent, name)
    if module:
      named.update({f'{name}:{v.path}': v for v in module.trainable_variables})
  return named


@pytest.mark.quick
@pytest.mark.parametrize('pcont', [False, True])
def test_gradients_reach_exactly_the_right_variables(pcont):
  config = tiny_config(pcont=pcont)
  agent = agent_lib.Dreamer(config, 2)
  data = agent.preprocess(random_batch())
  named = _variables(agent)
  with tf.GradientTape(persistent=True) as tape:
    model_loss, post, _ = agent.world_model_loss(data)
    imag_feat = agent.imagine_ahead(post)
    actor_loss, value_loss = agent.behavior_losses(imag_feat)
  reached = {}
  for loss_name, loss in (('model', model_loss), ('actor', actor_loss),
                          ('value', value_loss)):
    grads = tape.gradient(loss, list(named.values()))
    reached[loss_name] = {
        name.split(':')[0] for name, g in zip(named, grads)
        if g is not None and float(tf.reduce_sum(tf.abs(g))) > 0}
  model_parts = {'encoder', 'dynamics', 'decoder', 'reward'} | (
      {'pcont'} if pcont else set())
  assert reached['model'] == model_parts
  # The actor's gradient flows back through the learned dynamics and heads,
  # but only the actor's optimizer applies it.
  assert 'actor' in reached['actor'] and 'value' in reached['actor']
  assert reached['value'] == {'value'}
  # Each optimizer owns exactly its part's variables, none without gradient.
  owned = lambda opt: {v.path for v in opt.variables}
  assert owned(agent.actor_opt) == {
      v.path for v in agent.actor.trainable_variables}
  assert owned(agent.value_opt) == {
      v.path for v in agent.value.trainable_variables}
  assert len(agent.model_opt.variables) == sum(
      len(p.trainable_variables) for p in agent.model_parts)
  for opt, loss in ((agent.model_opt, model_loss),
                    (agent.actor_opt, actor_loss),
                    (agent.value_opt, value_loss)):
    assert all(g is not None for g in opt.gradients(tape, loss))


def test_train_step_updates_every_variable_of_each_optimizer():
  # Free nats off: at init the KL is below 3 nats, so with them on the prior
  # layers (img2, img3) get a zero gradient and Adam leaves them unchanged.
  agent = agent_lib.Dreamer(tiny_config(free_nats=0.0), 2)
  before = {v.path + str(id(v)): v.numpy() for v in _variables(agent).values()}
  metrics = agent.train(random_batch())
  assert set(agent_lib.METRICS) <= set(metrics)
  for opt in (agent.model_opt, agent.actor_opt, agent.value_opt):
    assert int(opt.iterations) == 1
    for var in opt.variables:
      assert not np.array_equal(var.numpy(), before[var.path + str(id(var))]), (
          opt.name, var.path)


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16',
                                    'mixed_float16'])
@pytest.mark.parametrize('pcont', [False, True])
def test_train_step_finite_in_every_precision(policy, pcont):
  config = tiny_config(pcont=pcont, action_dist='onehot' if pcont else
                       'tanh_normal')
  agent = agent_lib.Dreamer(config, 3, policy=policy)
  # In float16 the first steps overflow at the initial loss scale of 2**15:
  # those are skipped and halve the scale until the gradients fit.
  for step in range(30):
    metrics = agent.train(random_batch(act_dim=3, onehot=pcont, seed=step))
    # A skipped update says so (its infinite norm is not reported).
    if not any(float(v) for k, v in metrics.items() if k.endswith('_skipped')):
      break
  expected = set(agent_lib.METRICS) | ({'pcont_loss'} if pcont else set())
  assert expected <= set(metrics)
  for name, value in metrics.items():
    assert value.dtype == tf.float32 and np.isfinite(value.numpy()), name
  for var in _variables(agent).values():
    assert var.dtype == tf.float32, var.path
  compute = agent.encoder.convs[0].compute_dtype
  assert compute == {'float32': 'float32', 'mixed_bfloat16': 'bfloat16',
                     'mixed_float16': 'float16'}[policy]
  if policy == 'mixed_float16':
    assert float(metrics['loss_scale']) == 2.0 ** (15 - step)
  else:
    assert step == 0  # Without loss scaling nothing overflows.


def test_precision_flag_picks_bfloat16_on_cpu_and_float16_on_gpu():
  assert agent_lib.dtype_policy(32) == 'float32'
  assert agent_lib.dtype_policy(16, gpu=False) == 'mixed_bfloat16'
  assert agent_lib.dtype_policy(16, gpu=True) == 'mixed_float16'
  with pytest.raises(ValueError, match='precision'):
    agent_lib.dtype_policy(8)


def _float16_head():
  head = networks.DenseDecoder((), 2, 8, dtype='mixed_float16', name='head')
  head(tf.zeros([1, 4]))
  return head


@pytest.mark.quick
def test_loss_scale_is_applied_and_undone():
  head = _float16_head()
  opt = tools.Optimizer('test', head.trainable_variables, 1e-3, clip=100,
                        loss_scale=True)
  x = tf.random.normal([16, 4], seed=3)
  with tf.GradientTape(persistent=True) as tape:
    # Scaled down so that no gradient reaches 2 (2 * 2**15 overflows
    # float16): which one would depends on the random initial weights.
    loss = -0.1 * tf.reduce_mean(head(x).log_prob(tf.ones([16])))
  plain = tape.gradient(loss, opt.variables)
  unscaled = opt.gradients(tape, loss)
  for p, u in zip(plain, unscaled):
    np.testing.assert_allclose(u.numpy(), p.numpy(), rtol=1e-2, atol=1e-4)
  # The scaled backward pass really ran at 2**15: float16 gradients of the
  # scaled loss are 2**15 times larger before the division.
  scaled = tape.gradient(loss, opt.variables, output_gradients=2.0 ** 15)
  np.testing.assert_allclose(
      scaled[-1].numpy() / 2 ** 15, plain[-1].numpy(), rtol=1e-2, atol=1e-4)


def test_overflowing_step_is_skipped_and_lowers_the_scale():
  head = _float16_head()
  opt = tools.Optimizer('test', head.trainable_variables, 1e-3, clip=100,
                        loss_scale=True)
  before = [v.numpy() for v in opt.variables]
  x = tf.random.normal([16, 4], seed=4)
  with tf.GradientTape(persistent=True) as tape:
    loss = 1e4 * tf.reduce_mean(head(x).mean())  # 1e4 * 2**15 > float16 max.
  norm = opt.step(tape, loss)
  assert not np.isfinite(norm.numpy())
  assert float(opt.loss_scale) == 2.0 ** 14
  assert int(opt.iterations) == 0
  for b, v in zip(before, opt.variables):
    np.testing.assert_array_equal(b, v.numpy())
  with tf.GradientTape(persistent=True) as tape:
    loss = tf.reduce_mean(head(x).mean())
  assert np.isfinite(opt.step(tape, loss).numpy())
  assert int(opt.iterations) == 1 and float(opt.loss_scale) == 2.0 ** 14


@pytest.mark.quick
def test_gradient_clipping_and_weight_decay():
  var = keras.Variable([3.0, 4.0], name='w')
  opt = tools.Optimizer('test', [var], 0.1, clip=1.0, wd=0.5, wd_pattern='w')
  with tf.GradientTape(persistent=True) as tape:
    loss = tf.reduce_sum(var * tf.constant([30.0, 40.0]))
  norm = opt.step(tape, loss)
  assert float(norm) == pytest.approx(50.0)  # Reported before clipping.
  # Decay first (var *= 1 - lr * wd), then one Adam step of size ~lr.
  np.testing.assert_allclose(
      var.numpy(), np.array([3.0, 4.0]) * (1 - 0.05) - 0.1, atol=1e-4)


def test_overfitting_one_batch_lowers_the_world_model_loss():
  # One colour per sequence and step. The Gaussian's constant 0.5 log(2 pi)
  # per pixel cannot be learned, so we track the loss above it. The untrained
  # decoder already predicts about the mean colour (excess ~ 12288 / 24 = 512),
  # and a bias alone cannot do better, so falling below 0.7 of the start needs
  # the frame's colour to travel encoder -> RSSM -> decoder. Measured: 572 ->
  # ~310 after 100 steps at lr 3e-3 (the default 6e-4 needs ~300 steps).
  # Seeded: over unseeded runs the ratio was 0.54-0.55, but one seed in six
  # gave 0.64, near the bound, so an unlucky start could fail this test.
  keras.utils.set_random_seed(0)
  agent = agent_lib.Dreamer(tiny_config(model_lr=3e-3), 2)
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (3, 6, 1, 1, 3))
  data = random_batch()
  data['image'] = tf.constant(
      np.broadcast_to(colours, (3, 6, 64, 64, 3)), tf.uint8)
  constant = 64 * 64 * 3 * 0.5 * np.log(2 * np.pi)
  losses = [float(agent.train(data)['model_loss']) - constant
            for _ in range(100)]
  assert np.mean(losses[-10:]) < 0.7 * losses[0], (losses[0], losses[-10:])


class KnownPredictions:
  """Stands in for a head: its predictions are given, not learned."""

  def __init__(self, prediction, binary=False):
    self._prediction = tf.constant(prediction, tf.float32)
    self._binary = binary

  def __call__(self, feat):
    tfd = tfp.distributions
    if self._binary:
      return tfd.Independent(tfd.Bernoulli(probs=self._prediction,
                                           dtype=tf.float32), 0)
    return tfd.Independent(tfd.Normal(self._prediction, 1.0), 0)


def test_validation_metrics_on_known_predictions():
  agent = agent_lib.Dreamer(tiny_config(pcont=True), 2)
  data = random_batch()
  rng = np.random.default_rng(5)
  predicted = (data['reward'].numpy() * 0.5 +
               rng.normal(size=data['reward'].shape)).astype(np.float32)
  pcont_probs = np.where(rng.uniform(size=predicted.shape) < 0.8,
                         data['discount'].numpy(), 1 - data['discount'].numpy())
  agent.reward = KnownPredictions(predicted)
  agent.pcont = KnownPredictions(np.clip(pcont_probs, 0.1, 0.9), binary=True)
  _, _, metrics = agent.world_model_loss(agent.preprocess(data))
  expected = np.corrcoef(predicted.ravel(), data['reward'].numpy().ravel())
  assert float(metrics['reward_corr']) == pytest.approx(expected[0, 1],
                                                        abs=1e-5)
  accuracy = np.mean((pcont_probs > 0.5) == (data['discount'].numpy() > 0.5))
  assert float(metrics['pcont_acc']) == pytest.approx(accuracy)
  image = agent.preprocess(data)['image'].numpy()
  feat = agent.dynamics.get_feat(agent.dynamics.observe(
      agent.encoder(image), data['action'])[0])
  mean = agent.decoder(feat).mean().numpy()
  # Same decoder weights; the features differ by the posterior's sampling
  # noise only, which moves the untrained decoder's output very little.
  assert float(metrics['image_mse']) == pytest.approx(
      np.mean((mean - image) ** 2), rel=0.05)


def test_open_loop_video_and_errors():
  agent = agent_lib.Dreamer(tiny_config(), 2)
  data = random_batch(batch=3, length=12)
  video, metrics = agent_lib.open_loop(agent, data, context=5, count=2)
  assert video.shape == (12, 3 * 64, 2 * 64, 3) and video.dtype == tf.uint8
  # The truth row of the first sequence is the input image itself.
  np.testing.assert_allclose(video.numpy()[:, :64, :64],
                             data['image'].numpy()[0], atol=1)
  assert sorted(metrics) == ['openl_mse_h1', 'openl_mse_h5']
  assert all(0 < float(v) < 1 for v in metrics.values())


@pytest.mark.parametrize('make,shape', [
    (lambda p: networks.Dense(64, 'elu', dtype=p), (4096, 32)),
    (lambda p: networks.Conv2D(16, 4, 2, activation='relu', dtype=p),
     (64, 31, 31, 8)),
    (lambda p: networks.Conv2DTranspose(8, 6, 2, activation='relu', dtype=p),
     (64, 13, 13, 16)),
])
@pytest.mark.quick
def test_bfloat16_bias_gradients_match_float32(make, shape):
  # TensorFlow's CPU BiasAddGrad in bfloat16 is ~90% off; our layers must
  # give bias gradients as good as their kernel gradients.
  x = tf.random.normal(shape, seed=7)
  grads = {}
  for policy in ('float32', 'mixed_bfloat16'):
    layer = make(policy)
    layer.build(shape)
    if policy == 'float32':
      weights = [v.numpy() for v in layer.weights]
    else:
      for var, value in zip(layer.weights, weights):
        var.assign(value)
    with tf.GradientTape() as tape:
      y = tf.cast(layer(x), tf.float32)
      loss = tf.reduce_mean(tf.square(y - 0.3))
    grads[policy] = [g.numpy() for g in tape.gradient(
        loss, [layer.kernel, layer.bias])]
  for ours, exact in zip(grads['mixed_bfloat16'], grads['float32']):
    error = np.max(np.abs(ours - exact)) / np.max(np.abs(exact))
    assert error < 0.05, error


@pytest.mark.quick
@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16',
                                    'mixed_float16'])
@pytest.mark.parametrize('act', ['elu', 'relu', 'tanh', 'swish', 'gelu',
                                 'leaky_relu'])
def test_value_head_run_once_serves_both_losses(policy, act):
  # call_twice's second output must behave exactly like the head run again
  # on stopped features (the reference's value tape): same values, the same
  # weight gradients from TensorFlow's own autodiff, no feature gradient.
  # Its first output must be the head itself, gradients included.
  head = networks.DenseDecoder((), 3, 16, act=act, dtype=policy)
  x = tf.random.normal([4, 5, 7], seed=3)
  head(x)
  scale = tf.random.normal([4, 5], seed=4)
  loss = lambda y: tf.reduce_sum(scale * y + 0.3 * y ** 2)
  sources = [x] + head.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    plain = head(x).mode()
    stopped = head(tf.stop_gradient(x)).mode()
    first, second = [d.mode() for d in head.call_twice(x)]
    losses = [loss(y) for y in (plain, stopped, first, second)]
  grads = [tape.gradient(value, sources) for value in losses]
  rtol = 1e-5 if policy == 'float32' else 2e-2
  for y in (first, second):
    np.testing.assert_allclose(y.numpy(), plain.numpy(), rtol=rtol,
                               atol=rtol)
  assert grads[1][0] is None and grads[3][0] is None
  for ours, exact in ((grads[2], grads[0]), (grads[3][1:], grads[1][1:])):
    assert len(ours) == len(exact)
    for a, b in zip(ours, exact):
      scale_b = np.max(np.abs(b.numpy()))
      assert scale_b > 0
      np.testing.assert_allclose(a.numpy() / scale_b, b.numpy() / scale_b,
                                 atol=rtol)


@pytest.fixture(scope='module')
def reference_step():
  """The reference's unrolled loops and schedule, which the golden tests
  check, taking one step on fixed weights, batch and random draws: the
  initial variables, the inputs, the metrics and the updated weights (one
  build and tracing for every option compared with it)."""
  batch, length, act = 3, 6, 2
  config = tiny_config(free_nats=0.0)
  data = random_batch(batch, length, act)
  rng = np.random.default_rng(5)
  shapes = dict(prior=(batch, length, config.stoch_size),
                post=(batch, length, config.stoch_size),
                actor=(batch, length, config.horizon, act),
                imag=(batch, length, config.horizon, config.stoch_size))
  noise = {k: tf.constant(rng.normal(size=v), tf.float32)
           for k, v in shapes.items()}
  unrolled = agent_lib.Dreamer(
      tiny_config(free_nats=0.0, scan='unrolled', save_memory=False), act)
  initial = [v.numpy() for v in unrolled.variables()]
  metrics = {k: v.numpy() for k, v in unrolled.train(data, noise).items()}
  weights = [w.numpy() for w in unrolled.weights()]
  return dict(act=act, data=data, noise=noise, initial=initial,
              metrics=metrics, weights=weights)


@pytest.mark.parametrize('option', [
    dict(scan='loop', save_memory=False),
    dict(scan='unrolled', save_memory=True),
    dict(scan='loop', save_memory=True)])
@pytest.mark.xdist_group('reference_step')
def test_speed_and_memory_options_give_the_same_step(option, reference_step):
  # --scan loop (tf.scan) and --save_memory (another schedule) against the
  # reference's unrolled loops and schedule, which the golden tests check:
  # same weights, batch and random draws, so the same losses and updated
  # weights to float rounding.
  ref = reference_step
  looped = agent_lib.Dreamer(tiny_config(free_nats=0.0, **option), ref['act'])
  assert len(looped.variables()) == len(ref['initial'])
  for value, target in zip(ref['initial'], looped.variables()):
    target.assign(value)
  second = looped.train(ref['data'], ref['noise'])
  for key in ('model_loss', 'actor_loss', 'value_loss', 'model_grad_norm',
              'actor_grad_norm', 'value_grad_norm', 'div'):
    np.testing.assert_allclose(second[key], ref['metrics'][key], rtol=1e-5,
                               err_msg=key)
  assert len(looped.weights()) == len(ref['weights'])
  for a, b in zip(ref['weights'], looped.weights()):
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-7)
