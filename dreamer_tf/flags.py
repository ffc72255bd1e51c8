"""Flags defined once each, with their default and description beside them.

This module imports neither TensorFlow nor any environment, so that a bad
flag is answered at once and `--help` is instant.

  flags = Flags()
  flags.group('General')
  flags('steps', int(5e6), 'Total environment steps (frames) to train for.')
  config = flags.defaults()          # types.SimpleNamespace(steps=5000000)
  parser = flags.parser('Train.')    # argparse, one argument group per group
"""

import argparse
import types


class OneLineErrors(argparse.ArgumentParser):
  """Reports a bad flag as a ValueError of one line instead of printing the
  whole usage text and exiting."""

  def error(self, message):
    raise ValueError(f'{message} (see --help)')


class Flags:
  """An ordered set of flags: name, default, description and group."""

  def __init__(self):
    self._flags = {}      # name -> (group, default, description)
    self._group = 'General'

  def group(self, title):
    """Flags defined after this call are listed under `title` in --help."""
    self._group = title

  def __call__(self, name, default, description):
    if name in self._flags:
      raise ValueError(f'Flag {name!r} is defined twice.')
    self._flags[name] = (self._group, default, description)

  def __iter__(self):
    return iter(self._flags)

  def description(self, name):
    return self._flags[name][2]

  def defaults(self):
    """The default of every flag, as a namespace."""
    return types.SimpleNamespace(
        **{name: default for name, (_, default, _) in self._flags.items()})

  def parser(self, description, usage=None):
    """An argparse parser with every flag as `--name`. Flags not given are
    absent from the parsed namespace (argparse.SUPPRESS), so that callers
    can tell given flags from defaults."""
    parser = OneLineErrors(
        description=description, usage=usage, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for name, (group, default, text) in self._flags.items():
      if group not in groups:
        groups[group] = parser.add_argument_group(group)
      shown = 'required' if default is None else f'default: {default}'
      groups[group].add_argument(
          f'--{name}', type=args_type(default), default=argparse.SUPPRESS,
          metavar=_metavar(default),
          # argparse formats help with %: a literal one must be doubled.
          help=f'{text} ({shown})'.replace('%', '%%'))
    return parser


def _metavar(default):
  if isinstance(default, bool):
    return 'BOOL'
  if isinstance(default, int):
    return 'INT'
  if isinstance(default, float):
    return 'FLOAT'
  return 'TEXT'


def args_type(default):
  """argparse `type` for a flag whose default is `default`: booleans accept
  true/false/yes/no/1/0, ints accept scientific notation like 5e6 when it is
  integral, None means text."""
  if isinstance(default, bool):
    def boolean(text):
      lowered = text.lower()
      if lowered in ('true', '1', 'yes'):
        return True
      if lowered in ('false', '0', 'no'):
        return False
      raise ValueError(f'expected true or false, got {text!r}')
    return boolean
  if isinstance(default, int):
    def integer(text):
      number = float(text)
      if not number.is_integer():
        raise ValueError(f'expected an integer, got {text!r}')
      return int(number)
    return integer
  if default is None:
    return str
  return type(default)
