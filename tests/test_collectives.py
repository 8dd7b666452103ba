"""tf_fusion.collectives: one group of devices' launchers, shared in the process; what
they compute against NumPy; how many ran; the order of a device's launches; a
collective's failure said with its likely cause."""

import numpy as np
import tensorflow as tf

from tf_fusion import collectives as collectives_lib
from tests.harness import helpers

Collectives = collectives_lib.Collectives


class GroupTest(tf.test.TestCase):

  def test_one_launcher_set_per_group_in_the_process(self):
    devices = helpers.devices(2)
    short = [d.replace("/job:localhost/replica:0/task:0", "") for d in devices]
    first = Collectives.get(devices)
    self.assertIs(Collectives.get(short), first)     # the same devices, however named
    self.assertEqual(first.devices, collectives_lib.canonical_devices(devices))
    self.assertEqual((first.group_size, first.num_workers), (2, 1))
    # Another size is another group (the local and the global group of one device).
    self.assertIsNot(Collectives.get(devices, group_size=4), first)
    self.assertEqual(Collectives.get(devices, group_size=4).num_workers, 2)

  def test_workers_with_unequal_device_counts_are_refused(self):
    with self.assertRaisesRegex(ValueError, "not a multiple of the 3 local devices"):
      Collectives(collectives_lib.canonical_devices(helpers.devices(3)), 4)


class LaunchTest(tf.test.TestCase):
  """Three CPU devices, one group: each collective against NumPy, each counted."""

  def setUp(self):
    super().setUp()
    self.devices = collectives_lib.canonical_devices(helpers.devices(3))
    self.group = Collectives.get(self.devices)
    rng = np.random.RandomState(0)
    self.arrays = [rng.randn(3, 4).astype(np.float32) for _ in self.devices]

  def _run(self, method):
    @tf.function
    def run():
      buffers = []
      for device, array in zip(self.devices, self.arrays):
        with tf.device(device):
          buffers.append(tf.identity(tf.constant(array)))
      return getattr(self.group, method)(buffers)
    before = [collectives_lib.collectives_run(d) for d in self.devices]
    out = [t.numpy() for t in collectives_lib.run_as_graph(run)]
    after = [collectives_lib.collectives_run(d) for d in self.devices]
    self.assertEqual([b - a for a, b in zip(before, after)], [1, 1, 1])
    return out

  def test_all_reduce_sums_on_every_device(self):
    want = self.arrays[0] + self.arrays[1] + self.arrays[2]
    for got in self._run("all_reduce"):
      self.assertAllClose(got, want, rtol=1e-6, atol=1e-6)

  def test_all_gather_concatenates_in_group_order(self):
    for got in self._run("all_gather"):
      self.assertAllEqual(got, np.concatenate(self.arrays))

  def test_all_to_all_sends_row_i_to_member_i(self):
    for i, got in enumerate(self._run("all_to_all")):
      self.assertAllEqual(got, np.stack([a[i] for a in self.arrays]))

  def test_sum_across_one_worker_is_the_vector_itself(self):
    vector = np.array([1.5, -2.0, 3.25])
    self.assertAllEqual(self.group.sum_across_workers(vector), vector)


class RunAsGraphTest(tf.test.TestCase):

  def tearDown(self):
    tf.config.run_functions_eagerly(False)
    super().tearDown()

  def test_a_function_runs_as_a_graph_while_functions_run_eagerly(self):
    # Run eagerly, a collective of several devices waits for ever for the devices the
    # same thread would launch next; as a graph they launch together.
    seen = []

    @tf.function
    def fn(x):
      seen.append(tf.executing_eagerly())
      return x + 1

    tf.config.run_functions_eagerly(True)
    self.assertEqual(float(collectives_lib.run_as_graph(fn, tf.constant(1.0))), 2.0)
    self.assertEqual(seen, [False])
    self.assertTrue(tf.config.functions_run_eagerly())   # switched on again


class DeviceOrderTest(tf.test.TestCase):

  def test_each_launch_waits_for_the_previous_one_on_its_device(self):
    order = collectives_lib.DeviceOrder()
    with tf.Graph().as_default():
      first = order.after("/device:GPU:0", tf.constant(1.0, name="first"))
      x = tf.constant(2.0, name="x")
      held = order.before("/device:GPU:0", x)
      self.assertIn(first.op, held.op.control_inputs)
      self.assertIs(order.before("/device:GPU:1", x), x)   # another device: no wait


class ExplainErrorsTest(tf.test.TestCase):

  def test_a_timeout_names_its_likely_cause_and_keeps_its_type(self):
    for error in (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
                  tf.errors.AbortedError):
      with self.assertRaises(error) as raised:
        with collectives_lib.explain_errors(2, timeout_seconds=10):
          raise error(None, None, "Collective has timed out during execution.")
      self.assertEqual(str(raised.exception), (
          "tf_fusion: an all-reduce across 2 worker(s) did not complete "
          "(timeout_seconds=10): a peer worker died, hangs, or runs a different program. "
          "TensorFlow said: Collective has timed out during execution."))

  def test_other_errors_pass_unchanged(self):
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "^shapes differ$"):
      with collectives_lib.explain_errors(2):
        raise tf.errors.InvalidArgumentError(None, None, "shapes differ")


if __name__ == "__main__":
  tf.test.main()
