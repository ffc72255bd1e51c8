"""Environments for Dreamer: DeepMind Control, Atari, the wrappers around them,
and the worker processes that run them.

This module never imports TensorFlow, directly or indirectly: MuJoCo's EGL
rendering and TensorFlow segfault in one process (docs/design.md section 2).
Build environments with `make_env` (a run's with `make_envs`) and run
them through `Envs`, which starts
every environment in a `spawn`ed worker process, also with `parallel='none'`.

All environments use the old gym-style API: `reset() -> obs` and
`step(action) -> (obs, reward, done, info)`, where obs is a dict holding a
uint8 `image` (and for DMC the float32 state vectors), and `info['discount']`
is a float32: 0 at a true terminal state, 1 otherwise (time limits included).
"""

import atexit
import builtins
import contextlib
import ctypes.util
import functools
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
import types
import weakref

import gymnasium
import numpy as np

from dreamer_tf import replay  # The episode format and step arithmetic.

# `cup` is the reference's short name for `ball_in_cup` (docs/design.md
# section 6).
_DMC_ALIASES = {'cup': 'ball_in_cup'}
_TASK_FORMS = ("expected 'dmc_<domain>_<task>' (e.g. dmc_walker_walk, "
               "dmc_cup_catch) or 'atari_<game>' (e.g. atari_pong)")


# ---------------------------------------------------------------------------
# Task names.

def _split_task(task):
  suite, _, name = str(task).partition('_')
  if suite not in ('dmc', 'atari') or not name:
    raise ValueError(f'Unknown task {task!r}: {_TASK_FORMS}.')
  return suite, name


def _dmc_suite(render):
  """Imports dm_control.suite. dm_control picks its renderer once, at import,
  from MUJOCO_GL; for render=False a first import disables rendering in this
  process (EGL initialises at import and must not meet TensorFlow)."""
  if 'dm_control._render' not in sys.modules:
    if render:
      os.environ.setdefault('MUJOCO_GL', 'egl')
    else:
      saved = os.environ.get('MUJOCO_GL')
      os.environ['MUJOCO_GL'] = 'disable'
      try:
        from dm_control import suite  # noqa: F401
      finally:
        if saved is None:
          del os.environ['MUJOCO_GL']
        else:
          os.environ['MUJOCO_GL'] = saved
  from dm_control import suite
  return suite


def _resolve_dmc(suite, name):
  """Splits e.g. `point_mass_easy` into (`point_mass`, `easy`) using the
  suite's own task list (the reference split at the first underscore)."""
  for domain, task in suite.ALL_TASKS:
    for alias in [domain] + [a for a, d in _DMC_ALIASES.items() if d == domain]:
      if name == f'{alias}_{task}':
        return domain, task
  raise ValueError(
      f"Unknown DeepMind Control task 'dmc_{name}': {_TASK_FORMS}, with "
      "(domain, task) in dm_control.suite.ALL_TASKS.")


def _atari_id(game):
  import ale_py
  gymnasium.register_envs(ale_py)
  env_id = 'ALE/{}-v5'.format(''.join(w.title() for w in game.split('_')))
  if env_id not in gymnasium.registry:
    raise ValueError(f"Unknown Atari game 'atari_{game}' (no {env_id} in "
                     f"gymnasium's registry): {_TASK_FORMS}.")
  return env_id


def check_task(task):
  """Raises ValueError with a one-line message unless `task` names a known
  environment. Renders nothing and builds no environment."""
  suite, name = _split_task(task)
  if suite == 'dmc':
    _resolve_dmc(_dmc_suite(render=False), name)
  else:
    _atari_id(name)


def check_rendering():
  """Raises RuntimeError, naming the Debian packages to install, when the
  library of the MUJOCO_GL backend (egl by default) cannot be found."""
  backend = os.environ.get('MUJOCO_GL', 'egl')
  needs = dict(egl=('EGL', 'libegl1 libegl-mesa0 libgl1-mesa-dri'),
               osmesa=('OSMesa', 'libosmesa6'),
               glfw=('glfw', 'libglfw3 and a display'))
  if backend not in needs:
    raise RuntimeError(
        f'MUJOCO_GL={backend} is not a rendering backend: use egl (default), '
        'osmesa or glfw.')
  library, packages = needs[backend]
  if not ctypes.util.find_library(library):
    raise RuntimeError(
        f'MUJOCO_GL={backend} but lib{library} was not found: install the '
        f'Debian packages {packages}, or use MUJOCO_GL=egl.')


# ---------------------------------------------------------------------------
# Environments.

class DeepMindControl:
  """A dm_control suite task with image and float32 state observations.

  `step(action, render=False)` skips the 20 ms render (physics is 0.08 ms);
  the returned obs then has no `image`, and `render()` gives it later.
  """

  def __init__(self, name, size=(64, 64), camera=None, seed=None):
    if os.environ.get('MUJOCO_GL', 'egl') == 'egl' and (
        'tensorflow' in sys.modules):
      raise RuntimeError(
          'DeepMindControl cannot render with EGL in a process that imported '
          'TensorFlow (it segfaults); run it through wrappers.Envs.')
    suite = _dmc_suite(render=True)
    domain, task = _resolve_dmc(suite, name)
    self._env = suite.load(domain, task, task_kwargs={'random': seed})
    self._size = tuple(size)
    if camera is None:
      camera = 2 if domain == 'quadruped' else 0
    self._camera = camera
    spec = self._env.action_spec()
    self.action_space = gymnasium.spaces.Box(
        np.broadcast_to(spec.minimum, spec.shape).astype(np.float32),
        np.broadcast_to(spec.maximum, spec.shape).astype(np.float32),
        dtype=np.float32)
    spaces = {k: gymnasium.spaces.Box(-np.inf, np.inf, v.shape, np.float32)
              for k, v in self._env.observation_spec().items()}
    spaces['image'] = gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8)
    self.observation_space = gymnasium.spaces.Dict(spaces)

  def reset(self):
    return self._obs(self._env.reset(), render=True)

  def step(self, action, render=True):
    time_step = self._env.step(action)
    obs = self._obs(time_step, render)
    info = {'discount': np.float32(time_step.discount)}
    return obs, float(time_step.reward or 0.0), time_step.last(), info

  def render(self):
    return self._env.physics.render(*self._size, camera_id=self._camera)

  def close(self):
    pass

  def _obs(self, time_step, render):
    obs = {k: np.array(v, np.float32) for k, v in time_step.observation.items()}
    if render:
      obs['image'] = self.render()
    return obs


class Atari:
  """An ALE game through gymnasium (`ALE/<Game>-v5`, takes integer actions),
  with the evaluation protocol of Machado et al. (2018) as options; the
  defaults are the protocol's and the paper's Atari runs' (dreamer.py's
  --atari_* flags and --action_repeat):

    action_repeat (4): frames per agent step; the rewards are summed and
      the last two frames max-pooled.
    sticky (0.25): sticky actions, the probability that the ALE repeats the
      previous frame's action instead of the given one, drawn every frame
      (the ALE's repeat_action_probability); 0: off.
    full_actions (False): all 18 actions, not the game's minimal set.
    life_done (False): a lost life ends the episode with discount 0;
      `make_env` sets it for training episodes only, so that evaluation
      episodes play whole games.
    grayscale (False): grey frames in three equal channels (the networks
      and the episode format stay as they are) instead of colour, which the
      paper used.
    noops (30): 1 to `noops` random no-op frames after each reset (0: none).
    size ((64, 64)): bilinear resize.

  The ALE's own frame limit is off: `TimeLimit` (in `make_env`) caps the
  episodes, counting the frames the agent acts in (not the no-ops), so that
  a capped episode has exactly the cap's frames. As in the reference, the
  next reset starts a new game (also after a lost life)."""

  def __init__(self, name, action_repeat=4, size=(64, 64), grayscale=False,
               noops=30, life_done=False, sticky=0.25, full_actions=False,
               seed=None):
    import ale_py
    gymnasium.register_envs(ale_py)
    if not 0 <= sticky <= 1:
      raise ValueError(f'sticky must be a probability, not {sticky}.')
    self._env = gymnasium.make(
        _atari_id(name), frameskip=1, full_action_space=bool(full_actions),
        repeat_action_probability=float(sticky),
        max_num_frames_per_episode=None, disable_env_checker=True)
    self._ale = self._env.unwrapped.ale
    self._repeat = action_repeat
    self._size = tuple(size)
    self._grayscale = grayscale
    self._noops = noops
    self._life_done = life_done
    self._seed = seed
    self._random = np.random.default_rng(seed)
    self._lives = None
    self.action_space = self._env.action_space
    self.observation_space = gymnasium.spaces.Dict({
        'image': gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8)})

  def reset(self):
    frame = self._new_game()
    for _ in range(self._random.integers(1, self._noops + 1)
                   if self._noops > 0 else 0):
      frame, _, terminated, truncated, _ = self._env.step(0)  # 0 is NOOP.
      if terminated or truncated:
        frame = self._new_game()
    self._lives = self._ale.lives()
    return self._obs([frame])

  def step(self, action):
    total, frames, done, discount = 0.0, [], False, 1.0
    for _ in range(self._repeat):
      frame, reward, terminated, truncated, _ = self._env.step(action)
      total += reward
      frames = frames[-1:] + [frame]
      lives, lost = self._ale.lives(), self._ale.lives() < self._lives
      self._lives = lives
      if terminated or (self._life_done and lost):
        done, discount = True, 0.0
      elif truncated:  # ALE's frame limit: truncation, not termination.
        done = True
      if done:
        break
    info = {'discount': np.float32(discount), 'lives': self._lives}
    return self._obs(frames), total, done, info

  def close(self):
    self._env.close()

  def _new_game(self):
    frame, _ = self._env.reset(seed=self._seed)
    self._seed = None  # Seed once; later games continue the RNG.
    return frame

  def _obs(self, frames):
    from PIL import Image
    image = Image.fromarray(np.maximum(frames[0], frames[-1]))
    if self._grayscale:
      image = image.convert('L')
    image = image.resize(self._size[::-1], Image.BILINEAR)
    image = np.asarray(image, np.uint8)
    if self._grayscale:
      image = np.repeat(image[..., None], 3, -1)
    return {'image': image}


# ---------------------------------------------------------------------------
# Wrappers.

class Wrapper:
  """Base wrapper: attributes it does not define come from the inner env."""

  def __init__(self, env):
    self.env = env

  def __getattr__(self, name):
    if name.startswith('__') or name == 'env':
      raise AttributeError(name)
    return getattr(self.env, name)


class ActionRepeat(Wrapper):
  """Repeats each action `amount` times summing rewards, stops early when
  done, and renders once per agent step (the final frame)."""

  def __init__(self, env, amount):
    super().__init__(env)
    self._amount = amount

  def step(self, action):
    total = 0.0
    for _ in range(self._amount):
      obs, reward, done, info = self.env.step(action, render=False)
      total += reward
      if done:
        break
    obs = dict(obs, image=self.env.render())
    return obs, total, done, info


class NormalizeActions(Wrapper):
  """The agent acts in [-1, 1] on every dimension with finite bounds; the
  action is mapped linearly to the inner env's bounds."""

  def __init__(self, env):
    super().__init__(env)
    low, high = env.action_space.low, env.action_space.high
    self._mask = np.isfinite(low) & np.isfinite(high)
    self._low = np.where(self._mask, low, -1.0)
    self._high = np.where(self._mask, high, 1.0)
    self.action_space = gymnasium.spaces.Box(
        np.where(self._mask, -1.0, low).astype(np.float32),
        np.where(self._mask, 1.0, high).astype(np.float32), dtype=np.float32)

  def step(self, action):
    action = np.asarray(action)
    original = (action + 1) / 2 * (self._high - self._low) + self._low
    return self.env.step(np.where(self._mask, original, action))


class TimeLimit(Wrapper):
  """Ends the episode after `duration` steps. That is truncation: the
  discount stays 1 (unless the inner env terminated at the same step), and
  `info['time_limit']` is True."""

  def __init__(self, env, duration):
    super().__init__(env)
    self._duration = duration
    self._step = None

  def reset(self):
    self._step = 0
    return self.env.reset()

  def step(self, action):
    if self._step is None:
      raise RuntimeError('Reset the environment before stepping it.')
    obs, reward, done, info = self.env.step(action)
    self._step += 1
    if self._step >= self._duration:
      done = True
      info = dict(info, time_limit=True)
      info.setdefault('discount', np.float32(1.0))
    if done:
      self._step = None
    return obs, reward, done, info


class OneHotBox(gymnasium.spaces.Box):
  """Box(0, 1, (n,)) whose `sample()` is a random one-hot vector; marks a
  discrete action space (`discrete = True`, `n`)."""

  discrete = True

  def __init__(self, n):
    super().__init__(0.0, 1.0, (n,), np.float32)
    self.n = n

  def sample(self, mask=None, probability=None):
    action = np.zeros(self.n, np.float32)
    action[self.np_random.integers(self.n)] = 1.0
    return action


class OneHotAction(Wrapper):
  """Turns an integer action space into one-hot vectors (`OneHotBox`)."""

  def __init__(self, env):
    super().__init__(env)
    self.action_space = OneHotBox(int(env.action_space.n))

  def step(self, action):
    n = self.action_space.n
    action = np.asarray(action, np.float32)
    index = int(np.argmax(action)) if action.shape == (n,) else 0
    reference = np.zeros(n, np.float32)
    reference[index] = 1.0
    # The tolerance admits straight-through samples rounded in low precision.
    if action.shape != (n,) or not np.allclose(action, reference, atol=1e-3):
      raise ValueError(
          f'OneHotAction expects a one-hot vector of size {n}, got {action}.')
    return self.env.step(index)

  def random_action(self):
    return self.action_space.sample()


class RewardObs(Wrapper):
  """Adds the last reward to the observation as float32 `obs['reward']`."""

  def __init__(self, env):
    super().__init__(env)
    spaces = dict(env.observation_space.spaces)
    spaces['reward'] = gymnasium.spaces.Box(-np.inf, np.inf, (), np.float32)
    self.observation_space = gymnasium.spaces.Dict(spaces)

  def reset(self):
    return dict(self.env.reset(), reward=np.float32(0.0))

  def step(self, action):
    obs, reward, done, info = self.env.step(action)
    return dict(obs, reward=np.float32(reward)), reward, done, info


class Collect(Wrapper):
  """Records the episode. When it ends, `info['episode']` holds stacked
  arrays of length L = agent steps + 1 (the reference's episode format):
  observation keys, float32 `action` [L, A], `reward` [L], `discount` [L].
  Entry 0 is the reset observation with zero action, zero reward and
  discount 1; `action[t]` is the action that led to observation t."""

  def __init__(self, env):
    super().__init__(env)
    self._episode = None

  def reset(self):
    obs = self.env.reset()
    zero = np.zeros(self.env.action_space.shape, np.float32)
    self._episode = [self._entry(obs, zero, 0.0, 1.0)]
    return obs

  def step(self, action):
    obs, reward, done, info = self.env.step(action)
    discount = info.get('discount', 1.0 - float(done))
    self._episode.append(self._entry(obs, action, reward, discount))
    if done:
      episode = {k: np.stack([entry[k] for entry in self._episode])
                 for k in self._episode[0]}
      info = dict(info, episode=episode)
      self._episode = None
    return obs, reward, done, info

  @staticmethod
  def _entry(obs, action, reward, discount):
    entry = {}
    for key, value in obs.items():
      value = np.asarray(value)
      floating = np.issubdtype(value.dtype, np.floating)
      entry[key] = np.array(value, np.float32 if floating else value.dtype)
    entry['action'] = np.array(action, np.float32)
    entry['reward'] = np.float32(reward)
    entry['discount'] = np.float32(discount)
    return entry


# The episode cap of the Atari evaluation protocol (Machado et al. 2018):
# 108,000 frames, 30 minutes of play, 27,000 agent steps at action repeat 4.
ATARI_CAP = 108_000


def describe_cap(task, time_limit, action_repeat):
  """The start-up line about the episode cap in effect; for Atari, whether
  it lets games play to their end or truncates them."""
  line = (f'Episode cap: {time_limit} frames ('
          f'{replay.agent_steps(time_limit, action_repeat)} agent steps at '
          f'action repeat {action_repeat})')
  if not task.startswith('atari_'):
    return line + '.'
  if time_limit >= ATARI_CAP:
    return line + ", the protocol's: Atari games play to their end."
  return line + (f': --time_limit {time_limit} truncates Atari games (the '
                 f'protocol caps them at {ATARI_CAP} frames); returns are of '
                 'cut games.')


def make_env(task, *, action_repeat=2, time_limit=1000, size=(64, 64), seed=0,
             train=True, sticky=0.25, full_actions=False, life_done=True,
             grayscale=False, noops=30):
  """Builds the environment for `task` (see `check_task` for the names).
  `time_limit` counts environment frames. Seeds the dm_control task or the
  ALE (and its no-ops). The Atari options are those of `Atari`, and
  `life_done` makes a lost life end training episodes (`train`) only;
  DeepMind Control ignores them."""
  suite, name = _split_task(task)
  if suite == 'dmc':
    env = DeepMindControl(name, size, seed=seed)
    env = ActionRepeat(env, action_repeat)
    env = NormalizeActions(env)
  else:
    env = Atari(name, action_repeat, size, grayscale=grayscale, noops=noops,
                life_done=life_done and train, sticky=sticky,
                full_actions=full_actions, seed=seed)
    env = OneHotAction(env)
  env = TimeLimit(env, replay.agent_steps(time_limit, action_repeat))
  env = Collect(env)
  return RewardObs(env)


def make_envs(config, train):
  """The run's training environments (`config.envs`, each in a worker of its
  own with --parallel process) or its one evaluation environment, as
  `Envs`; seeds differ per environment and between training and
  evaluation."""
  count = config.envs if train else 1
  ctors = [functools.partial(
      make_env, config.task, action_repeat=config.action_repeat,
      time_limit=config.time_limit, seed=config.seed + index + (
          0 if train else 10_000), train=train, sticky=config.atari_sticky,
      full_actions=config.atari_full_actions,
      life_done=config.atari_life_done, grayscale=config.atari_grayscale,
      noops=config.atari_noops) for index in range(count)]
  return Envs(ctors, config.parallel if train else 'none',
              timeout=config.env_timeout)


def random_action(space, rng=None):
  """A uniformly random action: a random one-hot vector for a discrete
  (one-hot) space, else uniform within the bounds ([-1, 1] where a bound is
  infinite)."""
  rng = np.random.default_rng() if rng is None else rng
  if getattr(space, 'discrete', False):
    action = np.zeros(space.shape, np.float32)
    action[rng.integers(space.shape[0])] = 1.0
    return action
  low = np.where(np.isfinite(space.low), space.low, -1.0)
  high = np.where(np.isfinite(space.high), space.high, 1.0)
  return rng.uniform(low, high).astype(np.float32)


# ---------------------------------------------------------------------------
# Worker processes.

def _worker(conn, ctors):
  """Builds the environments, then serves ('step', actions), ('reset', i)
  and ('close', None) until closed or the parent goes away."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent decides.
  os.environ.setdefault('MUJOCO_GL', 'egl')
  envs = []
  try:
    try:
      envs.extend(ctor() for ctor in ctors)
      conn.send(('ok', [(e.observation_space, e.action_space) for e in envs]))
    except Exception as e:
      conn.send(('error', _describe(e)))
      return
    while True:
      try:
        command, arg = conn.recv()
      except (EOFError, OSError):
        return
      if command == 'close':
        return
      try:
        if command == 'step':
          result = [env.step(a) for env, a in zip(envs, arg)]
        elif command == 'reset':
          result = envs[arg].reset()
        else:
          raise KeyError(f'Unknown worker command {command!r}')
        conn.send(('ok', result))
      except Exception as e:
        conn.send(('error', _describe(e)))
  finally:
    for env in envs:
      with contextlib.suppress(Exception):
        env.close()
    conn.close()


def _describe(error):
  name = type(error).__name__ if type(error).__module__ == 'builtins' else None
  text = ''.join(traceback.format_exception(error))
  return name, f'{type(error).__name__}: {error}', text


def _rebuild(payload, where):
  """The worker's exception as the same builtin type (else RuntimeError),
  with the worker's traceback in the message."""
  name, summary, text = payload
  message = f'{summary}\n\nTraceback in {where}:\n{text}'
  cls = getattr(builtins, name or '', None)
  if isinstance(cls, type) and issubclass(cls, Exception):
    with contextlib.suppress(Exception):
      return cls(message)
  return RuntimeError(message)


@contextlib.contextmanager
def _empty_main_module():
  """A spawned child re-runs the parent's __main__ script (which may import
  TensorFlow) unless __main__ looks empty while the child starts."""
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = main


_LIVE = weakref.WeakSet()

# What a worker is doing while it answers a command, for timeout messages.
_DOING = dict(step='stepping', reset='resetting')


@atexit.register
def _close_all():
  for envs in list(_LIVE):
    envs.close()


class Envs:
  """Environments in spawned worker processes, stepped together.

  `ctors` are picklable constructors, e.g.
  `functools.partial(make_env, 'dmc_walker_walk', seed=i)`, importable
  without `__main__`. `parallel='process'` gives each env its own worker
  and steps them concurrently; `'none'` steps all of them in one worker.
  Errors in a worker are re-raised here with its traceback; a worker that
  dies raises RuntimeError with its exit code, and one that does not answer
  within `timeout` seconds (hung, or stopped) raises TimeoutError naming its
  pid and what it was doing. Workers stop on `close()`, on leaving a `with`
  block, and at interpreter exit.
  """

  def __init__(self, ctors, parallel='process', timeout=None):
    ctors = list(ctors)
    if parallel == 'process':
      groups = [[ctor] for ctor in ctors]
    elif parallel == 'none':
      groups = [ctors]
    else:
      raise ValueError(
          f"parallel must be 'process' or 'none', not {parallel!r}")
    if not ctors:
      raise ValueError('Envs needs at least one constructor.')
    self._sizes = [len(group) for group in groups]
    self._where = [(w, j) for w, size in enumerate(self._sizes)
                   for j in range(size)]
    self._conns, self._procs, self._closed = [], [], False
    self._timeout = timeout
    self._doing = ['starting'] * len(groups)
    _LIVE.add(self)
    try:
      self._start(groups)
      replies = [self._receive(w) for w in range(len(groups))]
    except BaseException:
      self.close()
      raise
    self._spaces = [spaces for reply in replies for spaces in reply]

  def _start(self, groups):
    context = multiprocessing.get_context('spawn')
    with _empty_main_module():
      for group in groups:
        parent, child = context.Pipe()
        proc = context.Process(target=_worker, args=(child, group),
                               daemon=True, name='env-worker')
        self._conns.append(parent)
        self._procs.append(proc)
        try:
          proc.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
          raise TypeError(
              'Environment constructors must be picklable and importable '
              'without __main__, e.g. functools.partial(wrappers.make_env, '
              f'task): {e}') from e
        finally:
          child.close()

  def __len__(self):
    return len(self._where)

  @property
  def observation_space(self):
    return self._spaces[0][0]

  @property
  def action_space(self):
    return self._spaces[0][1]

  @property
  def pids(self):
    """Process ids of the workers (one per env, or one for all)."""
    return [proc.pid for proc in self._procs]

  def reset(self, index):
    worker, local = self._where[index]
    self._send(worker, ('reset', local))
    return self._receive(worker)

  def step(self, actions):
    """Steps every env with its action; returns a list of (obs, reward,
    done, info). All workers are sent their actions before any reply is
    awaited, so they step concurrently."""
    actions = list(actions)
    if len(actions) != len(self):
      raise ValueError(f'Expected {len(self)} actions, got {len(actions)}.')
    start = np.cumsum([0] + self._sizes)
    for w in range(len(self._sizes)):
      self._send(w, ('step', actions[start[w]:start[w + 1]]))
    results, error = [], None
    for w in range(len(self._sizes)):
      try:
        results.extend(self._receive(w))
      except Exception as e:  # Receive from every worker to stay in sync.
        error = error or e
    if error:
      raise error
    return results

  def close(self):
    if self._closed:
      return
    self._closed = True
    for conn in self._conns:
      with contextlib.suppress(Exception):
        conn.send(('close', None))
    for proc in self._procs:
      if proc.pid is None:
        continue  # Never started.
      proc.join(timeout=5)
      if proc.is_alive():
        proc.terminate()
        proc.join(timeout=2)
      if proc.is_alive():
        proc.kill()
        proc.join()
    for conn in self._conns:
      conn.close()
    _LIVE.discard(self)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _send(self, worker, message):
    if self._closed:
      raise RuntimeError('Envs is closed.')
    self._doing[worker] = _DOING.get(message[0], message[0])
    try:
      self._conns[worker].send(message)
    except (BrokenPipeError, ConnectionError, EOFError, OSError):
      raise self._died(worker) from None

  def _receive(self, worker):
    conn, proc = self._conns[worker], self._procs[worker]
    start = time.monotonic()
    while not conn.poll(0.1):
      if not proc.is_alive():
        raise self._died(worker)
      if self._timeout and time.monotonic() - start > self._timeout:
        raise TimeoutError(
            f'Environment worker {worker} (pid {proc.pid}) did not answer '
            f'within {self._timeout:g} s while {self._doing[worker]}: it '
            'hangs or was stopped (raise --env_timeout for slow '
            'environments).')
    try:
      status, payload = conn.recv()
    except (EOFError, ConnectionError, OSError):
      raise self._died(worker) from None
    if status == 'error':
      raise _rebuild(payload, f'environment worker {worker} (pid {proc.pid})')
    return payload

  def _died(self, worker):
    proc = self._procs[worker]
    proc.join(timeout=1)
    code = proc.exitcode
    detail = ''
    if code is not None and code < 0:
      detail = f' ({signal.Signals(-code).name})'
      if -code == signal.SIGSEGV:
        detail += ('; rendering segfaults in a process that imported '
                   'TensorFlow: environment constructors must not import it '
                   '(docs/design.md section 2)')
    return RuntimeError(
        f'Environment worker {worker} (pid {proc.pid}) died with exit code '
        f'{code}{detail}.')
