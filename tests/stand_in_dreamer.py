"""A stand-in for dreamer.py, for the sweep's tests (`python -m
dreamer_tf.sweep --script tests/stand_in_dreamer.py`): the real
`dreamer.main` (its flags and checks, the logdir's lock and rerun checks,
the signals, the run loop and its endings, the episodes, metrics.jsonl,
the exit statuses) with the fakes of tests/fakes.py in place of the model
and the environments. A run of --preset debug --steps 600 sleeps about 20
seconds (PacedEnvs: 50 ms per agent step) and uses about 10 s of CPU, most
of it importing TensorFlow (tools.py), instead of about a minute."""

import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import fakes  # noqa: E402

import dreamer  # noqa: E402

SECONDS_PER_STEP = 0.05


def make_run(config, strategy=None, lock=None):
  run = fakes.make_fake_run(
      config, envs=lambda count, c: fakes.PacedEnvs(count, c,
                                                    SECONDS_PER_STEP),
      logger=fakes.JsonlLogger(config.logdir))
  run.lock = lock
  return run


def start(config, strategy=None):
  return None, 'CPU (a stand-in: no TensorFlow)'


if __name__ == '__main__':
  dreamer.make_run = make_run
  dreamer.hardware.start = start
  dreamer.main()
