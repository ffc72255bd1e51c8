"""Environment wrappers and worker processes.

Every real environment runs in a spawned worker through `wrappers.Envs`: this
pytest process may have imported TensorFlow, and rendering next to it
segfaults. The fake environments below render nothing and run in-process.
"""

import functools
import glob
import os
import signal
import subprocess
import sys
import time

import gymnasium
import numpy as np
import pytest

import wrappers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Episodes written by the reference code (cartpole_balance, 100 agent steps).
REFERENCE_EPISODE = sorted(glob.glob(
    os.path.join(REPO, 'tests', 'fixtures', 'episodes', '*.npz')))


def env_ctor(task, **kwargs):
  return functools.partial(wrappers.make_env, task, **kwargs)


class FakeEnv:
  """Counts physics steps and renders; rewards are 1, 2, 3, ...; terminates
  after `length` steps."""

  def __init__(self, low=(-1.0,), high=(1.0,), length=100):
    self.action_space = gymnasium.spaces.Box(
        np.array(low, np.float32), np.array(high, np.float32))
    self.observation_space = gymnasium.spaces.Dict({
        'image': gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    self.length = length
    self.steps = self.renders = 0
    self.actions = []

  def reset(self):
    self.steps = 0
    return {'image': self.render()}

  def step(self, action, render=True):
    self.steps += 1
    self.actions.append(np.array(action))
    obs = {'image': self.render()} if render else {}
    done = self.steps >= self.length
    info = {'discount': np.float32(0.0 if done else 1.0)}
    return obs, float(self.steps), done, info

  def render(self):
    self.renders += 1
    return np.full((64, 64, 3), self.steps % 256, np.uint8)


def test_import_does_not_load_tensorflow():
  code = "import wrappers, sys; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_check_task():
  for task in ['dmc_walker_walk', 'dmc_cup_catch', 'dmc_point_mass_easy',
               'dmc_quadruped_walk', 'atari_pong', 'atari_space_invaders']:
    wrappers.check_task(task)
  for task in ['walker_walk', 'dmc_walker_fly', 'dmc_cup', 'dmc_point_easy',
               'atari_notagame', 'gym_cartpole', 'dmc_', '']:
    with pytest.raises(ValueError, match='expected') as error:
      wrappers.check_task(task)
    assert '\n' not in str(error.value)
  # Checking imports dm_control with rendering off and leaves MUJOCO_GL alone.
  assert os.environ.get('MUJOCO_GL') in (None, 'egl')


def test_check_rendering(monkeypatch):
  monkeypatch.setenv('MUJOCO_GL', 'egl')
  wrappers.check_rendering()  # libEGL is installed on these machines.
  monkeypatch.setattr(wrappers.ctypes.util, 'find_library', lambda name: None)
  packages = 'libegl1 libegl-mesa0 libgl1-mesa-dri'
  with pytest.raises(RuntimeError, match=packages):
    wrappers.check_rendering()
  monkeypatch.setenv('MUJOCO_GL', 'osmesa')
  with pytest.raises(RuntimeError, match='libosmesa6'):
    wrappers.check_rendering()
  monkeypatch.setenv('MUJOCO_GL', 'vulkan')
  with pytest.raises(RuntimeError, match='not a rendering backend'):
    wrappers.check_rendering()


def test_dmc_observations_in_one_worker():
  ctors = [env_ctor('dmc_cartpole_balance'), env_ctor('dmc_walker_walk')]
  expected = [
      {'position': (3,), 'velocity': (2,)},
      {'orientations': (14,), 'height': (), 'velocity': (9,)}]
  with wrappers.Envs(ctors, parallel='none') as envs:
    assert len(envs) == 2 and len(set(envs.pids)) == 1
    assert envs.action_space.shape == (1,)
    assert set(envs.observation_space.spaces) == {
        'image', 'reward', 'position', 'velocity'}
    first = [envs.reset(0), envs.reset(1)]
    actions = [np.ones(1, np.float32), -np.ones(6, np.float32)]
    steps = envs.step(actions)
  for states, obs, (next_obs, reward, done, info) in zip(
      expected, first, steps):
    for observation in (obs, next_obs):
      assert set(observation) == set(states) | {'image', 'reward'}
      assert observation['image'].dtype == np.uint8
      assert observation['image'].shape == (64, 64, 3)
      assert observation['image'].std() > 0  # A rendered scene, not blank.
      assert observation['reward'].dtype == np.float32
      for key, shape in states.items():
        assert observation[key].dtype == np.float32
        assert observation[key].shape == shape
    assert obs['reward'] == 0 and next_obs['reward'] == np.float32(reward)
    assert not done
    assert info['discount'].dtype == np.float32 and info['discount'] == 1.0


def test_normalize_actions_maps_to_true_bounds():
  env = wrappers.NormalizeActions(
      FakeEnv(low=(0.0, -4.0, -np.inf), high=(10.0, 2.0, np.inf)))
  np.testing.assert_array_equal(env.action_space.low, [-1, -1, -np.inf])
  np.testing.assert_array_equal(env.action_space.high, [1, 1, np.inf])
  env.reset()
  for action in ([-1, -1, 5], [1, 1, -7], [0, 0, 0]):
    env.step(np.array(action, np.float32))
  np.testing.assert_allclose(
      env.env.actions, [[0, -4, 5], [10, 2, -7], [5, -1, 0]])


def test_action_repeat_sums_rewards_and_renders_once():
  fake = FakeEnv(length=5)
  env = wrappers.ActionRepeat(fake, 3)
  env.reset()
  renders = fake.renders
  obs, reward, done, _ = env.step(np.zeros(1))
  assert (reward, done, fake.steps) == (1 + 2 + 3, False, 3)
  assert fake.renders == renders + 1
  assert obs['image'][0, 0, 0] == 3  # The final frame of the repeat.
  obs, reward, done, info = env.step(np.zeros(1))  # Stops early when done.
  assert (reward, done, fake.steps) == (4 + 5, True, 5)
  assert fake.renders == renders + 2 and info['discount'] == 0


def test_time_limit_truncates_with_discount_one():
  env = wrappers.TimeLimit(FakeEnv(length=100), 4)
  for _ in range(2):
    env.reset()
    for step in range(1, 5):
      _, _, done, info = env.step(np.zeros(1))
      assert done == (step == 4) and info['discount'] == 1.0
    assert info['time_limit']
  with pytest.raises(RuntimeError, match='Reset'):
    env.step(np.zeros(1))


def test_one_hot_action_and_reward_obs():
  fake = FakeEnv()
  fake.action_space = gymnasium.spaces.Discrete(4)
  env = wrappers.RewardObs(wrappers.OneHotAction(fake))
  assert env.action_space.discrete and env.action_space.n == 4
  assert env.reset()['reward'] == 0
  for _ in range(5):
    action = env.random_action()
    assert sorted(action) == [0, 0, 0, 1] and action.dtype == np.float32
    obs, reward, _, _ = env.step(action)
    assert obs['reward'].dtype == np.float32 and obs['reward'] == reward
  assert fake.actions[-1] == np.argmax(action)
  with pytest.raises(ValueError, match='one-hot'):
    env.step(np.array([0.5, 0.5, 0, 0]))
  with pytest.raises(ValueError, match='one-hot'):
    env.step(np.array([1, 0, 0]))


def test_random_action():
  rng = np.random.default_rng(0)
  box = gymnasium.spaces.Box(-1, 1, (3,), np.float32)
  actions = np.array([wrappers.random_action(box, rng) for _ in range(500)])
  assert actions.dtype == np.float32 and actions.shape == (500, 3)
  assert actions.min() < -0.95 and actions.max() > 0.95
  action = wrappers.random_action(wrappers.OneHotBox(6), rng)
  assert action.shape == (6,) and action.sum() == 1 and action.max() == 1


def test_collect_episode_matches_reference_layout():
  assert REFERENCE_EPISODE, 'the fixture episodes are missing'
  reference = np.load(REFERENCE_EPISODE[0])
  rng = np.random.default_rng(0)
  ctor = env_ctor('dmc_cartpole_balance', action_repeat=2, time_limit=20)
  with wrappers.Envs([ctor], parallel='process') as envs:
    images = [envs.reset(0)['image']]
    actions, rewards, done = [], [], False
    while not done:
      actions.append(wrappers.random_action(envs.action_space, rng))
      [(obs, reward, done, info)] = envs.step([actions[-1]])
      images.append(obs['image'])
      rewards.append(reward)
  assert len(actions) == 10 and info['discount'] == 1.0 and info['time_limit']
  episode = info['episode']
  assert set(episode) == set(reference.files)
  for key in reference.files:
    assert episode[key].dtype == reference[key].dtype, key
    assert episode[key].shape[1:] == reference[key].shape[1:], key
    assert len(episode[key]) == 11, key
  np.testing.assert_array_equal(episode['image'], images)
  np.testing.assert_array_equal(episode['action'][0], [0])
  np.testing.assert_array_equal(episode['action'][1:], actions)
  np.testing.assert_allclose(episode['reward'], [0] + rewards, rtol=1e-6)
  np.testing.assert_array_equal(episode['discount'], np.ones(11))
  assert 0 <= episode['reward'].min() and episode['reward'].max() <= 2


def test_atari_pong_frames_and_one_hot_actions():
  with wrappers.Envs([env_ctor('atari_pong', seed=1)]) as envs:
    space = envs.action_space
    assert space.discrete and space.n == 6 and space.shape == (6,)
    assert set(envs.observation_space.spaces) == {'image', 'reward'}
    obs = envs.reset(0)
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    for _ in range(3):
      [(obs, _, done, info)] = envs.step([wrappers.random_action(space)])
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    assert obs['image'].std() > 0 and not done and info['discount'] == 1
    # An invalid action is re-raised here with the worker's traceback ...
    with pytest.raises(ValueError, match='one-hot') as error:
      envs.step([np.full(6, 1 / 6)])
    assert 'Traceback' in str(error.value) and 'wrappers.py' in str(error.value)
    # ... and the worker keeps serving.
    [(obs, _, _, _)] = envs.step([wrappers.random_action(space)])
    assert obs['image'].shape == (64, 64, 3)


def test_atari_life_loss_ends_training_episodes_only():
  ctors = [env_ctor('atari_breakout', train=True, action_repeat=4,
                    time_limit=100000),
           env_ctor('atari_breakout', train=False, action_repeat=4,
                    time_limit=100000)]
  rng = np.random.default_rng(0)
  with wrappers.Envs(ctors, parallel='process') as envs:
    assert len(set(envs.pids)) == 2
    envs.reset(0), envs.reset(1)
    train_done = eval_lost = None
    for _ in range(2000):
      actions = [wrappers.random_action(envs.action_space, rng)] * 2
      (_, _, done0, info0), (_, _, done1, info1) = envs.step(actions)
      if train_done is None and done0:
        train_done = info0
      if eval_lost is None and info1['lives'] < 5:
        eval_lost = (done1, info1)
      if train_done and eval_lost:
        break
      if done0:
        envs.reset(0)
  assert train_done and eval_lost, 'no life lost in 2000 random steps'
  assert train_done['discount'] == 0 and train_done['lives'] == 4
  assert train_done['episode']['discount'][-1] == 0
  assert train_done['episode']['discount'][:-1].min() == 1
  assert eval_lost[0] is False and eval_lost[1]['discount'] == 1


@pytest.mark.parametrize('parallel', ['process', 'none'])
def test_worker_error_is_reraised_with_traceback(parallel):
  ctors = [env_ctor('dmc_cartpole_balance'), env_ctor('dmc_walker_fly')]
  with pytest.raises(ValueError, match='dmc_walker_fly') as error:
    wrappers.Envs(ctors, parallel=parallel)
  assert 'Traceback' in str(error.value) and 'make_env' in str(error.value)


def test_unpicklable_constructor_is_a_clear_error():
  with pytest.raises(TypeError, match='picklable'):
    wrappers.Envs([lambda: FakeEnv()])


def test_killed_worker_raises_instead_of_hanging():
  envs = wrappers.Envs([env_ctor('dmc_cartpole_balance')] * 2)
  envs.reset(0)
  pids = envs.pids
  os.kill(pids[1], signal.SIGKILL)
  start = time.time()
  with pytest.raises(RuntimeError, match='exit code -9'):
    envs.step([np.zeros(1)] * 2)
  assert time.time() - start < 10
  envs.close()
  for pid in pids:  # Joined: no worker is left behind.
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_script_main_is_not_rerun_and_workers_stop_at_exit(tmp_path):
  # A spawned child normally re-runs the parent's script, which for
  # dreamer.py would import TensorFlow into the worker.
  script = tmp_path / 'script.py'
  script.write_text(
      'import functools, wrappers\n'
      "print('top level ran', flush=True)\n"
      "if __name__ == '__main__':\n"
      "  ctor = functools.partial(wrappers.make_env, 'atari_pong')\n"
      '  envs = wrappers.Envs([ctor] * 2)\n'
      '  envs.reset(0)\n'
      '  print(*envs.pids, flush=True)\n')  # Exits without close().
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, str(script)], env=env, check=True,
                       capture_output=True, text=True, timeout=60).stdout
  lines = out.splitlines()
  assert lines.count('top level ran') == 1, out
  pids = [int(pid) for pid in lines[-1].split()]
  assert len(pids) == 2
  time.sleep(0.2)
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_dmc_refuses_to_render_next_to_tensorflow():
  code = ('import sys, types\n'
          "sys.modules['tensorflow'] = types.ModuleType('tensorflow')\n"
          'import wrappers\n'
          "wrappers.DeepMindControl('walker_walk')\n")
  env = dict(os.environ, MUJOCO_GL='egl')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert 'run it through wrappers.Envs' in result.stderr


def test_envs_rejects_unknown_parallel_mode():
  with pytest.raises(ValueError, match='parallel'):
    wrappers.Envs([env_ctor('atari_pong')], parallel='thread')


def test_a_stopped_worker_is_a_timeout_naming_it():
  ctor = env_ctor('dmc_cartpole_balance', action_repeat=2, time_limit=20)
  with wrappers.Envs([ctor], parallel='none', timeout=2) as envs:
    envs.reset(0)
    pid = envs.pids[0]
    os.kill(pid, signal.SIGSTOP)
    try:
      start = time.time()
      with pytest.raises(TimeoutError) as error:
        envs.step([np.zeros(1, np.float32)])
      assert 2 <= time.time() - start < 10
    finally:
      os.kill(pid, signal.SIGCONT)
  message = str(error.value)
  assert f'pid {pid}' in message and 'within 2 s while stepping' in message
