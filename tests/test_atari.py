"""Atari as the paper ran it and as the evaluation protocol of Machado et al.
(2018) asks (issue 21): whole games capped at 108,000 frames, sticky
actions, a lost life ending training episodes only, the paper's
discrete-control defaults and the linear epsilon schedule.

The ALE renders nothing through EGL, so most environments here run in this
process; the real ALE games are played with tiny caps. Only the last test
needs TensorFlow.
"""

import functools
import subprocess
import sys
import types

import numpy as np
import pytest

import dreamer
import wrappers
from dreamer_tf import baseline, replay
from runs import ROOT

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).

# The reference's defaults (danijar/dreamer, define_config), which the
# DeepMind Control tasks keep: the Atari work must not move any of them.
REFERENCE_DEFAULTS = dict(
    seed=0, steps=5000000, eval_every=10000, log_every=1000,
    log_scalars=True, log_images=True, gpu_growth=True, precision=16,
    task='dmc_walker_walk', envs=1, parallel='none', action_repeat=2,
    time_limit=1000, prefill=5000, eval_noise=0.0, clip_rewards='none',
    deter_size=200, stoch_size=30, num_units=400, dense_act='elu',
    cnn_act='relu', cnn_depth=32, pcont=False, free_nats=3.0, kl_scale=1.0,
    pcont_scale=10.0, weight_decay=0.0, weight_decay_pattern='.*',
    batch_size=50, batch_length=50, train_every=1000, train_steps=100,
    pretrain=100, model_lr=6e-4, value_lr=8e-5, actor_lr=8e-5,
    grad_clip=100.0, dataset_balance=False, discount=0.99, disclam=0.95,
    horizon=15, action_dist='tanh_normal', action_init_std=5.0,
    expl='additive_gaussian', expl_amount=0.3, expl_decay=0.0, expl_min=0.0)

# The paper's appendix (discrete control) and the protocol, as flags.
PAPER_ATARI = dict(
    action_dist='onehot', pcont=True, expl='epsilon_greedy',
    expl_schedule='linear', expl_amount=0.4, expl_min=0.1,
    expl_updates=200000, horizon=10, kl_scale=0.1, clip_rewards='tanh',
    action_repeat=4, time_limit=108000, atari_sticky=0.25,
    atari_life_done=True, atari_full_actions=False, atari_grayscale=False,
    atari_noops=30)


def atari_config(*flags):
  return dreamer.parse_args(['--logdir', 'x', '--task', 'atari_pong', *flags])


def one_hot(index, n):
  return np.eye(n, dtype=np.float32)[index]


# --- Defaults and flags. ---

def test_atari_defaults_are_the_papers_and_dmc_keeps_the_reference():
  config = atari_config()
  for key, value in PAPER_ATARI.items():
    assert getattr(config, key) == value, key
  defaults = vars(dreamer.define_config())
  for key, value in REFERENCE_DEFAULTS.items():
    assert defaults[key] == value and type(defaults[key]) is type(value), key
  dmc = dreamer.parse_args(['--logdir', 'x', '--task', 'dmc_cartpole_balance'])
  assert vars(dmc) == dict(defaults, logdir='x', task='dmc_cartpole_balance')
  assert dmc.expl_schedule == 'exponential'
  # Flags given win over the Atari defaults, and a preset's own values too.
  assert atari_config('--horizon', '15', '--time_limit', '4000').horizon == 15
  debug = atari_config('--preset', 'debug')
  assert (debug.time_limit, debug.prefill, debug.horizon) == (200, 500, 10)
  cpu = atari_config('--preset', 'cpu')
  assert (cpu.batch_size, cpu.time_limit, cpu.kl_scale) == (16, 108000, 0.1)


def test_default_atari_config_passes_the_checks_and_others_fail_in_a_line():
  dreamer.check_config(atari_config())
  dreamer.check_config(atari_config('--preset', 'debug'))
  bad = [
      (['--atari_sticky', '1.5'], '--atari_sticky'),
      (['--atari_noops', '-1'], '--atari_noops'),
      (['--expl_schedule', 'cosine'], '--expl_schedule'),
      (['--expl_updates', '0'], '--expl_updates'),
      # One capped game does not fit in a prefill of 5000 frames.
      (['--prefill', '5000'], '--prefill 5000'),
  ]
  for flags, message in bad:
    with pytest.raises(ValueError, match=message) as error:
      dreamer.check_config(atari_config(*flags))
    assert '\n' not in str(error.value)
  dmc = dreamer.parse_args(['--logdir', 'x', '--atari_full_actions', 'true'])
  with pytest.raises(ValueError, match='apply to Atari tasks only'):
    dreamer.check_config(dmc)


def test_help_shows_the_dmc_and_atari_defaults():
  result = subprocess.run(
      [sys.executable, 'dreamer.py', '--help'], cwd=ROOT, capture_output=True,
      text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  text = ' '.join(result.stdout.split())
  definitions = dreamer.define_flags()
  defaults = vars(definitions.defaults())
  for key, value in dreamer.ATARI_DEFAULTS.items():
    description = definitions.description(key)
    assert f'DMC: {defaults[key]}' in description, key
    assert f'Atari: {value}' in description, key
    assert f'--{key} {value}' in text, key  # The list at the end.
  assert 'Atari: 108000' in text and 'Machado et al. 2018' in text
  for key in PAPER_ATARI:
    assert f'--{key} ' in text, key


# --- The episode cap, in frames and in the stored file. ---

def test_a_capped_episode_has_exactly_the_cap_in_frames_and_on_disk(tmp_path):
  # Doing nothing in Pong: the game lasts far longer than 400 frames.
  env = wrappers.make_env('atari_pong', action_repeat=4, time_limit=400,
                          seed=3)
  env.reset()
  start = env._ale.getEpisodeFrameNumber()  # The no-op frames of the reset.
  assert 1 <= start <= 30
  assert env._ale.getInt('max_num_frames_per_episode') == 0  # Not the ALE's.
  steps, done = 0, False
  while not done:
    _, _, done, info = env.step(one_hot(0, env.action_space.n))
    steps += 1
  assert steps == 100 and info['time_limit']
  assert env._ale.getEpisodeFrameNumber() - start == 400
  episode = info['episode']
  assert len(episode['reward']) == 101  # The reset entry and 100 steps.
  np.testing.assert_array_equal(episode['discount'], 1.0)  # Truncation.
  path = replay.save_episode(tmp_path, episode)
  assert path.name.endswith('-101.npz')
  assert replay.count_steps(tmp_path, 4) == 400
  with np.load(path) as stored:
    assert len(stored['image']) == 101


def test_the_runs_environments_are_capped_at_the_flags_value(tmp_path):
  config = atari_config('--time_limit', '400')
  envs = wrappers.make_envs(config, train=True)
  try:
    envs.reset(0)
    noop = one_hot(0, envs.action_space.shape[0])
    steps, done = 0, False
    while not done:
      [(_, _, done, info)] = envs.step([noop])
      steps += 1
  finally:
    envs.close()
  assert steps == 100 and len(info['episode']['image']) == 101
  assert replay.save_episode(tmp_path, info['episode']).name.endswith(
      '-101.npz')
  # The default cap: 27,000 agent steps of 4 frames, entry 0 the reset.
  default = atari_config()
  env = wrappers.make_env(
      'atari_pong', action_repeat=default.action_repeat,
      time_limit=default.time_limit)
  assert env._duration == 27000
  assert replay.max_length(default.time_limit, default.action_repeat) == 27001


# --- Lost lives, sticky actions and the other options. ---

def test_a_lost_life_ends_training_episodes_only():
  make = functools.partial(wrappers.make_env, 'atari_breakout',
                           action_repeat=4, time_limit=100000, seed=0)
  # Same seed, same actions: the three play the same game.
  envs = dict(train=make(train=True), eval=make(train=False),
              off=make(train=True, life_done=False))
  for env in envs.values():
    env.reset()
  rng = np.random.default_rng(0)
  for _ in range(2000):
    action = wrappers.random_action(envs['train'].action_space, rng)
    results = {name: env.step(action) for name, env in envs.items()}
    if results['train'][2]:
      break
  else:
    pytest.fail('no life lost in 2000 random steps')
  _, _, _, info = results['train']
  assert info['lives'] == 4 and info['discount'] == 0
  assert info['episode']['discount'][-1] == 0
  assert info['episode']['discount'][:-1].min() == 1
  for name in ('eval', 'off'):
    _, _, done, other = results[name]
    assert other['lives'] == 4 and not done and other['discount'] == 1, name


def sticky_rate(sticky, trials=1500):
  """The share of frames on which the ALE applied the previous action
  instead of the new one, counted on Breakout's paddle: after 8 frames of
  one move (so that it is the applied action), one frame of the other; a
  copy of the emulator without sticky actions tells which of the two moves
  the frame's RAM comes from."""
  game = wrappers.Atari('breakout', sticky=sticky, seed=0)
  plain = wrappers.Atari('breakout', sticky=0.0, seed=1)
  game.reset(), plain.reset()
  ale, check = game._ale, plain._ale
  assert ale.getFloat('repeat_action_probability') == pytest.approx(sticky)
  right, left = game._env.unwrapped._action_set[2:4]
  repeated = applied = 0
  for trial in range(trials):
    old, new = (right, left) if trial % 2 else (left, right)
    for _ in range(8):
      ale.act(old)
    state = ale.cloneState()
    ale.act(new)
    ram = ale.getRAM().copy()
    check.restoreState(state)
    check.act(new)
    if_new = check.getRAM().copy()
    check.restoreState(state)
    check.act(old)
    if_old = check.getRAM().copy()
    if not np.array_equal(if_new, if_old):  # Else the frame cannot tell.
      repeated += np.array_equal(ram, if_old)
      applied += np.array_equal(ram, if_new)
      assert np.array_equal(ram, if_old) or np.array_equal(ram, if_new)
    if ale.game_over():
      ale.reset_game()
  game.close(), plain.close()
  assert repeated + applied > trials // 2
  return repeated / (repeated + applied)


def test_sticky_actions_repeat_the_previous_action_at_the_set_rate():
  assert sticky_rate(0.0) == 0.0
  assert sticky_rate(0.25) == pytest.approx(0.25, abs=0.04)


def test_action_set_grayscale_and_noops_follow_the_flags():
  minimal = wrappers.make_env('atari_pong', action_repeat=4)
  full = wrappers.make_env('atari_pong', action_repeat=4, full_actions=True)
  assert (minimal.action_space.n, full.action_space.n) == (6, 18)
  grey = wrappers.make_env('atari_pong', action_repeat=4, grayscale=True)
  image = grey.reset()['image']
  assert image.shape == (64, 64, 3) and image.std() > 0
  assert (image == image[..., :1]).all()
  none = wrappers.make_env('atari_pong', action_repeat=4, noops=0)
  none.reset()
  assert none._ale.getEpisodeFrameNumber() == 0
  config = atari_config('--atari_sticky', '0', '--atari_full_actions', 'true')
  assert (config.atari_sticky, config.atari_full_actions) == (0.0, True)


def test_random_and_noop_baselines_play_whole_pong_games():
  [(score, frames, capped)] = baseline.policy_episodes(
      'atari_pong', 'random', 1)
  assert -21 <= score <= 21 and not capped
  assert frames > 1000  # The old cap cut every game at 1000 frames.
  assert baseline.task_defaults('atari_pong') == (4, 108000)
  assert baseline.task_defaults('dmc_walker_walk') == (2, 1000)


# --- The exploration schedule. ---

def test_epsilon_falls_linearly_over_the_first_200000_updates():
  config = atari_config()
  for updates, epsilon in ((0, 0.4), (50000, 0.325), (100000, 0.25),
                           (200000, 0.1), (300000, 0.1), (10**7, 0.1)):
    # Environment steps do not matter: the schedule counts updates.
    for step in (0, 10**6):
      assert dreamer.expl_amount(config, step, updates) == pytest.approx(
          epsilon), (updates, step)
  # The DeepMind Control schedule (the reference's) is unchanged.
  dmc = dreamer.define_config()
  assert dreamer.expl_amount(dmc, 10**6, 10**6) == 0.3
  dmc.expl_decay, dmc.expl_min = 1000, 0.05
  assert dreamer.expl_amount(dmc, 1000, 0) == pytest.approx(0.15)


def test_collection_explores_by_the_agents_update_count():
  seen = []

  def policy(images, reset, state, training, amount):
    seen.append(amount)
    return np.zeros((len(images), 6), np.float32), state

  run = types.SimpleNamespace(
      config=atari_config(), step=10**6, policy=policy, train_if_due=None,
      agent=types.SimpleNamespace(updates=100000))
  run._collect = lambda policy, steps, desc, before_step: policy(
      np.zeros((1, 64, 64, 3), np.uint8), np.ones(1, bool), None)
  dreamer.Run.collect(run, 1000)
  assert seen == [pytest.approx(0.25)]


# --- The continuation targets (TensorFlow). ---

def test_continuation_targets_are_zero_at_episode_ends_else_the_discount():
  tf = pytest.importorskip('tensorflow')
  from dreamer_tf import agent as agent_lib
  from tiny import random_batch, tiny_config
  config = tiny_config(action_dist='onehot', pcont=True, discount=0.97,
                       expl='epsilon_greedy')
  agent = agent_lib.Dreamer(config, 3)
  batch = random_batch(batch=2, length=6, act_dim=3, onehot=True)
  # Row 0 ends its episode (a game over or, in training, a lost life); row
  # 1 is a window inside an episode.
  discount = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], np.float32)
  batch['discount'] = tf.constant(discount)
  targets = []
  head = agent.pcont

  class Recorded:
    def __init__(self, dist):
      self._dist = dist

    def log_prob(self, value):
      targets.append(np.asarray(value))
      return self._dist.log_prob(value)

    def mean(self):
      return self._dist.mean()

  agent.pcont = lambda feat: Recorded(head(feat))
  loss, _, metrics = agent.world_model_loss(agent.preprocess(batch))
  [target] = targets
  expected = np.array([[0.97] * 5 + [0.0], [0.97] * 6], np.float32)
  np.testing.assert_allclose(target, expected, rtol=1e-6)
  assert np.isfinite(float(loss)) and 'pcont_loss' in metrics
