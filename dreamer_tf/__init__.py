"""Dreamer (V1) in TensorFlow 2: networks, RSSM, agent, replay, tools."""

import os


def quiet_tensorflow():
  """Imports TensorFlow with its C++ start-up lines (oneDNN, CUDA stubs)
  silenced: they are printed before TF_CPP_MIN_LOG_LEVEL is read, so the
  only way to hide them is to point stderr elsewhere during the import."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as devnull:
      os.dup2(devnull.fileno(), 2)
      import tensorflow  # noqa: F401
      import tensorflow_probability  # noqa: F401
  finally:
    os.dup2(saved, 2)
    os.close(saved)
