"""tf_fusion's strategies and their public seams: mirrored_strategy, logical CPU
devices, num_workers, fused_ops_of, and reductions where TF's MirroredStrategy cannot
call merge_call (a cond in the replica function)."""

import numpy as np
import tensorflow as tf

import tf_fusion
from tests import conftest
from tests.harness import helpers


def _all_reduce_in_a_cond(strategy):
  """Each replica adds its index + 1 over the group, inside a tf.cond of the replica
  function: where MirroredStrategy's merge_call is impossible."""

  def replica_fn():
    ctx = tf.distribute.get_replica_context()
    mine = tf.fill([5], tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32))
    return tf.cond(tf.constant(True),
                   lambda: ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine),
                   lambda: tf.zeros([5]))

  return strategy.experimental_local_results(tf.function(
      lambda: strategy.run(replica_fn))())


class StrategyTest(tf.test.TestCase):

  def test_logical_cpu_devices_lists_the_split(self):
    # The runtime has started (conftest split the CPU first): the split cannot change,
    # and the names are TF's own.
    want = [d.name for d in tf.config.list_logical_devices("CPU")]
    self.assertLen(want, conftest.NUM_DEVICES)
    self.assertEqual(tf_fusion.strategy.logical_cpu_devices(2), want[:2])
    self.assertEqual(tf_fusion.strategy.logical_cpu_devices(conftest.NUM_DEVICES), want)
    with self.assertRaisesRegex(ValueError, "already started with 4 CPU device"):
      tf_fusion.strategy.logical_cpu_devices(conftest.NUM_DEVICES + 4)

  def test_options_given_where_the_devices_go_are_refused(self):
    with self.assertRaisesRegex(TypeError, "options=FusionOptions"):
      tf_fusion.mirrored_strategy(tf_fusion.FusionOptions())

  def test_mirrored_strategy_reduces_with_fused_all_reduce(self):
    options = tf_fusion.FusionOptions(algorithm="ring", pack_bytes=1 << 20)
    strategy = tf_fusion.mirrored_strategy(helpers.devices(3), options)
    self.assertIsInstance(strategy, tf.distribute.MirroredStrategy)
    self.assertEqual(strategy.num_replicas_in_sync, 3)
    self.assertEqual(tf_fusion.strategy.num_workers(strategy), 1)
    ops = tf_fusion.fused_ops_of(strategy)
    self.assertIsInstance(ops, tf_fusion.FusedAllReduce)
    self.assertIs(ops.options, options)
    self.assertIsNone(tf_fusion.fused_ops_of(tf.distribute.MirroredStrategy(
        helpers.devices(2))))

  def test_an_all_reduce_inside_a_cond(self):
    """The sum over 4 replicas of 1..4 is 10 on every replica, through tf_fusion's packs
    (the collectives run: the counter moves)."""
    from tf_fusion import collectives as collectives_lib  # pylint: disable=g-import-not-at-top
    devices = helpers.devices(4)
    strategy = tf_fusion.mirrored_strategy(devices, tf_fusion.FusionOptions(
        algorithm="ring"))
    before = collectives_lib.collectives_run(devices[0])
    out = _all_reduce_in_a_cond(strategy)
    self.assertLen(out, 4)
    for r in out:
      self.assertAllEqual(r, np.full([5], 10.0))
    self.assertGreater(collectives_lib.collectives_run(devices[0]), before)

  def test_control_tf_mirrored_strategy_cannot_reduce_inside_a_cond(self):
    """The control case: TF's MirroredStrategy, even with tf_fusion's cross-device ops,
    raises in merge_call there (keras-team/keras#20582 is this error under Keras's
    gradient accumulation). If TF ever fixes it, this test says so."""
    strategy = tf.distribute.MirroredStrategy(
        helpers.devices(2), cross_device_ops=tf_fusion.FusedAllReduce())
    with self.assertRaisesRegex(RuntimeError, "merge_call. called while defining a new graph"):
      _all_reduce_in_a_cond(strategy)


if __name__ == "__main__":
  tf.test.main()
