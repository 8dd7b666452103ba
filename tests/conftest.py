"""Four logical CPU devices for the whole test session (must precede any TF device use)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

NUM_DEVICES = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES)

# tf.test.TestCase helpers (create_tempdir, ...) read absl flags; pytest parses none.
from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(items):
  # tf.test.TestCase.test_session is a deprecated helper, not a test; pytest would
  # list it as skipped in every class.
  items[:] = [item for item in items if item.name != "test_session"]


import keras  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(autouse=True, scope="class")
def _keras_state_per_class():
  """Each test class leaves Keras's global state (names, the dtype policy, graphs) as it
  found it: two long-lived processes run the whole suite. No forced garbage collection
  here: one took 104 s in a test process (TensorFlow's objects are slow to free), and
  Python's own collections free the same objects anyway."""
  yield
  keras.backend.clear_session(free_memory=False)
