"""Layer-by-layer equality with the reference code (danijar/dreamer).

tests/fixtures/golden_tiny.npz holds the reference's weights at tiny sizes,
inputs and outputs; tests/fixtures/REFERENCE_README.md defines each array.
Weights are loaded into our modules by the reference's layer names.
"""

import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tools
from dreamer_tf import networks
from dreamer_tf.rssm import RSSM

# The inner-loop tier; one worker for the file's reference fixture (-n 2).
pytestmark = [pytest.mark.quick, pytest.mark.xdist_group('golden')]

tfd = tfp.distributions
FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'golden_tiny.npz'


def close(actual, expected):
  np.testing.assert_allclose(
      np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def ref():
  data = np.load(FIXTURE)
  cfg = {k[4:]: data[k].item() for k in data.files if k.startswith('cfg/')}
  depth, units = cfg['cnn_depth'], cfg['num_units']
  mods = dict(
      encoder=networks.ConvEncoder(depth),
      decoder=networks.ConvDecoder(depth),
      rssm=RSSM(cfg['stoch'], cfg['deter'], cfg['deter']),
      reward=networks.DenseDecoder((), cfg['reward_layers'], units,
                                   name='reward'),
      value=networks.DenseDecoder((), cfg['value_layers'], units, name='value'),
      pcont=networks.DenseDecoder((), cfg['pcont_layers'], units, 'binary',
                                  name='pcont'),
      actor=networks.ActionDecoder(cfg['act_dim'], cfg['actor_layers'], units,
                                   init_std=cfg['init_std']))
  mods['encoder'](tf.zeros([1, 64, 64, 3]))
  feat = tf.zeros([1, cfg['stoch'] + cfg['deter']])
  for name in ('decoder', 'reward', 'value', 'pcont', 'actor'):
    mods[name](feat)
  mods['rssm'].observe(tf.zeros([1, 1, 32 * depth]),
                       tf.zeros([1, 1, cfg['act_dim']]))
  loaded = set()
  for name, module in mods.items():
    for var in module.trainable_variables:
      layer, param = var.path.split('/')[-2:]
      key = f'w/{name}/{layer}/{param}'
      assert var.shape == data[key].shape, key
      var.assign(data[key])
      loaded.add(key)
  assert loaded == {k for k in data.files if k.startswith('w/')}
  return mods, data


def test_encoder_and_decoder(ref):
  mods, d = ref
  image = d['in/image'].astype(np.float32) / 255 - 0.5
  close(mods['encoder'](image), d['out/embed'])
  dist = mods['decoder'](d['in/feat'])
  close(dist.mean(), d['out/decoder_mean'])
  close(dist.log_prob(image), d['out/decoder_log_prob'])


def test_dense_heads(ref):
  mods, d = ref
  feat = d['in/feat']
  reward = mods['reward'](feat)
  close(reward.mean(), d['out/reward_mean'])
  close(reward.log_prob(d['in/reward_target']), d['out/reward_log_prob'])
  close(mods['value'](feat).mode(), d['out/value_mean'])
  pcont = mods['pcont'](feat)
  close(pcont.distribution.logits, d['out/pcont_logits'])
  close(pcont.mean(), d['out/pcont_mean'])
  close(pcont.log_prob(d['in/pcont_target']), d['out/pcont_log_prob'])


def test_actor(ref):
  mods, d = ref
  loc, scale = mods['actor'].loc_scale(d['in/feat'])
  close(loc, d['out/actor_pre_tanh_mean'])
  close(scale, d['out/actor_std'])
  dist = mods['actor'](d['in/feat'])
  close(dist.log_prob(d['in/actor_sample']), d['out/actor_log_prob'])


def test_rssm_single_steps(ref):
  mods, d = ref
  rssm = mods['rssm']
  state = dict(stoch=tf.constant(d['in/prev_stoch']),
               deter=tf.constant(d['in/prev_deter']))
  post, prior = rssm.obs_step(state, d['in/prev_action'], d['in/embed_step'])
  close(prior['deter'], d['out/img_deter'])
  close(prior['mean'], d['out/prior_mean'])
  close(prior['std'], d['out/prior_std'])
  close(post['mean'], d['out/post_mean'])
  close(post['std'], d['out/post_std'])
  kl = tfd.kl_divergence(rssm.get_dist(post), rssm.get_dist(prior))
  close(kl, d['out/kl'])


def test_rssm_observe_sequence(ref):
  mods, d = ref
  rssm = mods['rssm']
  post, prior = rssm.observe(
      d['in/seq_embed'], d['in/seq_action'],
      eps=(d['in/seq_eps_prior'], d['in/seq_eps_post']))
  for name, state in (('post', post), ('prior', prior)):
    for key in ('mean', 'std', 'stoch', 'deter'):
      close(state[key], d[f'out/seq_{name}_{key}'])
  close(rssm.get_feat(post), d['out/seq_feat'])
  kl = tfd.kl_divergence(rssm.get_dist(post), rssm.get_dist(prior))
  close(kl, d['out/seq_kl'])


def test_lambda_return(ref):
  _, d = ref
  returns = tools.lambda_return(
      tf.constant(d['in/lr_reward']), tf.constant(d['in/lr_value']),
      tf.constant(d['in/lr_pcont']), tf.constant(d['in/lr_bootstrap']),
      d['cfg/lambda_'].item(), axis=0)
  close(returns, d['out/lambda_return'])
