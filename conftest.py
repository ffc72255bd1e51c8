"""Quiets TensorFlow's C++ logs in the tests (pytest.ini makes the
repository importable)."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
