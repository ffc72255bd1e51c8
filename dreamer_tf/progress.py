"""What a run prints while it works: lines above the progress bars, the bar
of the current phase and the whole run's line. Imports no TensorFlow."""

import sys


def say(text):
  """Prints a line above the progress bars (plainly when there are none)."""
  import tqdm
  tqdm.tqdm.write(text, file=sys.stdout)


def bar(iterable, desc, unit, total=None):
  """A tqdm bar of one phase (prefill, train, eval, ...) on an interactive
  terminal; silent in logs and tests."""
  import tqdm
  return tqdm.tqdm(iterable, desc=desc, unit=unit, total=total, leave=False,
                   dynamic_ncols=True, disable=None, file=sys.stdout)


def overall(step, steps, disable=None):
  """The whole run's line, kept above the phase bars on an interactive
  terminal: environment steps done of `steps`, the rate and the time to the
  end. Rate and estimate average over this process only (smoothing=0), so a
  resumed run counts from the step it resumed at; training pauses between
  collection count in, so the estimate includes them."""
  import tqdm
  return tqdm.tqdm(
      desc='run', unit='step', total=steps, initial=step, leave=False,
      dynamic_ncols=True, disable=disable, file=sys.stdout, smoothing=0,
      bar_format='{desc} {n_fmt}/{total_fmt} env steps {percentage:3.0f}%'
                 '|{bar}| {rate_fmt}, {elapsed} elapsed, {remaining} left')
