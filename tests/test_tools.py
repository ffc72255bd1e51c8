"""Math helpers against independent numpy references."""

import numpy as np
import pytest
import tensorflow as tf

import tools

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).


def numpy_lambda_return(reward, value, pcont, bootstrap, lam):
  """Direct backward loop over
  R_t = r_t + c_t((1-lam) v_{t+1} + lam R_{t+1})."""
  horizon = len(reward)
  returns = np.zeros_like(reward, dtype=np.float64)
  next_return, next_value = bootstrap, bootstrap
  for t in reversed(range(horizon)):
    returns[t] = reward[t] + pcont[t] * (
        (1 - lam) * next_value + lam * next_return)
    next_return, next_value = returns[t], value[t]
  return returns


@pytest.mark.parametrize('lam', [0.0, 0.95, 1.0])
def test_lambda_return_matches_numpy_loop(lam):
  rng = np.random.default_rng(0)
  reward, value = rng.normal(size=(2, 7, 4)).astype(np.float32)
  pcont = rng.uniform(0.5, 1.0, size=(7, 4)).astype(np.float32)
  bootstrap = rng.normal(size=(4,)).astype(np.float32)
  ours = tools.lambda_return(
      tf.constant(reward), tf.constant(value), tf.constant(pcont),
      tf.constant(bootstrap), lam, axis=0).numpy()
  expected = numpy_lambda_return(reward, value, pcont, bootstrap, lam)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_lambda_return_extremes_and_axis():
  rng = np.random.default_rng(1)
  reward, value = rng.normal(size=(2, 6, 3)).astype(np.float32)
  bootstrap = rng.normal(size=(3,)).astype(np.float32)
  gamma = 0.9
  args = (tf.constant(reward), tf.constant(value), gamma,
          tf.constant(bootstrap))
  # lambda=1: discounted Monte-Carlo return plus the discounted bootstrap.
  mc = tools.lambda_return(*args, 1.0).numpy()
  for t in range(6):
    expected = sum(gamma ** (k - t) * reward[k] for k in range(t, 6))
    expected = expected + gamma ** (6 - t) * bootstrap
    np.testing.assert_allclose(mc[t], expected, rtol=1e-5, atol=1e-5)
  # lambda=0: the one-step target r_t + gamma v_{t+1}.
  one = tools.lambda_return(*args, 0.0).numpy()
  next_value = np.concatenate([value[1:], bootstrap[None]], 0)
  np.testing.assert_allclose(one, reward + gamma * next_value, rtol=1e-5)
  # Time on axis 1 gives the transposed result.
  swapped = tools.lambda_return(
      tf.constant(reward.T), tf.constant(value.T), gamma,
      tf.constant(bootstrap), 0.95, axis=1).numpy()
  direct = tools.lambda_return(*args, 0.95).numpy()
  np.testing.assert_allclose(swapped, direct.T, rtol=1e-6)


def test_static_scan_reverse_and_structure():
  inputs = tf.constant([1.0, 2.0, 3.0])
  forward = tools.static_scan(lambda a, x: {'s': a['s'] + x}, inputs,
                              {'s': tf.constant(0.0)})
  np.testing.assert_allclose(forward['s'].numpy(), [1, 3, 6])
  backward = tools.static_scan(lambda a, x: a + x, inputs, tf.constant(0.0),
                               reverse=True)
  np.testing.assert_allclose(backward.numpy(), [6, 5, 3])


def test_tanh_bijector():
  bijector = tools.TanhBijector()
  x = tf.constant(np.linspace(-4, 4, 41), tf.float32)
  np.testing.assert_allclose(
      bijector.inverse(bijector.forward(x)).numpy(), x.numpy(), atol=2e-3)
  small = tf.constant(np.linspace(-2, 2, 21), tf.float32)
  np.testing.assert_allclose(
      bijector.inverse(bijector.forward(small)).numpy(), small.numpy(),
      atol=1e-5)
  expected = np.log(1 - np.tanh(small.numpy().astype(np.float64)) ** 2)
  np.testing.assert_allclose(
      bijector.forward_log_det_jacobian(small, event_ndims=0).numpy(),
      expected, rtol=1e-5, atol=1e-5)
  edge = tf.constant([-1.0, 1.0, 0.0])
  inverse = bijector.inverse(edge).numpy()
  assert np.all(np.isfinite(inverse)) and inverse[1] > 8
  ildj = bijector.inverse_log_det_jacobian(edge, event_ndims=0).numpy()
  assert np.all(np.isfinite(ildj))


def test_sample_dist_mode_is_best_sample_per_row():
  import tensorflow_probability as tfp
  tfd = tfp.distributions
  # Row 0 peaks at +0.5, row 1 at -0.5: the mode must differ per row (the
  # reference gave every row the sample chosen for row 0).
  loc = tf.constant([[np.arctanh(0.5)], [np.arctanh(-0.5)]], tf.float32)
  dist = tfd.Independent(tfd.TransformedDistribution(
      tfd.Normal(loc, 0.05), tools.TanhBijector()), 1)
  mode = tools.SampleDist(dist).mode().numpy()
  np.testing.assert_allclose(mode[:, 0], [0.5, -0.5], atol=0.05)
  mean = tools.SampleDist(dist).mean().numpy()
  np.testing.assert_allclose(mean[:, 0], [0.5, -0.5], atol=0.05)


def test_onehot_dist_straight_through():
  logits = tf.Variable([[0.0, 1.0, -1.0]])
  with tf.GradientTape() as tape:
    dist = tools.OneHotDist(logits)
    sample = dist.sample()
    loss = tf.reduce_sum(sample * tf.constant([[1.0, 2.0, 3.0]]))
  assert sample.numpy().sum() == pytest.approx(1.0)
  assert set(np.unique(sample.numpy())) <= {0.0, 1.0}
  grad = tape.gradient(loss, logits).numpy()
  probs = tf.nn.softmax(logits).numpy()[0]
  # d/dlogits of sum(probs * w) = probs * (w - probs . w)
  w = np.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(grad[0], probs * (w - probs @ w), rtol=1e-5)
  np.testing.assert_array_equal(dist.mode().numpy(), [[0, 1, 0]])


def test_every():
  every = tools.Every(10)
  assert [every(s) for s in (0, 5, 10, 12, 35, 36)] == [
      True, False, True, False, True, False]
  never = tools.Every(0)
  assert not any(never(s) for s in (0, 10, 100))


def test_correlation_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 7)).astype(np.float32)
  y = (0.3 * x + rng.normal(size=(4, 7))).astype(np.float32)
  expected = np.corrcoef(x.ravel(), y.ravel())[0, 1]
  assert float(tools.correlation(x, y)) == pytest.approx(expected, abs=1e-5)
  assert float(tools.correlation(x, np.ones_like(x))) == 0.0
