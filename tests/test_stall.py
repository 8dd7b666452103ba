"""tf_fusion.stall: StallWatch within one process (no abort): what its timer reports, and
when it must not. Across processes (a stuck worker named, its collectives aborted):
tests/test_multi_worker.py::MultiWorkerFailureTest."""

import time

import keras
import numpy as np
import tensorflow as tf

import tf_fusion


def _data():
  rng = np.random.RandomState(0)
  return rng.randn(64, 4).astype(np.float32), np.zeros((64, 2), np.float32)


class _RaiseAt(keras.callbacks.Callback):
  """Raises as batch `batch` begins: a fit that ends with an error mid-step."""

  def __init__(self, batch):
    super().__init__()
    self.batch = batch

  def on_train_batch_begin(self, batch, logs=None):
    if batch == self.batch:
      raise RuntimeError("the input broke")


class _WaitForReport(keras.layers.Layer):
  """Inside the compiled step, its `call`-th run waits until `watch` has reported: a
  stall of the step itself (not of a callback), however slow the machine."""

  def __init__(self, watch, call):
    super().__init__()
    self.watch, self.call_to_hold, self.calls = watch, call, 0

  def _wait(self, x):
    self.calls += 1
    deadline = time.monotonic() + 60
    while (self.calls == self.call_to_hold and not self.watch.reports
           and time.monotonic() < deadline):
      time.sleep(0.05)
    return x

  def call(self, x):
    y = tf.py_function(self._wait, [x], x.dtype)
    y.set_shape(x.shape)
    return y


class StallWatchTest(tf.test.TestCase):
  """One process, no abort (abort=False): what the timer reports, and when it must not."""

  def _fit(self, *callbacks, hold=()):
    model = keras.Sequential([keras.Input((4,)), *hold, keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=list(callbacks))

  def test_a_step_held_inside_fit_is_reported(self):
    watch = tf_fusion.StallWatch(timeout_seconds=0.2, abort=False)
    self._fit(watch, hold=[_WaitForReport(watch, call=3)])
    self.assertLen(watch.reports, 1)
    self.assertIn("has not finished after 0.2 s on worker 0", watch.reports[0])

  def test_a_fit_that_raised_leaves_no_report_behind(self):
    """Keras calls no end-of-batch callback when fit raises, so the timer is still armed
    as fit leaves; when it fires the step is long over. Reporting then would abort (by
    default) the collectives of whatever the process runs next."""
    watch = tf_fusion.StallWatch(timeout_seconds=0.2, abort=False)
    with self.assertRaisesRegex(RuntimeError, "the input broke"):
      self._fit(watch, _RaiseAt(batch=2))
    timer = watch._timer  # pylint: disable=protected-access
    self.assertIsNotNone(timer)     # armed as fit left: the case this test is about
    timer.join()
    self.assertEqual(watch.reports, [])


if __name__ == "__main__":
  tf.test.main()
