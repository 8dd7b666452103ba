"""tf_fusion.calibration: the cost model's constants measured on the devices, and timings
that wait for the devices."""

from unittest import mock

import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import calibration
from tests.harness import helpers


class TimingTest(tf.test.TestCase):

  def test_every_call_is_timed_until_the_devices_are_done(self):
    """On GPUs a call returns before its work is done: each timed call must end with a
    device sync (else calibration and the measured autotuner time the enqueue)."""
    calls = []
    with mock.patch.object(calibration, "wait_for",
                           side_effect=lambda result: calls.append(("wait", result))):
      _, times = calibration.time_calls(lambda: calls.append("call") or "out", repeats=3,
                                     warmup=2)
    self.assertLen(times, 3)
    self.assertEqual(calls, ["call", ("wait", "out")] * 5)

  def test_wait_for_syncs_the_devices(self):
    with mock.patch.object(tf.test.experimental, "sync_devices") as sync:
      calibration.wait_for([tf.constant(1.0)])
    sync.assert_called_once()


class CalibrateTest(tf.test.TestCase):

  def test_calibration_measures_finite_constants_at_every_size(self):
    """What a calibration returns, not what it measures: on a busy machine a difference
    of two timings may come out 0 (the constants are kept >= 0), so no value is
    required to be positive."""
    sizes = (4 << 10, 64 << 10, 1 << 20)
    model = tf_fusion.calibrate(helpers.devices(2), sizes=sizes, repeats=2)
    self.assertEqual(model.algorithms, ("reduce_to_one", "ring"))
    for alg in model.algorithms:
      self.assertTrue(np.isfinite(model.alpha[alg]) and model.alpha[alg] >= 0)
      self.assertTrue(np.isfinite(model.beta[alg]) and model.beta[alg] >= 0)
      self.assertEqual([n for n, _ in model.points[alg]], list(sizes))
      self.assertTrue(all(np.isfinite(t) and t >= 0 for _, t in model.points[alg]))
    self.assertTrue(np.isfinite(model.copy_beta) and model.copy_beta >= 0)
    self.assertStartsWith(model.description, "calibrated on 1 worker(s) x 2 devices")


if __name__ == "__main__":
  tf.test.main()
