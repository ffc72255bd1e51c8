"""Flags: one definition each, parsed and checked without TensorFlow."""

import pathlib
import subprocess
import sys

import pytest

import dreamer
from dreamer_tf import flags, hardware

pytestmark = pytest.mark.quick  # The inner-loop tier (pytest.ini).

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_args_type():
  assert flags.args_type(5)('5e6') == 5_000_000
  assert flags.args_type(True)('False') is False
  assert flags.args_type(True)('yes') is True
  assert flags.args_type(0.5)('1e-3') == 0.001
  assert flags.args_type(None)('x') == 'x'
  for text in ('2.5', 'inf', 'nan', 'many'):
    with pytest.raises(ValueError):
      flags.args_type(5)(text)
  with pytest.raises(ValueError):
    flags.args_type(True)('maybe')


def test_every_flag_has_a_description_and_a_group():
  definitions = dreamer.define_flags()
  names = list(definitions)
  assert names == list(vars(dreamer.define_config()))
  assert len(names) == len(set(names)) > 50
  for name in names:
    assert len(definitions.description(name)) > 10, name
  with pytest.raises(ValueError, match='twice'):
    definitions('steps', 1, 'again')


def test_help_shows_description_and_default_in_groups():
  result = subprocess.run(
      [sys.executable, 'dreamer.py', '--help'], cwd=ROOT, capture_output=True,
      text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  text = ' '.join(result.stdout.split())  # Undo argparse's line wrapping.
  for group in ('General:', 'Environment:', 'Model:', 'Training:',
                'Behavior:'):
    assert group in text
  assert text.index('Model:') < text.index('--free_nats') < text.index(
      'Training:')
  assert ('--free_nats FLOAT KL below this (batch mean) gives no gradient. '
          '(default: 3.0)') in text
  assert '--steps INT Total environment steps (frames) to train for. ' \
         '(default: 5000000)' in text
  definitions = dreamer.define_flags()
  for name in definitions:
    description = ' '.join(definitions.description(name).split())
    assert f'--{name} ' in text and description in text, name


def test_parsing_and_checking_import_no_tensorflow_or_renderer():
  # A bad value, a bad task and a good config: none of them may import
  # TensorFlow or load a MuJoCo rendering backend.
  code = '''if True:
    import sys
    import dreamer
    for argv in (['--logdir', 'x', '--precision', '8'],
                 ['--logdir', 'x', '--task', 'dmc_nothing_here'],
                 ['--logdir', 'x', '--preset', 'debug']):
      try:
        dreamer.check_config(dreamer.parse_args(argv))
      except ValueError:
        pass
    heavy = [m for m in sys.modules if m.split('.')[0] in (
        'tensorflow', 'tensorflow_probability', 'keras')]
    # The GL bindings and dm_control's renderer backends load a renderer.
    heavy += [m for m in sys.modules if m.split('.')[0] == 'OpenGL' or
              m.startswith(('dm_control._render.pyopengl',
                            'dm_control._render.glfw'))]
    assert not heavy, heavy
  '''
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def test_expl_amount_halves_every_decay_and_has_a_floor():
  config = dreamer.define_config()
  assert dreamer.expl_amount(config, 10**6) == 0.3
  config.expl_decay, config.expl_min = 1000, 0.05
  assert dreamer.expl_amount(config, 0) == pytest.approx(0.3)
  assert dreamer.expl_amount(config, 1000) == pytest.approx(0.15)
  assert dreamer.expl_amount(config, 2000) == pytest.approx(0.075)
  assert dreamer.expl_amount(config, 10000) == 0.05


def test_the_device_line_says_how_to_get_a_gpu_seen(monkeypatch):
  import shutil
  config = dreamer.define_config()
  line = hardware.describe_devices(config, [])
  assert line.startswith('Devices: CPU; dtype policy mixed_bfloat16.')
  monkeypatch.setattr(shutil, 'which', lambda name: '/usr/bin/' + name)
  line = hardware.describe_devices(config, [])
  assert 'NVIDIA GPU' in line and 'tensorflow[and-cuda]==2.21.0' in line

  class FakeGPU:
    name = '/physical_device:GPU:0'
  line = hardware.describe_devices(config, [FakeGPU()])
  assert line == 'Devices: GPU:0; dtype policy mixed_float16.'


DEBUG = ['--logdir', 'x', '--preset', 'debug']
DEFAULT = ['--logdir', 'x']


@pytest.mark.parametrize('argv,problem,fix', [
    # Never an update: the first occasion is the first again and again.
    (DEBUG + ['--pretrain', '0'], '--pretrain 0', 'use at least 1'),
    (DEBUG + ['--pretrain', '0', '--log_every', '0'], '--pretrain 0',
     'use at least 1'),
    # The occasions after the first make no update: no batch to log.
    (DEBUG + ['--train_steps', '0'], '--train_steps 0', 'use at least 1'),
    # The open loop observes 5 steps and predicts at least one.
    (DEBUG + ['--batch_length', '2'], '--batch_length 2', 'use at least 6'),
    (DEBUG + ['--batch_length', '5'], '--batch_length 5', 'use at least 6'),
    # 4 envs x 100 agent steps x 2 = 800 > 500: each env takes 63 steps.
    (DEBUG + ['--envs', '4'], '--prefill 500 with --envs 4',
     'raise --prefill to 800, or lower --envs to 2, or lower --time_limit '
     'to 126.'),
    (DEBUG + ['--time_limit', '1000'], 'takes 250 of the 500 agent steps',
     'raise --prefill to 1000, or lower --time_limit to 500.'),
    (DEBUG + ['--prefill', '0'], '--prefill 0 with --envs 1',
     'raise --prefill to 200.'),
    # The defaults: 6 envs x 500 agent steps x 2 = 6000 > 5000.
    (DEFAULT + ['--envs', '6'], '--prefill 5000 with --envs 6',
     'raise --prefill to 6000, or lower --envs to 5, or lower --time_limit '
     'to 834.'),
])
def test_values_that_would_fail_in_training_are_refused(argv, problem, fix):
  with pytest.raises(ValueError) as error:
    dreamer.check_config(dreamer.parse_args(argv))
  message = str(error.value)
  assert len(message.splitlines()) == 1
  assert problem in message and fix in message, message


@pytest.mark.parametrize('argv', [
    DEBUG + ['--pretrain', '1', '--train_steps', '1'],
    DEBUG + ['--batch_length', '6'],
    DEBUG + ['--batch_length', '2', '--log_every', '0'],  # No open loop.
    DEBUG + ['--envs', '2'],
    DEBUG + ['--envs', '3', '--prefill', '600'],  # Exactly one episode.
    DEBUG + ['--envs', '4', '--prefill', '800'],
    DEBUG + ['--time_limit', '500'],
    DEFAULT + ['--envs', '5'],
])
def test_the_edges_of_those_checks_are_accepted(argv):
  dreamer.check_config(dreamer.parse_args(argv))


def test_an_evaluation_is_not_refused_for_its_training_flags():
  # --mode eval takes the stored flags of a run; it makes no update.
  config = dreamer.parse_args(DEBUG + ['--envs', '4', '--pretrain', '0',
                                       '--batch_length', '4'])
  config.mode = 'eval'
  dreamer.check_config(config)


def test_eval_accepts_checkpoint_files_without_their_index(tmp_path):
  # The index file `checkpoints/checkpoint` lost (a partial copy): the
  # Checkpointer falls back to the ckpt files, so eval must not refuse.
  (tmp_path / 'config.json').write_text('{"task": "dmc_cartpole_balance"}')
  with pytest.raises(ValueError, match='no checkpoint'):
    dreamer.parse_args(['--logdir', str(tmp_path), '--mode', 'eval'])
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / 'ckpt-1.index').write_bytes(b'')
  config = dreamer.parse_args(['--logdir', str(tmp_path), '--mode', 'eval'])
  assert config.mode == 'eval' and config.task == 'dmc_cartpole_balance'
