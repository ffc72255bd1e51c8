"""The paper's networks (docs/design.md section 3) as Keras 3 layers.

Every sub-layer is created once in `__init__` under the reference's name
(`h1..` in the conv nets, `h0..`/`hout` in the dense heads), so weights map to
the reference's by name. `dtype` is a Keras dtype policy name: 'float32',
'mixed_bfloat16' or 'mixed_float16'. Layers compute in the policy's compute
dtype, variables stay float32, and every module returns float32 tensors or
float32 distributions, so losses are always computed in float32.
"""

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow import keras

import tools

tfd = tfp.distributions
layers = keras.layers


@tf.custom_gradient
def bias_add(x, bias):
  """x + bias over the last axis, with the bias gradient summed by reduce_sum.

  Keras adds biases with tf.nn.bias_add, whose CPU gradient kernel
  (BiasAddGrad) is wrong in bfloat16: measured against float32 on a
  [2.4M, 32] gradient its relative error was 0.92, while reduce_sum in
  bfloat16 was within 0.3%. Under precision 16 on a CPU every bias would
  otherwise train on a near-random gradient."""
  def grad(dy):
    return dy, tf.reduce_sum(dy, axis=tf.range(tf.rank(dy) - 1))
  return x + bias, grad


def _finish(layer, x):
  x = bias_add(x, tf.cast(layer.bias, x.dtype))
  return layer.activation(x)


class Dense(layers.Dense):
  """keras.layers.Dense with `bias_add` (same variables and math)."""

  def call(self, inputs):
    return _finish(self, keras.ops.matmul(inputs, self.kernel))


class Conv2D(layers.Conv2D):
  """keras.layers.Conv2D with `bias_add` (same variables and math)."""

  def call(self, inputs):
    return _finish(self, self.convolution_op(inputs, self.kernel))


class Conv2DTranspose(layers.Conv2DTranspose):
  """keras.layers.Conv2DTranspose with `bias_add` (same variables, math)."""

  def call(self, inputs):
    return _finish(self, keras.ops.conv_transpose(
        inputs, self.kernel, strides=list(self.strides), padding=self.padding,
        output_padding=self.output_padding, dilation_rate=self.dilation_rate,
        data_format=self.data_format))


class ConvEncoder(layers.Layer):
  """Image [..., 64, 64, 3] float (already scaled to [-0.5, 0.5]) ->
  embedding [..., 32 * depth] float32. Four 4x4 stride-2 VALID convolutions
  with 1, 2, 4, 8 times `depth` filters; any leading batch shape."""

  def __init__(self, depth=32, act='relu', dtype=None, name='encoder'):
    super().__init__(name=name, dtype=dtype)
    self.convs = [
        Conv2D(mult * depth, 4, 2, activation=act, dtype=dtype,
               name=f'h{i + 1}')
        for i, mult in enumerate((1, 2, 4, 8))]

  def call(self, image):
    lead = tf.shape(image)[:-3]
    x = tf.reshape(image, tf.concat([[-1], tf.shape(image)[-3:]], 0))
    for conv in self.convs:
      x = conv(x)
    x = tf.reshape(x, tf.concat([lead, [np.prod(x.shape[1:])]], 0))
    return tf.cast(x, tf.float32)


class ConvDecoder(layers.Layer):
  """Features [..., F] -> Independent(Normal(mean, 1), 3) over images
  [..., 64, 64, 3] (float32). Dense(32 * depth) then four stride-2 VALID
  transposed convolutions, 1 -> 5 -> 13 -> 30 -> 64 pixels."""

  def __init__(self, depth=32, act='relu', shape=(64, 64, 3), dtype=None,
               name='decoder'):
    super().__init__(name=name, dtype=dtype)
    self._shape = tuple(shape)
    self.dense = Dense(32 * depth, dtype=dtype, name='h1')
    specs = [(4 * depth, 5, act), (2 * depth, 5, act), (depth, 6, act),
             (shape[-1], 6, None)]
    self.deconvs = [
        Conv2DTranspose(filters, kernel, 2, activation=activation,
                        dtype=dtype, name=f'h{i + 2}')
        for i, (filters, kernel, activation) in enumerate(specs)]

  def build(self, input_shape):
    self.dense.build(input_shape)
    shape = (None, 1, 1, self.dense.units)
    for deconv in self.deconvs:
      deconv.build(shape)
      shape = deconv.compute_output_shape(shape)

  def call(self, features):
    # Same layers and weights as the reference's. On the 1x1 input the first
    # transposed convolution is exactly a matmul with the kernel reshaped to
    # [k * k * filters, 1024], 4x faster in bfloat16 than oneDNN's transposed
    # convolution (stride-1 "sub-pixel" forms of the others were slower).
    lead = tf.shape(features)[:-1]
    x = self.dense(features)
    x = tf.reshape(x, [-1, x.shape[-1]])
    first = self.deconvs[0]
    kernel = first.kernel                      # [k, k, filters, 1024]
    size, filters = kernel.shape[0], kernel.shape[2]
    x = tf.matmul(x, tf.reshape(kernel, [-1, kernel.shape[-1]]),
                  transpose_b=True)
    x = bias_add(tf.reshape(x, [-1, size, size, filters]),
                 tf.cast(first.bias, x.dtype))
    x = first.activation(x)
    for deconv in self.deconvs[1:]:
      x = deconv(x)
    mean = tf.reshape(tf.cast(x, tf.float32), tf.concat([lead, self._shape], 0))
    return tfd.Independent(tfd.Normal(mean, 1.0), len(self._shape))


class MLP(layers.Layer):
  """`count` Dense layers of `units` with `act` (named h0..), then a linear
  Dense `hout` with `out` outputs. Returns the float32 output."""

  def __init__(self, out, count, units, act='elu', dtype=None, name='mlp'):
    super().__init__(name=name, dtype=dtype)
    self.hidden = [Dense(units, act, dtype=dtype, name=f'h{i}')
                   for i in range(count)]
    self.out = Dense(out, dtype=dtype, name='hout')

  def call(self, x):
    for dense in self.hidden:
      x = dense(x)
    return tf.cast(self.out(x), tf.float32)

  def call_twice(self, x):
    """`call(x)` computed once and returned twice, float32 [..., out]: as
    is, and as a copy whose gradient reaches this MLP's weights but not `x`,
    which is what `call(tf.stop_gradient(x))` gives, without a second
    forward pass. The copy's backward pass is written out here from what
    the forward pass keeps: each layer's input and pre-activation."""
    dense = self.hidden + [self.out]
    dtype = self.compute_dtype
    h = tf.reshape(tf.cast(x, dtype), [-1, x.shape[-1]])
    kept = []
    for layer in dense:
      z = bias_add(tf.matmul(h, tf.cast(layer.kernel, dtype)),
                   tf.cast(layer.bias, dtype))
      kept.append((tf.stop_gradient(h), tf.stop_gradient(z)))
      h = layer.activation(z)
    shape = tf.concat([tf.shape(x)[:-1], [h.shape[-1]]], 0)
    out = tf.reshape(tf.cast(h, tf.float32), shape)

    @tf.custom_gradient
    def weights_only(*weights):
      def grad(dy):
        grads, d = [], tf.reshape(tf.cast(dy, dtype), [-1, dy.shape[-1]])
        for i in reversed(range(len(dense))):
          inputs, pre = kept[i]
          with tf.GradientTape() as tape:
            tape.watch(pre)
            post = dense[i].activation(pre)
          d = tape.gradient(post, pre, output_gradients=d)
          kernel = weights[2 * i]
          grads += [tf.reduce_sum(d, 0),
                    tf.matmul(inputs, d, transpose_a=True)]
          if i:
            d = tf.matmul(d, tf.cast(kernel, dtype), transpose_b=True)
        return [tf.cast(g, w.dtype) for g, w in zip(grads[::-1], weights)]
      return tf.stop_gradient(out), grad

    weights = [tf.convert_to_tensor(w) for layer in dense
               for w in (layer.kernel, layer.bias)]
    return out, weights_only(*weights)


class DenseDecoder(MLP):
  """Features [..., F] -> distribution over `shape` (float32).
  dist='normal': Independent(Normal(x, 1)); 'binary': Independent(Bernoulli
  (logits=x)). Reward head: 2 layers, value head 3, continuation head 3."""

  def __init__(self, shape, layers_count, units=400, dist='normal', act='elu',
               dtype=None, name='dense_decoder'):
    super().__init__(int(np.prod(shape)), layers_count, units, act, dtype, name)
    if dist not in ('normal', 'binary'):
      raise ValueError(f'Unknown DenseDecoder dist {dist!r}.')
    self._shape = tuple(shape)
    self._dist = dist

  def call(self, features):
    return self._distribution(super().call(features), features)

  def call_twice(self, features):
    """`call(features)` computed once, as two distributions: the second's
    gradient reaches this head's weights only (see `MLP.call_twice`)."""
    outs = super().call_twice(features)
    return tuple(self._distribution(x, features) for x in outs)

  def _distribution(self, x, features):
    x = tf.reshape(x, tf.concat([tf.shape(features)[:-1], self._shape], 0))
    if self._dist == 'normal':
      return tfd.Independent(tfd.Normal(x, 1.0), len(self._shape))
    return tfd.Independent(
        tfd.Bernoulli(logits=x, dtype=tf.float32), len(self._shape))


class ActionDecoder(MLP):
  """Actor: features [..., F] -> action distribution over [..., size].

  'tanh_normal': loc = 5 tanh(mean / 5), scale = softplus(raw + log(e^init_std
  - 1)) + min_std, Normal -> tanh -> Independent(1), wrapped in SampleDist
  (mode/mean/entropy from 100 samples). 'onehot': OneHotDist with
  straight-through sample gradients. Samples are float32.
  """

  def __init__(self, size, layers_count=4, units=400, dist='tanh_normal',
               act='elu', min_std=1e-4, init_std=5.0, mean_scale=5.0,
               dtype=None, name='actor'):
    if dist not in ('tanh_normal', 'onehot'):
      raise ValueError(
          f'Unknown action_dist {dist!r}: use tanh_normal or onehot.')
    out = 2 * size if dist == 'tanh_normal' else size
    super().__init__(out, layers_count, units, act, dtype, name)
    self._dist = dist
    self._min_std, self._mean_scale = min_std, mean_scale
    self._raw_init_std = float(np.log(np.exp(init_std) - 1))

  def loc_scale(self, features):
    """The Normal's loc and scale before the tanh, each [..., size]."""
    mean, std = tf.split(super().call(features), 2, -1)
    mean = self._mean_scale * tf.tanh(mean / self._mean_scale)
    std = tf.nn.softplus(std + self._raw_init_std) + self._min_std
    return mean, std

  def sample_from(self, features, eps):
    """The sample of `call(features)` for standard-normal noise `eps`
    [..., size]: tanh(loc + scale * eps), with the same gradient
    (tanh_normal only; for tests that fix the random draws)."""
    if self._dist != 'tanh_normal':
      raise ValueError('sample_from needs the tanh_normal actor.')
    mean, std = self.loc_scale(features)
    return tf.tanh(mean + std * tf.cast(eps, mean.dtype))

  def call(self, features):
    if self._dist == 'onehot':
      return tools.OneHotDist(super().call(features))
    mean, std = self.loc_scale(features)
    dist = tfd.TransformedDistribution(
        tfd.Normal(mean, std), tools.TanhBijector())
    return tools.SampleDist(tfd.Independent(dist, 1))


def count_params(layer):
  """Number of scalars in a layer's trainable variables."""
  return int(sum(np.prod(v.shape) for v in layer.trainable_variables))
