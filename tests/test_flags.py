"""Flags: one definition each, parsed and checked without TensorFlow."""

import pathlib
import subprocess
import sys

import pytest

import dreamer
from dreamer_tf import flags, hardware

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
