"""Health signals of the train step and KL balancing, against numpy and
hand-derived expectations; a real float16 overflow, logged and read by the
doctor."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tools
from dreamer_tf import agent as agent_lib
from dreamer_tf import doctor
from tiny import random_batch, tiny_config

tfd = tfp.distributions


def numpy_kl(mean_q, std_q, mean_p, std_p):
  """KL(N(mean_q, std_q) || N(mean_p, std_p)) of diagonal Gaussians, summed
  over the last axis."""
  return np.sum(np.log(std_p / std_q) + (std_q ** 2 + (mean_q - mean_p) ** 2)
                / (2 * std_p ** 2) - 0.5, -1)


def eps_for(batch, length, stoch, seed):
  rng = np.random.default_rng(seed)
  return tuple(tf.constant(rng.normal(size=(batch, length, stoch)),
                           tf.float32) for _ in range(2))


@pytest.mark.quick
def test_kl_is_the_mean_kl_before_free_nats():
  agent = agent_lib.Dreamer(tiny_config(free_nats=3.0), 2)
  data = agent.preprocess(random_batch(batch=3, length=6))
  eps = eps_for(3, 6, agent.config.stoch_size, 0)
  _, _, metrics = agent.world_model_loss(data, eps=eps)
  post, prior = agent.dynamics.observe(
      agent.encoder(data['image']), data['action'], eps=eps)
  expected = np.mean(numpy_kl(*(post[k].numpy() for k in ('mean', 'std')),
                              *(prior[k].numpy() for k in ('mean', 'std'))))
  assert float(metrics['kl']) == pytest.approx(expected, rel=1e-5)
  assert float(metrics['div']) == pytest.approx(max(expected, 3.0), rel=1e-5)
  assert expected < 3.0  # So kl and div differ: kl is before the floor.


@pytest.mark.quick
def test_saturation_of_known_actions():
  actions = tf.constant([[0.995, -1.0], [0.5, -0.98], [0.99, 0.991]])
  assert float(agent_lib.saturation(actions)) == pytest.approx(3 / 6)


@pytest.mark.parametrize('bias,expected', [(100.0, 1.0), (0.0, 0.0)])
def test_action_sat_counts_the_imagined_actions(bias, expected):
  # A deterministic actor: zero output kernel, mean bias `bias` and a tiny
  # std, so every imagined action is tanh(5 tanh(bias / 5)): 0.9999 or 0.
  agent = agent_lib.Dreamer(tiny_config(), 2)
  kernel, out_bias = agent.actor.out.kernel, agent.actor.out.bias
  kernel.assign(tf.zeros_like(kernel))
  out_bias.assign([bias, bias, -50.0, -50.0])
  metrics = agent.train(random_batch())
  assert float(metrics['action_sat']) == expected


def numpy_lambda_return(reward, value, discount, lam):
  """R_t = r_t + discount ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H,
  for t < H - 1, time on axis 0."""
  horizon = len(reward)
  returns = np.zeros((horizon - 1,) + reward.shape[1:])
  last = value[-1]
  for t in reversed(range(horizon - 1)):
    last = reward[t] + discount * ((1 - lam) * value[t + 1] + lam * last)
    returns[t] = last
  return returns


class KnownHead:
  def __init__(self, prediction):
    self._prediction = tf.constant(prediction, tf.float32)

  def __call__(self, feat):
    return tfd.Independent(tfd.Normal(self._prediction, 1.0), 0)

  def call_twice(self, feat):
    # The value head runs once for both losses (networks.MLP.call_twice).
    return self(feat), self(feat)


@pytest.mark.quick
def test_value_and_return_means_and_gap_on_known_values():
  agent = agent_lib.Dreamer(tiny_config(horizon=5), 2)
  rng = np.random.default_rng(3)
  reward = rng.normal(size=(5, 7)).astype(np.float32)
  value = (10 + rng.normal(size=(5, 7))).astype(np.float32)
  agent.reward, agent.value = KnownHead(reward), KnownHead(value)
  metrics = {}
  agent.behavior_losses(tf.zeros([5, 7, 20]), metrics)
  returns = numpy_lambda_return(reward, value, 0.99, 0.95)
  assert float(metrics['value_mean']) == pytest.approx(value[:-1].mean(),
                                                       rel=1e-5)
  assert float(metrics['return_mean']) == pytest.approx(returns.mean(),
                                                        rel=1e-5)
  assert float(metrics['value_gap']) == pytest.approx(
      np.abs(value[:-1] - returns).mean(), rel=1e-5)


def test_skip_frac_counts_skipped_steps():
  agent = agent_lib.Dreamer(tiny_config(), 2)
  good = random_batch()
  bad = dict(good, reward=tf.fill(good['reward'].shape, np.nan))
  fractions = [float(agent.train(batch)['skip_frac'])
               for batch in (good, bad, good, bad)]
  assert fractions == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
  assert int(agent.model_opt.iterations) == 2  # The NaN steps were skipped.


def test_float16_overflow_is_a_skipped_step_not_an_infinite_norm(tmp_path):
  # The GPU path (mixed_float16, dynamic loss scaling), forced on the CPU.
  agent = agent_lib.Dreamer(tiny_config(), 2, policy='mixed_float16')
  optimizers = (agent.model_opt, agent.actor_opt, agent.value_opt)
  def train(scale, seed):
    for opt in optimizers:
      opt.loss_scale.assign(scale)
    return {k: float(v) for k, v in agent.train(
        random_batch(seed=seed)).items()}
  # A loss scale of 2**40: every scaled gradient overflows float16 (largest
  # finite value 65504), a real overflow, and each optimizer skips.
  skipped = train(2.0 ** 40, 0)
  assert all(np.isfinite(v) for v in skipped.values()), skipped
  for opt in optimizers:
    assert skipped[f'{opt.name}_skipped'] == 1.0
    assert f'{opt.name}_grad_norm' not in skipped
    assert int(opt.iterations) == 0 and float(opt.loss_scale) == 2.0 ** 39
  assert skipped['skip_frac'] == 1.0
  # At a loss scale of 16 the gradients fit: applied, with their norms.
  applied = [train(16.0, seed) for seed in (1, 2)]
  for metrics in applied:
    for opt in optimizers:
      assert metrics[f'{opt.name}_skipped'] == 0.0
      assert np.isfinite(metrics[f'{opt.name}_grad_norm'])
  assert int(agent.model_opt.iterations) == 2
  # Logged as dreamer.py's loop does (every metric of each step, window
  # means): the skipped step and an applied one, then an applied one.
  logger = tools.Logger(tmp_path)
  for step, window in ((5000, [skipped, applied[0]]), (6000, [applied[1]])):
    for metrics in window:
      for name, value in metrics.items():
        logger.scalar(name, value)
    logger.write(step)
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert 'Infinity' not in text and 'NaN' not in text
  first = json.loads(text.splitlines()[0])
  assert first['model_skipped'] == 0.5   # 1 of the 2 updates skipped.
  assert first['model_grad_norm'] == pytest.approx(
      applied[0]['model_grad_norm'])     # The applied update's norm.
  results = {r.name: r for r in doctor.diagnose(
      doctor.read_history(tmp_path), {})}
  assert results['finite numbers'].verdict == 'ok', results['finite numbers']
  assert doctor.main(['--logdir', str(tmp_path)]) == 0


def test_optimizer_metrics_without_loss_scaling_are_unchanged():
  var = tf.keras.Variable([1.0], name='w')
  opt = tools.Optimizer('test', [var], 0.1)
  assert set(opt.metrics(tf.constant(np.inf))) == {'test_grad_norm'}
  scaled = tools.Optimizer('test', [var], 0.1, loss_scale=True)
  metrics = scaled.metrics(tf.constant(np.inf))
  assert float(metrics['test_skipped']) == 1.0
  assert tools.Optimizer.applied_norms(metrics) == {
      'test_skipped': metrics['test_skipped']}
  metrics = scaled.metrics(tf.constant(2.0))
  assert float(metrics['test_skipped']) == 0.0
  assert tools.Optimizer.applied_norms(metrics) == metrics


def kl_and_gradients(agent, data, eps, balance):
  variables = agent.dynamics.trainable_variables + \
      agent.encoder.trainable_variables
  with tf.GradientTape() as tape:
    post, prior = agent.dynamics.observe(
        agent.encoder(data['image']), data['action'], eps=eps)
    div = agent_lib.free_nats_kl(agent.dynamics.get_dist(post),
                                 agent.dynamics.get_dist(prior), 0.0, balance)
  grads = tape.gradient(div, variables)
  return float(div), {v.path: g for v, g in zip(variables, grads)}


@pytest.mark.quick
@pytest.mark.parametrize('balance', [0.8, 0.3])
def test_kl_balance_splits_the_gradient_not_the_value(balance):
  # One-step sequences: no posterior sample feeds a later prior, so the
  # prior-only layers (img2, img3) get only the prior side of the KL and the
  # posterior-only ones (obs1, obs2, the encoder) only the posterior side.
  agent = agent_lib.Dreamer(tiny_config(free_nats=0.0), 2)
  data = agent.preprocess(random_batch(batch=4, length=1))
  eps = eps_for(4, 1, agent.config.stoch_size, 1)
  plain_value, plain = kl_and_gradients(agent, data, eps, 0.0)
  value, balanced = kl_and_gradients(agent, data, eps, balance)
  assert value == pytest.approx(plain_value, rel=1e-6)
  checked = {'prior': 0, 'post': 0}
  for path, grad in plain.items():
    if grad is None:
      continue
    layer = path.split('/')[0]
    if layer in ('img2', 'img3'):
      share, side = balance, 'prior'
    elif layer in ('obs1', 'obs2', 'encoder'):
      share, side = 1 - balance, 'post'
    else:
      continue  # img1 and the GRU feed both sides through deter.
    np.testing.assert_allclose(balanced[path].numpy(), share * grad.numpy(),
                               rtol=1e-4, atol=1e-7, err_msg=path)
    assert float(tf.reduce_sum(tf.abs(grad))) > 0, path
    checked[side] += 1
  assert checked == {'prior': 4, 'post': 4 + 8}, checked


@pytest.mark.quick
def test_kl_balance_off_is_the_plain_kl_exactly():
  agent = agent_lib.Dreamer(tiny_config(free_nats=0.5), 2)
  data = agent.preprocess(random_batch(batch=3, length=4))
  eps = eps_for(3, 4, agent.config.stoch_size, 2)
  variables = agent.dynamics.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    post, prior = agent.dynamics.observe(
        agent.encoder(data['image']), data['action'], eps=eps)
    post_dist = agent.dynamics.get_dist(post)
    prior_dist = agent.dynamics.get_dist(prior)
    ours = agent_lib.free_nats_kl(post_dist, prior_dist, 0.5)
    plain = tf.maximum(tf.reduce_mean(tfd.kl_divergence(post_dist,
                                                        prior_dist)), 0.5)
  assert float(ours) == float(plain)
  for a, b in zip(tape.gradient(ours, variables),
                  tape.gradient(plain, variables)):
    if a is None:
      assert b is None
    else:
      np.testing.assert_array_equal(a.numpy(), b.numpy())
