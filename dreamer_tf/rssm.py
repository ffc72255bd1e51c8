"""The recurrent state-space model (docs/design.md section 3)."""

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow import keras

import tools
from dreamer_tf import networks

tfd = tfp.distributions
layers = keras.layers


class RSSM(layers.Layer):
  """Recurrent state-space model with a deterministic GRU path and a
  stochastic diagonal-Gaussian state.

  A state is a dict of float32 tensors: mean, std, stoch [..., stoch] and
  deter [..., deter]. Rollouts (`observe`, `imagine`) take and return
  batch-major tensors [B, T, ...]. The hidden layers always use elu, as the
  reference's (it never passes `dense_act` to the RSSM). The GRU keeps the
  recurrent state in float32 even under a mixed policy: it is carried through
  50 observe and 15 imagination steps, where 16-bit rounding would pile up.

  Noise: every sampling step accepts an optional `eps` (standard-normal noise
  of the stoch shape) so that rollouts can be made deterministic in tests.
  """

  def __init__(self, stoch=30, deter=200, hidden=200, dtype=None, name='rssm',
               unroll=True):
    super().__init__(name=name, dtype=dtype)
    self._stoch, self._deter = stoch, deter
    self._unroll = unroll  # Rollouts: unrolled, or one symbolic loop.
    dense = lambda units, act, name: networks.Dense(
        units, act, dtype=dtype, name=name)
    self.img1 = dense(hidden, 'elu', 'img1')
    self.gru = layers.GRUCell(deter, name='gru', dtype='float32')
    self.img2 = dense(hidden, 'elu', 'img2')
    self.img3 = dense(2 * stoch, None, 'img3')
    self.obs1 = dense(hidden, 'elu', 'obs1')
    self.obs2 = dense(2 * stoch, None, 'obs2')

  def initial(self, batch_size):
    zeros = lambda size: tf.zeros([batch_size, size], tf.float32)
    return dict(mean=zeros(self._stoch), std=zeros(self._stoch),
                stoch=zeros(self._stoch), deter=zeros(self._deter))

  def observe(self, embed, action, state=None, eps=None):
    """Posterior and prior states [B, T, ...] for embed [B, T, E] and the
    actions that led to each step [B, T, A]. `eps` is None or a pair
    (eps_prior, eps_post), each [B, T, stoch]."""
    if state is None:
      state = self.initial(tf.shape(action)[0])
    inputs = (action, embed) if eps is None else (action, embed, *eps)
    inputs = tf.nest.map_structure(_swap, inputs)
    step = lambda prev, inp: self.obs_step(
        prev[0], inp[0], inp[1], None if eps is None else inp[2:])
    post, prior = tools.scan(step, inputs, (state, state),
                             unroll=self._unroll)
    return (tf.nest.map_structure(_swap, post),
            tf.nest.map_structure(_swap, prior))

  def imagine(self, action, state=None):
    """Prior states [B, T, ...] for a given action sequence [B, T, A]."""
    if state is None:
      state = self.initial(tf.shape(action)[0])
    prior = tools.scan(self.img_step, _swap(action), state,
                       unroll=self._unroll)
    return tf.nest.map_structure(_swap, prior)

  def get_feat(self, state):
    """concat(stoch, deter): [..., stoch + deter] float32."""
    return tf.concat([state['stoch'], state['deter']], -1)

  def get_dist(self, state):
    return tfd.MultivariateNormalDiag(state['mean'], state['std'])

  def img_step(self, prev_state, prev_action, eps=None):
    """Prior: the next state from the previous state and action."""
    x = tf.concat([prev_state['stoch'], tf.cast(prev_action, tf.float32)], -1)
    x = self.img1(x)
    deter, _ = self.gru(tf.cast(x, tf.float32), [prev_state['deter']])
    x = self.img3(self.img2(deter))
    return dict(self._stats(x, eps), deter=deter)

  def obs_step(self, prev_state, prev_action, embed, eps=None):
    """Posterior and prior from the previous state, action and embedding.
    `eps` is None or (eps_prior, eps_post). The posterior sees the prior's
    deter and the embedding, not the previous stoch."""
    eps_prior, eps_post = (None, None) if eps is None else eps
    prior = self.img_step(prev_state, prev_action, eps_prior)
    x = tf.concat([prior['deter'], embed], -1)
    x = self.obs2(self.obs1(x))
    post = dict(self._stats(x, eps_post), deter=prior['deter'])
    return post, prior

  def _stats(self, x, eps):
    mean, std = tf.split(tf.cast(x, tf.float32), 2, -1)
    std = tf.nn.softplus(std) + 0.1
    if eps is None:
      eps = tf.random.normal(tf.shape(mean))
    return dict(mean=mean, std=std, stoch=mean + std * eps)


def _swap(x):
  """Swaps the first two axes: batch-major <-> time-major."""
  return tf.transpose(x, [1, 0] + list(range(2, len(x.shape))))
