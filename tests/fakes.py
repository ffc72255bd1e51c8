"""Stand-ins for the parts of a run that need TensorFlow or MuJoCo, for
the real `dreamer.Run` (tests/test_loop.py, tests/stand_in_dreamer.py):
environments, agent, policy, checkpoint and logger. No model, no rendering.
"""

import json
import pathlib

import gymnasium
import numpy as np

import dreamer
import wrappers
from dreamer_tf import replay

IMAGE = (8, 8, 3)


class CountingEnv:
  """Images that show the step number; reward 1 per step; never ends by
  itself (the TimeLimit wrapper ends it, like a DMC task)."""

  def __init__(self):
    self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
    self.observation_space = gymnasium.spaces.Dict(
        {'image': gymnasium.spaces.Box(0, 255, IMAGE, np.uint8)})
    self._steps = 0

  def reset(self):
    self._steps = 0
    return {'image': np.zeros(IMAGE, np.uint8)}

  def step(self, action):
    self._steps += 1
    image = np.full(IMAGE, self._steps % 256, np.uint8)
    return {'image': image}, 1.0, False, {'discount': np.float32(1.0)}


class FakeEnvs:
  """The interface of wrappers.Envs, stepping wrapped envs in-process."""

  def __init__(self, count, config):
    duration = replay.agent_steps(config.time_limit, config.action_repeat)
    self._envs = [wrappers.Collect(wrappers.TimeLimit(CountingEnv(), duration))
                  for _ in range(count)]
    self.action_space = self._envs[0].action_space
    self.observation_space = self._envs[0].observation_space
    self.closed = False

  def __len__(self):
    return len(self._envs)

  def reset(self, index):
    return self._envs[index].reset()

  def step(self, actions):
    return [env.step(a) for env, a in zip(self._envs, actions)]

  def close(self):
    self.closed = True


class FakeAgent:
  """Counts updates; remembers at which run step each update happened."""

  def __init__(self, metrics=None):
    self.updates = 0
    self.train_steps, self.open_loop_steps = [], []
    self.clock = lambda: None
    self.metrics = metrics or {'model_loss': 1.0}

  def train(self, batch):
    assert batch['image'].shape[1:] == IMAGE
    self.updates += 1
    self.train_steps.append(self.clock())
    return self.metrics

  def open_loop(self, batch):
    self.open_loop_steps.append(self.clock())
    return np.zeros((3,) + IMAGE, np.uint8), {'openl_mse_h1': 0.5}


class FakePolicy:
  def __init__(self, agent):
    self.calls = []   # (step, training)
    self._agent = agent

  def __call__(self, images, reset, state, training, amount):
    self.calls.append((self._agent.clock(), training))
    return np.zeros((len(images), 1), np.float32), state


class FakeCheckpoint:
  """Saves the step and the update count as JSON in the logdir."""

  def __init__(self, agent, logdir):
    self._agent, self._path = agent, logdir / 'fake_checkpoint.json'
    self.step, self.saves = 0, []

  @property
  def latest(self):
    return str(self._path) if self._path.exists() else None

  def restore(self):
    if not self._path.exists():
      return False
    stored = json.loads(self._path.read_text())
    self.step, self._agent.updates = stored['step'], stored['updates']
    return True

  def save(self, step):
    self.step = step
    self.saves.append(step)
    self._path.write_text(json.dumps(dict(step=step,
                                          updates=self._agent.updates)))
    return str(self._path)


class FakeLogger:
  """Keeps what was written; `write` returns the means, as tools.Logger."""

  def __init__(self):
    self.writes, self.videos, self._pending = [], [], {}

  def scalar(self, name, value):
    assert np.isfinite(value)
    self._pending.setdefault(name, []).append(value)

  def video(self, name, frames):
    self.videos.append(name)

  def write(self, step):
    self.writes.append((step, set(self._pending)))
    scalars = {k: float(np.mean(v)) for k, v in self._pending.items()}
    self._pending = {}
    return scalars


class PacedEnvs(FakeEnvs):
  """FakeEnvs whose every step takes `seconds`, so that a process running
  them can be signalled while it collects."""

  def __init__(self, count, config, seconds):
    super().__init__(count, config)
    self._seconds = seconds

  def step(self, actions):
    import time
    time.sleep(self._seconds)
    return super().step(actions)


class JsonlLogger(FakeLogger):
  """Also appends each write to `<logdir>/metrics.jsonl`, as tools.Logger
  does (one JSON object per line with `step`)."""

  def __init__(self, logdir):
    super().__init__()
    self._path = pathlib.Path(logdir) / 'metrics.jsonl'

  def write(self, step):
    scalars = super().write(step)
    if scalars:
      with self._path.open('a') as f:
        f.write(json.dumps(dict(step=int(step), **scalars)) + '\n')
    return scalars


def make_fake_run(config, metrics=None, envs=None, logger=None):
  """The real dreamer.Run with the fakes above; `envs(count, config)` makes
  the environments (FakeEnvs), `logger` is a FakeLogger by default."""
  logdir = pathlib.Path(config.logdir)
  envs = envs or FakeEnvs
  agent = FakeAgent(metrics)
  run = dreamer.Run(
      config, agent=agent, policy=FakePolicy(agent),
      train_envs=envs(config.envs, config), eval_env=envs(1, config),
      checkpoint=FakeCheckpoint(agent, logdir), logger=logger or FakeLogger(),
      dataset=lambda: replay.sample_windows(
          logdir / 'episodes', config.batch_length, seed=0))
  agent.clock = lambda: run.step
  return run
