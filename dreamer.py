"""Dreamer (V1): train an agent on DeepMind Control or Atari from pixels.

  python dreamer.py --logdir ./logdir/dmc_walker_walk/dreamer/0 \
      --task dmc_walker_walk

Every flag of `define_flags()` is a command-line flag; --help lists them.
"""

import math
import os
import pathlib
import re
import sys
import time
import types

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np

# None of these imports TensorFlow: workers import them, and flags are
# checked before TensorFlow loads (replay needs it only for datasets).
import wrappers
from dreamer_tf import (
  checkpoint,
  distribute,
  doctor,
  evaluate,
  faults,
  flags,
  follower,
  hardware,
  interrupts,
  progress,
  replay,
  rundir,
)

# TensorFlow is imported inside main() only: spawned environment workers may
# import this module, and TensorFlow must never load next to EGL rendering.


def define_flags():
  """Every setting, with the paper's defaults (docs/design.md section 6) and
  what it does. Each becomes a `--flag`; `--help` lists them in these groups."""
  f = flags.Flags()
  f.group('General')
  f('logdir', None, 'Run folder: episodes, metrics, checkpoints.')
  f('seed', 0, 'Seeds Python, NumPy, TensorFlow and the environments.')
  f('steps', int(5e6), 'Total environment steps (frames) to train for.')
  f('eval_every', int(1e4), 'Evaluate one episode and save every N steps.')
  f('log_every', int(1e3), 'Write train metrics every N steps.')
  f('log_scalars', True, 'Write scalar metrics.')
  f('log_images', True, 'Write open-loop prediction videos.')
  f('gpu_growth', True, 'Let TensorFlow grow GPU memory as needed.')
  f('precision', 16, '16: mixed bfloat16 on a CPU, mixed float16 on a GPU; '
    '32: float32.')
  f('strategy', 'default', 'default: train on one device; mirrored: on every '
    'visible GPU (or --devices) of this host; multi_worker: on the hosts of '
    'the TF_CONFIG variable (README, "GPUs"). The batch is split evenly.')
  f('devices', '', 'Devices of --strategy mirrored, e.g. GPU:0,GPU:1 '
    '(CPU:0,CPU:1 splits the CPU into logical devices). Empty: every GPU.')
  f('mode', 'train', 'train, or eval: evaluate the checkpoint in --logdir.')
  f('eval_episodes', 10, 'Episodes of --mode eval.')
  f('preset', 'none', 'none, cpu or debug: a named group of flag values '
    '(cpu: a one-hour learning check; debug: the tiny sizes of the tests). '
    'Flags given on the command line win.')
  f.group('Environment')
  f('task', 'dmc_walker_walk', 'dmc_<domain>_<task> or atari_<game> (Atari '
    'changes the defaults marked "Atari:", listed at the end).')
  f('envs', 1, 'Parallel training environments.')
  f('parallel', 'none', 'none: all envs in one worker process; process: one '
    'worker each.')
  f('action_repeat', 2, 'Environment steps (frames) per agent step (DMC: 2; '
    'Atari: 4).')
  f('time_limit', 1000, 'Episode cap in environment steps (frames) (DMC: '
    '1000, the episode length; Atari: 108000, the cap of Machado et al. '
    '2018: 27000 agent steps at action repeat 4; games end on their own '
    'before it, a lower cap truncates them).')
  f('prefill', 5000, 'Random-action environment steps before training (DMC: '
    '5000; Atari: 108000, one capped game, so that training never waits for '
    'a game to end).')
  f('eval_noise', 0.0, 'Exploration amount during evaluation.')
  f('clip_rewards', 'none', 'none, or tanh: squash rewards for training '
    '(DMC: none; Atari: tanh).')
  f('env_timeout', 60.0, 'Seconds an environment worker may take to answer '
    'before the run saves and stops, naming it.')
  f('atari_sticky', 0.25, 'Atari: sticky actions, the probability that the '
    'ALE repeats the previous frame\'s action instead of the new one, drawn '
    'every frame (Machado et al. 2018); 0: off.')
  f('atari_life_done', True, 'Atari: a lost life ends training episodes '
    '(discount 0); evaluation episodes always play the whole game.')
  f('atari_full_actions', False, 'Atari: all 18 actions instead of the '
    'game\'s minimal action set.')
  f('atari_grayscale', False, 'Atari: grey frames (in three equal channels) '
    'instead of colour; the paper used colour 64x64.')
  f('atari_noops', 30, 'Atari: 1 to N random no-op frames after each reset '
    '(0: none).')
  f.group('Model')
  f('deter_size', 200, 'GRU state size (also the RSSM hidden size).')
  f('stoch_size', 30, 'Stochastic state size.')
  f('num_units', 400, 'Units of the dense heads and the actor.')
  f('dense_act', 'elu', 'Activation of the dense heads and the actor.')
  f('cnn_act', 'relu', 'Activation of the encoder and decoder.')
  f('cnn_depth', 32, 'Channel multiplier of the encoder and decoder.')
  f('pcont', False, 'Learn a continuation (discount) head, trained towards '
    '0 at episode ends and --discount elsewhere (DMC: False; Atari: True).')
  f('scan', 'unrolled', 'Loops over time (observe, imagination, returns): '
    'unrolled, as the reference, or loop: one symbolic loop each (same '
    'results; the first step traces in about half the time).')
  f('free_nats', 3.0, 'KL below this (batch mean) gives no gradient.')
  f('kl_scale', 1.0, 'Weight of the KL term (DMC: 1.0; Atari: 0.1).')
  f('kl_balance', 0.0, 'KL balancing (DreamerV2): a share A in (0, 1] of '
    'the KL gradient trains the prior, 1 - A the posterior; the value is '
    'the same. 0: off, the plain KL of the paper.')
  f('pcont_scale', 10.0, 'Weight of the continuation log-likelihood.')
  f('weight_decay', 0.0, 'Decoupled weight decay (0: off).')
  f('weight_decay_pattern', r'.*', 'Regex of variable paths to decay.')
  f.group('Training')
  f('batch_size', 50, 'Sequences per batch.')
  f('batch_length', 50, 'Agent steps per sequence.')
  f('train_every', 1000, 'Train every N environment steps.')
  f('train_steps', 100, 'Updates per training occasion.')
  f('pretrain', 100, 'Updates on the first occasion.')
  f('model_lr', 6e-4, 'World model learning rate.')
  f('value_lr', 8e-5, 'Value learning rate.')
  f('actor_lr', 8e-5, 'Actor learning rate.')
  f('grad_clip', 100.0, 'Global-norm gradient clipping.')
  f('on_nan', 'stop', 'On a non-finite loss: stop (the batch goes to '
    '<logdir>/nan/, exit status 3), or skip the update and count it '
    '(nan_steps).')
  f('save_memory', False, 'Finish the world model\'s backward pass before '
    'imagination starts: same results, peak memory 17-32 % lower with --scan '
    'loop, train step up to 15 % slower (50x50, 2 CPU cores).')
  f('dataset_balance', False, 'Bias training windows towards episode ends.')
  f('replay_size', int(1e6), 'Environment steps of the newest episodes kept '
    'in memory for training (about 6 GB per 1e6 at action repeat 2); older '
    'ones stay on disk and in the step count. 0: all, as the reference.')
  f.group('Behavior')
  f('discount', 0.99, 'Discount of the imagined returns.')
  f('disclam', 0.95, 'Lambda of the imagined returns.')
  f('horizon', 15, 'Imagination horizon in agent steps (DMC: 15; Atari: '
    '10).')
  f('action_dist', 'tanh_normal', 'tanh_normal (continuous) or onehot '
    '(discrete, straight-through gradients) (DMC: tanh_normal; Atari: '
    'onehot).')
  f('action_init_std', 5.0, 'Initial std of the tanh-normal actor.')
  f('expl', 'additive_gaussian', 'Exploration: additive_gaussian, '
    'completely_random or epsilon_greedy (DMC: additive_gaussian; Atari: '
    'epsilon_greedy).')
  f('expl_amount', 0.3, 'Exploration amount: the noise std, or epsilon '
    '(DMC: 0.3; Atari: 0.4).')
  f('expl_schedule', 'exponential', 'exponential: halve the amount every '
    '--expl_decay environment steps (the reference); linear: from '
    '--expl_amount to --expl_min over the first --expl_updates updates '
    '(gradient steps), then --expl_min (the paper\'s Atari schedule) (DMC: '
    'exponential; Atari: linear).')
  f('expl_decay', 0.0, 'exponential schedule: halve the amount every N '
    'environment steps (0: constant).')
  f('expl_updates', int(2e5), 'linear schedule: updates over which the '
    'amount goes from --expl_amount to --expl_min.')
  f('expl_min', 0.0, 'Floor of the exponential schedule, end of the linear '
    'one (DMC: 0.0; Atari: 0.1).')
  return f


def define_config():
  """The default of every flag, as a namespace (see define_flags)."""
  return define_flags().defaults()


# The defaults of atari_<game> tasks where they differ from DeepMind
# Control's: the paper's discrete-control settings (its appendix), whole
# games under the evaluation protocol of Machado et al. (2018), and a prefill
# that holds a finished game (docs/design.md sections 6 and 8). They apply
# after the defaults and the preset, except for the values the preset sets
# itself (a preset is chosen on the command line); flags given win over all.
# Each flag's --help text names its DMC and Atari values.
ATARI_DEFAULTS = dict(
    action_dist='onehot', pcont=True, expl='epsilon_greedy',
    action_repeat=4, time_limit=wrappers.ATARI_CAP,
    prefill=wrappers.ATARI_CAP, horizon=10,
    kl_scale=0.1, clip_rewards='tanh', expl_schedule='linear',
    expl_amount=0.4, expl_min=0.1)

# Named groups of flag values. Order: defaults, preset, Atari defaults, then
# the flags given on the command line.
PRESETS = dict(
    none={},
    # The tiny sizes of the tests: runs in about a minute, learns nothing.
    # Symbolic loops (same results, tested): the first step traces in about
    # 15 % less time, which is most of a debug run.
    debug=dict(
        batch_size=4, batch_length=10, prefill=500, train_every=500,
        train_steps=2, pretrain=2, eval_every=1000, log_every=500,
        time_limit=200, cnn_depth=4, deter_size=16, stoch_size=4,
        num_units=16, precision=32, steps=1500, scan='loop'),
    # A learning check that fits 2 CPU cores and about an hour: the paper's
    # settings at a third of the batch (docs/reproduce.md).
    cpu=dict(batch_size=16, eval_every=2000, steps=25000),
)

# What --mode eval may change; the rest comes from the run's config.json.
EVAL_FLAGS = ('logdir', 'mode', 'eval_episodes', 'eval_noise', 'seed',
              'precision', 'gpu_growth', 'parallel', 'strategy', 'devices')

# Numeric flags and their valid values (NaN and infinity are never valid).
RANGES = (
    (('batch_size', 'batch_length', 'envs', 'action_repeat', 'time_limit',
      'horizon', 'steps', 'eval_every', 'train_every', 'eval_episodes',
      'expl_updates'),
     lambda v: v >= 1, 'at least 1'),
    (('prefill', 'log_every', 'train_steps', 'pretrain', 'free_nats',
      'kl_scale', 'pcont_scale', 'weight_decay', 'model_lr', 'value_lr',
      'actor_lr', 'expl_amount', 'expl_decay', 'expl_min', 'eval_noise',
      'seed', 'replay_size', 'atari_noops'), lambda v: v >= 0, 'at least 0'),
    (('grad_clip', 'action_init_std', 'env_timeout'), lambda v: v > 0,
     'above 0'),
    (('discount', 'disclam', 'kl_balance', 'atari_sticky'),
     lambda v: 0 <= v <= 1,
     'in [0, 1]'),
)

CHOICES = dict(
    precision=(16, 32), parallel=('none', 'process'), mode=('train', 'eval'),
    strategy=distribute.STRATEGIES, scan=('unrolled', 'loop'),
    on_nan=('stop', 'skip'), expl_schedule=('exponential', 'linear'),
    preset=tuple(PRESETS), clip_rewards=('none', 'tanh'),
    action_dist=('tanh_normal', 'onehot'),
    expl=('additive_gaussian', 'completely_random', 'epsilon_greedy'),
    dense_act=('elu', 'relu', 'tanh', 'swish', 'gelu', 'leaky_relu'),
    cnn_act=('elu', 'relu', 'tanh', 'swish', 'gelu', 'leaky_relu'))


def parse_args(argv=None):
  """Flags -> config (see PRESETS for the order in which values apply)."""
  definitions = define_flags()
  defaults = vars(definitions.defaults())
  parser = definitions.parser(
      __doc__.split('\n\n')[0],
      usage='python dreamer.py --logdir DIR [--task TASK] [--FLAG VALUE ...]')
  items = [f'--{k} {v}' for k, v in ATARI_DEFAULTS.items()]
  lines = ['Atari tasks (atari_<game>) default to:']
  for item in items:
    if len(lines[-1]) + len(item) > 76:
      lines.append(' ')
    lines[-1] += f' {item},' if item != items[-1] else f' {item}.'
  lines.append('A --preset\'s own values and the flags given win over these.')
  parser.epilog = '\n'.join(lines)
  given = vars(parser.parse_args(argv))
  if given.get('mode') == 'eval':
    return eval_config(defaults, given)
  config = dict(defaults)
  preset = given.get('preset', 'none')
  if preset not in PRESETS:
    raise ValueError(f'--preset {preset!r} is not one of {", ".join(PRESETS)}.')
  config.update(PRESETS[preset])
  if given.get('task', config['task']).startswith('atari_'):
    # The preset's own values win (e.g. debug's short episodes).
    config.update({k: v for k, v in ATARI_DEFAULTS.items()
                   if k not in PRESETS[preset]})
  config.update(given)
  return types.SimpleNamespace(**config)


def eval_config(defaults, given):
  """The stored config of the run in --logdir with the flags of EVAL_FLAGS
  given on the command line; any other flag must match the stored value."""
  logdir = pathlib.Path(given.get('logdir') or '.').expanduser()
  stored_path = logdir / 'config.json'
  if not stored_path.exists():
    raise ValueError(f'--mode eval needs a training run in --logdir: '
                     f'{stored_path} does not exist.')
  saved = logdir / 'checkpoints'
  if not (saved / 'checkpoint').exists() and \
      not any(saved.glob('ckpt-*.index')):
    raise ValueError(f'no checkpoint in {logdir / "checkpoints"}: train '
                     'first (a checkpoint is saved after each evaluation).')
  config = dict(defaults, **rundir.read_config(logdir))
  for key, value in given.items():
    if key in EVAL_FLAGS:
      config[key] = value
    elif value != config[key]:
      raise ValueError(f'--{key} cannot change in --mode eval: this run was '
                       f'trained with {config[key]!r}.')
  return types.SimpleNamespace(**config)


def check_config(config):
  """Fails fast, with one line naming the problem and the fix."""
  if not config.logdir:
    raise ValueError('--logdir is required, e.g. --logdir ./logdir/'
                     f'{config.task}/dreamer/0')
  for key, options in CHOICES.items():
    if getattr(config, key) not in options:
      raise ValueError(f'--{key} {getattr(config, key)!r} is not one of '
                       f'{", ".join(map(str, options))}.')
  for keys, valid, text in RANGES:
    for key in keys:
      value = getattr(config, key)
      if not (math.isfinite(value) and valid(value)):
        raise ValueError(f'--{key} {value} must be {text}.')
  if config.steps <= config.prefill and config.mode == 'train':
    raise ValueError(
        f'--steps {config.steps} is not above --prefill {config.prefill}: '
        'only random actions would run. Raise --steps or lower --prefill.')
  try:
    re.compile(config.weight_decay_pattern)
  except re.error as error:
    raise ValueError(f'--weight_decay_pattern {config.weight_decay_pattern!r}'
                     f' is not a regular expression: {error}.') from None
  if config.batch_length < 2:
    raise ValueError('--batch_length must be at least 2.')
  longest = replay.max_length(config.time_limit, config.action_repeat)
  if config.batch_length > longest:
    raise ValueError(
        f'--batch_length {config.batch_length} is longer than an episode '
        f'({longest} steps with --time_limit {config.time_limit} and '
        f'--action_repeat {config.action_repeat}): no training window would '
        'fit.')
  if config.mode == 'train':
    # Values that pass the ranges above but fail once the run trains.
    # Run.train_if_due: an occasion is the first while the agent has made
    # no update, and one of no update leaves no batch for the open loop.
    if config.pretrain < 1:
      raise ValueError(
          f'--pretrain {config.pretrain}: the first training occasion would '
          'make no update, and so would every later one (each would still be '
          'the first): the agent would never train; use at least 1.')
    if config.train_steps < 1:
      raise ValueError(
          f'--train_steps {config.train_steps}: the training occasions after '
          'the first (--pretrain) would make no update, and the train logs '
          'need one; use at least 1.')
    # agent.open_loop observes `context` steps of a window and predicts the
    # rest, which must be a step at least: none fails in the unrolled scan
    # and measures nothing with --scan loop.
    context = 5
    if config.log_every and config.batch_length <= context:
      raise ValueError(
          f'--batch_length {config.batch_length} is too short for the '
          f'open-loop check of the train logs ({context} observed steps, '
          f'then at least 1 predicted): use at least {context + 1}, or '
          '--log_every 0 (no open-loop check).')
    # The training envs step together (Run._collect, tools.simulate): the
    # prefill's agent steps take `rounds` rounds, one agent step of each
    # env per round. Training starts right after the prefill and waits for
    # a finished episode, which takes `episode` rounds (the time limit).
    repeat, envs = config.action_repeat, config.envs
    prefill = replay.agent_steps(config.prefill, repeat)
    rounds = -(-prefill // envs)
    episode = replay.agent_steps(config.time_limit, repeat)
    if rounds < episode:
      fewer = [n for n in range(1, envs) if -(-prefill // n) >= episode]
      fixes = [f'raise --prefill to {episode * envs * repeat}']
      if fewer:
        fixes.append(f'lower --envs to {max(fewer)}')
      if rounds:
        fixes.append(f'lower --time_limit to {rounds * repeat}')
      raise ValueError(
          f'--prefill {config.prefill} with --envs {envs} ends before an '
          f'episode does: each env takes {rounds} of the {episode} agent '
          f'steps of --time_limit {config.time_limit} (--action_repeat '
          f'{repeat}), and training would wait for an episode in vain; '
          + ', or '.join(fixes) + '.')
  if config.task.startswith('atari_') and config.action_dist != 'onehot':
    raise ValueError('Atari has discrete actions: use --action_dist onehot.')
  if config.task.startswith('dmc_') and config.action_dist == 'onehot':
    raise ValueError('DeepMind Control has continuous actions: use '
                     '--action_dist tanh_normal.')
  if config.expl == 'epsilon_greedy' and config.action_dist != 'onehot':
    raise ValueError('--expl epsilon_greedy needs --action_dist onehot.')
  if not config.task.startswith('atari_'):
    defaults = vars(define_config())
    changed = [f'--{k}' for k in defaults if k.startswith('atari_') and
               getattr(config, k) != defaults[k]]
    if changed:
      raise ValueError(f'{", ".join(changed)} apply to Atari tasks only, '
                       f'not to --task {config.task}: leave them out.')
  devices = distribute.parse_devices(config.devices)
  if devices and config.strategy != 'mirrored':
    raise ValueError('--devices is for --strategy mirrored; with '
                     f'--strategy {config.strategy} leave it out.')
  if devices:
    distribute.check_batch(len(devices), config.batch_size)
  if config.strategy == 'multi_worker' and config.mode == 'train':
    distribute.read_tf_config()
  if config.expl == 'additive_gaussian' and config.action_dist == 'onehot':
    raise ValueError('--expl additive_gaussian makes one-hot actions invalid: '
                     'use --expl epsilon_greedy or completely_random.')
  # The slower checks last: they import dm_control (rendering off) or ALE.
  wrappers.check_task(config.task)
  if config.task.startswith('dmc_'):
    wrappers.check_rendering()


def expl_amount(config, step, updates=0):
  """Exploration amount at environment step `step` after `updates` updates.
  --expl_schedule exponential (the reference's): expl_amount *
  0.5 ** (step / expl_decay) when expl_decay > 0, never below expl_min.
  linear (the paper's Atari schedule): expl_amount at update 0, falling
  linearly to expl_min at expl_updates updates, expl_min after that."""
  if config.expl_schedule == 'linear':
    done = min(updates / config.expl_updates, 1.0)
    return (1.0 - done) * config.expl_amount + done * config.expl_min
  amount = config.expl_amount
  if config.expl_decay:
    amount *= 0.5 ** (step / config.expl_decay)
  return max(amount, config.expl_min)


class Run:
  """One training run in a logdir; `train_loop` reads top to bottom.

  The parts are passed in (`make_run` builds the real ones), so that tests
  can drive the loop with fakes:
    agent: `train(batch) -> {name: scalar}`, `updates` (int, updates made so
      far), `open_loop(batch) -> (video uint8 [T, H, W, C], {name: scalar})`.
    policy: `(images uint8 [N, H, W, C], reset bool [N], state, training,
      amount) -> (actions [N, A], state)` (an `agent.Policy`).
    train_envs, eval_env: `wrappers.Envs` (N training envs, 1 eval env).
    checkpoint: `restore() -> bool`, `save(step) -> path`, `step`, `latest`.
    logger: `scalar(name, value)`, `video(name, frames)`, `write(step)`.
    dataset: `() -> iterator` of training batches from the replay.
    team: None, or with --strategy multi_worker the `distribute.Team` that
      tells the other workers to take each train step with the chief.
    lock: None, or the `rundir.Lock` this process holds on the logdir; no
      checkpoint is saved once its file was deleted or replaced.
  Steps count environment frames (agent steps x action_repeat).
  """

  def __init__(self, config, *, agent, policy, train_envs, eval_env,
               checkpoint, logger, dataset, team=None, lock=None):
    import tools
    self.config = c = config
    self.logdir = pathlib.Path(c.logdir).expanduser()
    self.datadir = self.logdir / 'episodes'
    self.agent, self.policy = agent, policy
    self.train_envs, self.eval_env = train_envs, eval_env
    self.checkpoint, self.logger = checkpoint, logger
    self._make_dataset, self._dataset = dataset, None
    # Only valid episodes of this run count; others move to rejected/.
    self.step = replay.check_episodes(
        self.datadir, c.action_repeat, replay.episode_spec(train_envs),
        progress.say)
    self.restored = self.checkpoint.restore()
    self.team, self.lock = team, lock
    if team:  # The other workers start from the chief's (restored) weights.
      team.share_weights(agent.variables())
    # The metrics so far (also those of earlier processes of this run), for
    # the health checks of dreamer_tf.doctor.
    self._history = doctor.read_history(self.logdir)
    # Never count backwards: the checkpoint and the last logged step also
    # count the unfinished episode of a process that stopped (or was
    # killed); its interaction happened, only its frames were not stored.
    candidates = [self.step] + [r['step'] for r in self._history]
    if self.restored:
      candidates.append(self.checkpoint.step)
    self.step = max(candidates)
    self._should_train = tools.Every(c.train_every)
    self._should_log = tools.Every(c.log_every)
    self._state = None
    self._last_log = (self.step, time.time())
    self._nan_steps = 0
    self._overall = progress.overall(self.step, c.steps, disable=True)
    self._watcher = doctor.Watcher(vars(c))

  def close(self):
    self.train_envs.close()
    self.eval_env.close()
    if self.team:
      self.team.stop()

  # --- The loop, top to bottom. ---

  def train_loop(self):
    c = self.config
    if self.restored:
      print(f'Resumed from {self.checkpoint.latest} at step '
            f'{self.step} ({self.agent.updates} updates).')
    elif self.step:
      print(f'Continuing at step {self.step} from the stored episodes and '
            'logs (no checkpoint yet: the model starts afresh).')
    self._overall = progress.overall(self.step, c.steps)
    try:
      if self.step < c.prefill:
        self.prefill(c.prefill - self.step)
      while self.step < c.steps:
        self.evaluate()
        self.collect(min(c.eval_every, c.steps - self.step))
        self.save()
    finally:
      self._overall.close()
    print(f'Done: {self.step} environment steps.')

  def prefill(self, steps):
    """`steps` environment steps with uniformly random actions.

    A rerun after a kill in the prefill draws new actions rather than those
    of the episodes stored already: the stream is seeded from --seed and
    the number of episodes stored (--seed alone when there are none), which
    grows with every episode a killed process stored."""
    stored = len(list(self.datadir.glob('*.npz')))
    rng = np.random.default_rng(
        [self.config.seed, stored] if stored else self.config.seed)
    space = self.train_envs.action_space
    def policy(images, reset, state):
      return [wrappers.random_action(space, rng) for _ in images], state
    self._collect(policy, steps, 'prefill')
    self._write_logs()

  def collect(self, steps):
    """`steps` environment steps with the policy; before each policy step
    the agent trains when it is due (`train_if_due`), as in the reference."""
    def policy(images, reset, state):
      amount = expl_amount(self.config, self.step, self.agent.updates)
      actions, state = self.policy(images, reset, state, True, amount)
      return faults.finite_actions(actions, self.step), state
    self._collect(policy, steps, 'collect', before_step=self.train_if_due)

  def evaluate(self):
    """One evaluation episode: the policy's mode, `eval_noise` exploration."""
    episodes = evaluate.run_episodes(self.policy, self.eval_env, 1, self.config)
    self._log_episode('test', episodes[0])
    self.logger.video('test/policy', episodes[0]['image'])
    self._flush_logs()

  def train_if_due(self):
    """Every `train_every` steps: `train_steps` updates (`pretrain` on the
    first occasion of a run that has never trained), then the logs when
    `log_every` steps have passed."""
    c = self.config
    if not self._should_train(self.step):
      return
    first = self.agent.updates == 0
    count = c.pretrain if first else c.train_steps
    dataset = self.dataset()
    for _ in progress.bar(range(count), 'pretrain' if first else 'update',
                      'update'):
      interrupts.check()
      self._overall.refresh()  # Keep its elapsed time and estimate current.
      batch = next(dataset)
      if self.team:  # Every worker takes this step with the chief.
        metrics = self.team.step(self.agent.train, batch)
      else:
        metrics = self.agent.train(batch)
      bad = faults.non_finite(metrics)
      if bad:
        self._non_finite(batch, {k: float(metrics[k]) for k in bad})
        continue
      if c.log_scalars:
        for name, value in metrics.items():
          self.logger.scalar(name, value)
    if self._should_log(self.step):
      video, checks = self.agent.open_loop(batch)
      for name, value in checks.items():
        self.logger.scalar(name, value)
      if c.log_images:
        self.logger.video('train/openl', np.asarray(video))
      self._write_logs()

  def _non_finite(self, batch, losses):
    """A non-finite loss: the optimizers have skipped the update. With
    --on_nan skip, count it; with stop, keep the batch and stop."""
    if self.config.on_nan == 'skip':
      self._nan_steps += 1
      self.logger.scalar('nan_steps', self._nan_steps)
      return
    if self.team:  # The other workers saw the same losses and stopped.
      self.team.stopped = True
    raise faults.keep_nan_batch(
        self.logdir, self.step, batch, losses, self.checkpoint)

  def dataset(self):
    if self._dataset is None:
      self._dataset = iter(self._make_dataset())
    return self._dataset

  def save(self):
    problem = self.lock and self.lock.check()
    if problem:  # Another trainer may own the logdir now: save nothing.
      raise rundir.LogdirError(problem)
    self._write_logs()
    path = self.checkpoint.save(self.step)
    progress.say(f'Saved {path} at step {self.step}.')

  # --- Helpers. ---

  def _collect(self, policy, steps, desc, before_step=None):
    """Steps the training envs for `steps` env steps, storing episodes."""
    import tools
    repeat = self.config.action_repeat
    bar = progress.bar(None, desc, 'step', total=steps)
    def on_episode(index, episode):
      replay.save_episode(self.datadir, episode)
      self._log_episode('train', episode)
    def on_step(count):
      self.step += replay.env_steps(count, repeat)
      bar.update(replay.env_steps(count, repeat))
      self._overall.update(replay.env_steps(count, repeat))
    self._state = tools.simulate(
        policy, self.train_envs, steps=replay.agent_steps(steps, repeat),
        state=self._state, on_episode=on_episode, on_step=on_step,
        before_step=before_step)
    bar.close()

  def _log_episode(self, prefix, episode):
    score = float(episode['reward'].sum())
    length = replay.episode_steps(
        len(episode['reward']), self.config.action_repeat)
    self.logger.scalar(f'{prefix}/return', score)
    self.logger.scalar(f'{prefix}/length', length)
    if self.config.action_dist == 'tanh_normal':
      # Entry 0 is the reset (no action taken).
      saturated = np.abs(episode['action'][1:]) > doctor.SATURATED
      self.logger.scalar(f'{prefix}/action_sat', float(np.mean(saturated)))
    progress.say(f'[{self.step}] {prefix}/return {score:.1f} ({length} steps)')

  def _write_logs(self):
    last_step, last_time = self._last_log
    now = time.time()
    if self.step > last_step:
      self.logger.scalar('fps', (self.step - last_step) / (now - last_time))
    self._last_log = (self.step, now)
    self._flush_logs()

  def _flush_logs(self):
    """Writes the metrics collected since the last write, keeps them for
    the health checks and says when a check turned into a problem."""
    scalars = self.logger.write(self.step) or {}
    if scalars:
      self._history.append(dict(step=self.step, **scalars))
      for line in self._watcher.update(self._history, self.step):
        progress.say(line)


def make_run(config, strategy=None, lock=None):
  """The real parts of a run: the Dreamer agent and its policy, the
  environment workers, the checkpoint, the logger and the replay dataset;
  with a tf.distribute `strategy` (setup_tensorflow), the agent trains with
  it, and with several workers the chief's Run leads a `distribute.Team`."""
  import tools
  from dreamer_tf import agent as agent_lib
  logdir = pathlib.Path(config.logdir).expanduser()
  (logdir / 'episodes').mkdir(parents=True, exist_ok=True)
  train_envs = wrappers.make_envs(config, train=True)
  eval_env = None
  try:
    eval_env = wrappers.make_envs(config, train=False)
    agent = agent_lib.Dreamer(
        config, train_envs.action_space.shape[0], strategy=strategy)
  except BaseException:
    train_envs.close()
    if eval_env is not None:
      eval_env.close()
    raise
  team = None
  if distribute.workers(strategy) > 1:
    team = distribute.Team(strategy)
  return Run(
      config, agent=agent, policy=agent_lib.Policy(agent),
      train_envs=train_envs, eval_env=eval_env,
      checkpoint=checkpoint.Checkpointer(agent, logdir, owner=True),
      logger=tools.Logger(logdir),
      dataset=distribute.worker_dataset(
          config, replay.episode_spec(train_envs), strategy),
      team=team, lock=lock)


def train_to_end(run, logdir):
  """Trains `run` to --steps, then closes it. Returns the exit status: 0 at
  the end; 130 after Ctrl-C or SIGTERM (a checkpoint of the step reached is
  saved); 3 when the losses became non-finite; 1 after a crash."""
  status = 0
  try:
    try:
      run.train_loop()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (dreamer_tf.interrupts).
      # Keep the training since the last save; rerun the command to resume.
      print(f'Interrupted at step {run.step}: saving a checkpoint.')
      run.save()
      status = 130
    if run.team:  # Equal on every worker that took the same steps.
      print('Worker 0: weights fingerprint '
            f'{distribute.fingerprint(run.agent.weights())}.')
  except rundir.LogdirError:  # Its lock file is gone: save nothing more.
    raise
  except faults.NonFinite as error:
    if error.weights_ok:
      run.save()
    print(f'dreamer.py: error: {error}', file=sys.stderr)
    return 3
  except Exception as error:  # A dead worker, a full disk, a bug.
    return faults.crashed(run, logdir, error)
  finally:
    run.close()
  return status


def train(config):
  """--mode train: owns the logdir, checks a rerun against the stored
  config before writing anything, then trains. Returns the exit status.
  The other workers of a multi_worker run only `follow` the chief."""
  if config.strategy == 'multi_worker' and \
      distribute.read_tf_config()['task']['index'] != 0:
    return follower.start(config)
  logdir = rundir.create(config.logdir)
  lock = rundir.Lock(logdir)
  notice = lock.acquire()
  try:
    if notice:
      print(notice)
    changes = rundir.check_rerun(logdir, config)
    # The flags are fine: now load TensorFlow.
    strategy, devices = hardware.start(config, config.strategy)
    interrupts.check()  # A Ctrl-C while TensorFlow loaded.
    print(f'Logdir {logdir}, task {config.task}.')
    print(wrappers.describe_cap(
        config.task, config.time_limit, config.action_repeat))
    print(devices)
    # Fails on a checkpoint that does not fit.
    run = make_run(config, strategy, lock)
    rundir.store_config(logdir, config, changes)
    rundir.store_provenance(logdir, rundir.provenance(devices))
    if changes:
      print('Changed since the last start: ' + ', '.join(
          f'--{k} {old!r} -> {new!r}' for k, (old, new) in changes.items()))
    return train_to_end(run, logdir)
  finally:
    lock.release()


def main(argv=None):
  try:
    config = parse_args(argv)
    check_config(config)
  except (ValueError, RuntimeError) as error:
    sys.exit(f'dreamer.py: error: {error}')
  try:
    # Ctrl-C and a scheduler's SIGTERM stop at the next safe point.
    with interrupts.deferred():
      if config.mode == 'eval':
        print(hardware.start(config)[1])  # On one device.
        status = evaluate.evaluate_checkpoint(config)
      else:
        status = train(config)
  except KeyboardInterrupt:  # During start-up: nothing to save yet.
    print('Interrupted.', file=sys.stderr)
    sys.exit(130)
  except ValueError as error:  # The logdir, or a checkpoint that won't fit.
    sys.exit(f'dreamer.py: error: {error}')
  if status:
    sys.exit(status)


if __name__ == '__main__':
  main()
