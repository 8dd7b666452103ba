"""One contract test per function of the seam to TensorFlow's and Keras's internals.

tf_fusion/_internal/{tf,keras}.py are the only modules that touch private TF/Keras
names. Each test here checks what tf_fusion relies on a seam function to do, against
TF's or Keras's public behaviour, so that an upgrade that moves an internal fails here,
under the function's name.
"""

import inspect
import json
import os
import threading

import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion._internal import keras as keras_internal
from tf_fusion._internal import python as python_internal
from tf_fusion._internal import tf as tf_internal
from tests.harness import helpers


class PythonSeamTest(tf.test.TestCase):

  def test_thread_stack_holds_the_callers_frames_while_they_run(self):
    here = inspect.currentframe()
    self.assertIn(here, python_internal.thread_stack(threading.get_ident()))
    self.assertEqual(python_internal.thread_stack(-1), [])


class TensorFlowSeamTest(tf.test.TestCase):

  def test_versions_are_the_tested_ones(self):
    self.assertTrue(tf.__version__.startswith(tf_internal.TESTED_TENSORFLOW))
    self.assertTrue(keras.__version__.startswith(keras_internal.TESTED_KERAS))

  def test_canonical_device(self):
    self.assertEqual(tf_internal.canonical_device("/cpu:1"),
                     "/job:localhost/replica:0/task:0/device:CPU:1")

  def test_per_replica_mirrored_and_devices_match(self):
    devices = helpers.devices(2)
    values = []
    for i, d in enumerate(devices):
      with tf.device(d):
        values.append(tf.constant(float(i)))
    value = tf_internal.per_replica(values)
    self.assertTrue(tf_internal.is_per_replica(value))
    self.assertFalse(tf_internal.is_per_replica(values[0]))
    self.assertTrue(tf_internal.devices_match(value, value))
    self.assertFalse(tf_internal.devices_match(value, devices[0]))
    strategy = tf.distribute.MirroredStrategy(devices)
    self.assertEqual(strategy.experimental_local_results(value), tuple(values))
    mirrored = tf_internal.mirrored(values)
    self.assertIsInstance(mirrored, tf.distribute.DistributedValues)
    self.assertFalse(tf_internal.is_per_replica(mirrored))

  def test_is_mirrored_variable(self):
    strategy = tf.distribute.MirroredStrategy(helpers.devices(2))
    with strategy.scope():
      v = tf.Variable(1.0)
    self.assertTrue(tf_internal.is_mirrored_variable(v))
    self.assertFalse(tf_internal.is_mirrored_variable(tf.Variable(1.0)))

  def test_launcher_draws_keys_from_the_callable(self):
    keys = tf_internal.collective_keys(1 << 29)
    drawn = []

    def next_key():
      drawn.append(len(drawn))
      return tf.constant(7 + len(drawn), tf.int32)

    launcher = tf_internal.CollectiveLauncher(
        keys.get_group_key(["/cpu:0"] + ["seam-test"]), 1, keys,
        tf_internal.canonical_device("/cpu:0"),
        tf.distribute.experimental.CommunicationOptions(), next_key)
    out = tf.function(lambda x: launcher.all_reduce(x))(tf.constant([1.0, 2.0]))
    self.assertAllEqual(out, [1.0, 2.0])
    self.assertLen(drawn, 1)

  def test_collective_all_reduce_launchers_and_devices(self):
    devices = tuple(tf_internal.canonical_device(d) for d in helpers.devices(2))
    ops = tf_internal.collective_all_reduce(devices, 2)
    self.assertTrue(tf_internal.is_collective_all_reduce(ops))
    self.assertFalse(tf_internal.is_collective_all_reduce(tf.distribute.NcclAllReduce()))
    self.assertEqual(tf_internal.local_devices_of(ops), devices)
    made = []
    tf_internal.replace_launchers(ops, lambda *args: made.append(args) or args)
    self.assertEqual([m[2] for m in made], list(devices))
    self.assertTrue(all(m[1] == 2 for m in made))

  def test_nccl_all_sum_builds_nccl_ops(self):
    graph = tf.Graph()
    with graph.as_default():
      parts = []
      for i in range(2):
        with tf.device(f"/device:GPU:{i}"):
          parts.append(tf.constant([1.0]))
      tf_internal.nccl_all_sum(parts)
    self.assertIn("NcclAllReduce", {op.type for op in graph.get_operations()})

  def test_host_int64_counter_is_a_plain_variable(self):
    strategy = tf.distribute.MirroredStrategy(helpers.devices(2))
    with strategy.scope():
      counter = tf_internal.host_int64_counter("/cpu:0", "seam_counter")
    self.assertFalse(tf_internal.is_mirrored_variable(counter))
    self.assertEqual(counter.dtype, tf.int64)
    self.assertEqual(int(counter.assign_add(2)), 2)

  def test_plain_variables_inside_a_strategy_scope(self):
    strategy = tf_fusion.strategy.tf_mirrored_strategy(helpers.devices(2))
    with strategy.scope():
      mirrored = tf.Variable(1.0)
      with tf_internal.plain_variables(), tf.device(helpers.devices(2)[1]):
        plain = tf.Variable([1.0, 2.0], name="plain")
        wrapped = keras.Variable(tf.zeros([3]), name="wrapped")
    self.assertTrue(tf_internal.is_mirrored_variable(mirrored))
    for v in (plain, wrapped.value):
      self.assertFalse(tf_internal.is_mirrored_variable(v))
      self.assertEqual(v.device, tf_internal.canonical_device(helpers.devices(2)[1]))

  def test_reduce_scatter_is_tensorflows_op(self):
    """The launcher builds CollectiveReduceScatterV2 with the launcher's hint. It is
    traced, not run: on CPUs TensorFlow has no implementation of it, and running it
    aborts every later collective of the process ("did not find collective
    implementation"; why the sharded update uses the all-to-all off NCCL)."""
    from tf_fusion.collectives import Collectives  # pylint: disable=g-import-not-at-top
    collectives = Collectives.get(helpers.devices(2))
    fn = tf.function(lambda: collectives.reduce_scatter(
        [tf.zeros([4]), tf.zeros([4])]))
    ops = [op for op in fn.get_concrete_function().graph.get_operations()
           if op.type == "CollectiveReduceScatterV2"]
    self.assertLen(ops, 2)
    self.assertEqual({op.get_attr("communication_hint") for op in ops}, {b"auto"})

  def test_all_to_all_runs_on_cpus(self):
    from tf_fusion.collectives import Collectives  # pylint: disable=g-import-not-at-top
    devices = helpers.devices(2)
    collectives = Collectives.get(devices)

    def exchange():
      rows = []
      for i, d in enumerate(devices):
        with tf.device(d):
          rows.append(tf.constant([[1.0, 2.0], [3.0, 4.0]]) + 10.0 * i)
      return collectives.all_to_all(rows)

    first, second = tf.function(exchange)()
    self.assertAllEqual(first, [[1.0, 2.0], [11.0, 12.0]])    # row 0 of each member
    self.assertAllEqual(second, [[3.0, 4.0], [13.0, 14.0]])   # row 1 of each member

  def test_gather_through_tf_ops(self):
    strategy = tf.distribute.MirroredStrategy(helpers.devices(2))
    value = helpers.per_replica(strategy, [np.array([1.0], np.float32),
                                           np.array([2.0], np.float32)])
    got = tf_internal.gather(tf.distribute.ReductionToOneDevice(), value, value, 0)
    self.assertAllEqual(strategy.experimental_local_results(got)[0], [1.0, 2.0])

  def test_cross_device_ops_hooks_reach_the_public_methods(self):
    class Ops(tf_internal.CrossDeviceOpsHooks):
      num_workers = 3

      def all_reduce_in_replica(self, *args):
        return ("reduce", args)

      def gather_exact(self, *args):
        return ("gather", args)

    ops = Ops()
    self.assertEqual(ops._num_between_graph_workers, 3)  # pylint: disable=protected-access
    self.assertEqual(ops._all_reduce(1, 2, 3, 4), ("reduce", (1, 2, 3, 4)))  # pylint: disable=protected-access
    self.assertEqual(ops._gather_implementation(1, 2, 3, 4), ("gather", (1, 2, 3, 4)))  # pylint: disable=protected-access
    # TF's MirroredExtended calls exactly these names.
    for name in ("_all_reduce", "_gather_implementation", "_num_between_graph_workers"):
      self.assertTrue(hasattr(tf.distribute.CrossDeviceOps, name), name)

  def test_merge_call_impossible_only_in_a_branch_graph(self):
    self.assertFalse(tf_internal.merge_call_impossible())
    strategy = tf_fusion.mirrored_strategy(helpers.devices(2))
    seen = []

    def step():
      seen.append(tf_internal.merge_call_impossible())
      tf.cond(tf.constant(True),
              lambda: seen.append(tf_internal.merge_call_impossible()) or tf.constant(1),
              lambda: tf.constant(0))
    tf.function(lambda: strategy.run(step))()
    self.assertEqual(seen, [False, True, False, True])

  def test_strategy_reduces_without_merge_call(self):
    self.assertTrue(tf_internal.strategy_reduces_without_merge_call())  # default strategy
    strategy = tf_fusion.mirrored_strategy(helpers.devices(2))
    seen = []

    def step():
      seen.append(tf_internal.strategy_reduces_without_merge_call())
      tf.cond(tf.constant(True), lambda: seen.append(
          tf_internal.strategy_reduces_without_merge_call()) or tf.constant(1),
              lambda: tf.constant(0))
    tf.function(lambda: strategy.run(step))()
    self.assertEqual(seen, [False, True, False, True])

  def test_in_replica_step_in_replica_threads_and_their_merge_calls(self):
    self.assertFalse(tf_internal.in_replica_step())
    strategy = tf_fusion.mirrored_strategy(helpers.devices(2))
    seen = []

    def merge(distribution):
      del distribution
      seen.append(("merge", tf_internal.in_replica_step()))

    def step():
      seen.append(("replica", tf_internal.in_replica_step()))
      tf.distribute.get_replica_context().merge_call(merge)
    tf.function(lambda: strategy.run(step))()
    self.assertEqual(seen, [("replica", True), ("replica", True), ("merge", True)])
    self.assertFalse(tf_internal.in_replica_step())

  def test_strategy_accessors(self):
    ops = tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(helpers.devices(2), cross_device_ops=ops)
    self.assertIs(tf_internal.cross_device_ops_of(strategy), ops)
    other = tf.distribute.ReductionToOneDevice()
    tf_internal.set_cross_device_ops(strategy, other)
    self.assertIs(tf_internal.cross_device_ops_of(strategy), other)
    self.assertEqual(tf_internal.num_workers(strategy), 1)
    self.assertEqual(tf_internal.worker_index(strategy, default=5), 5)
    self.assertIsNone(tf_internal.cross_device_ops_of(tf.distribute.get_strategy()))

  def test_fresh_mirrored_collective_keys_moves_the_base(self):
    before = tf.distribute.MirroredStrategy._collective_key_base  # pylint: disable=protected-access
    tf_internal.fresh_mirrored_collective_keys(7)
    self.assertEqual(tf.distribute.MirroredStrategy._collective_key_base, before + 7)  # pylint: disable=protected-access

  def test_extended_classes_are_tf_strategies(self):
    strategy = tf_fusion.mirrored_strategy(helpers.devices(2))
    self.assertIsInstance(strategy.extended, tf_internal.MirroredExtended)
    self.assertIsInstance(strategy, tf.distribute.MirroredStrategy)
    self.assertEqual(strategy.num_replicas_in_sync, 2)

  def test_expand_tasks_per_node(self):
    self.assertEqual(tf_internal.expand_tasks_per_node("2(x3),1"), [2, 2, 2, 1])

  def test_op_determinism_follows_tensorflows_switch(self):
    self.assertFalse(tf_internal.op_determinism())
    tf.config.experimental.enable_op_determinism()
    try:
      self.assertTrue(tf_internal.op_determinism())
    finally:
      tf_internal.disable_op_determinism()
    self.assertFalse(tf_internal.op_determinism())

  def test_cluster_values_and_abort_need_a_cluster(self):
    # One process has no coordination service: both raise rather than hang.
    with self.assertRaises((tf.errors.OpError, ValueError, RuntimeError)):
      tf_internal.get_cluster_value("tf_fusion/seam-test", 10)
    self.assertTrue(callable(tf_internal.abort_collectives))
    self.assertTrue(callable(tf_internal.set_cluster_value))


class KerasSeamTest(tf.test.TestCase):

  def _sgd(self, **kwargs):
    opt = keras.optimizers.SGD(0.5, **kwargs)
    v = keras.Variable([1.0, 2.0], name="w")
    opt.build([v])
    return opt, v

  def test_skip_all_reduce(self):
    opt, _ = self._sgd()
    self.assertTrue(keras_internal.has_all_reduce_step(opt))
    keras_internal.skip_all_reduce(opt, lambda pairs: "skipped")
    self.assertEqual(opt._all_reduce_sum_gradients([]), "skipped")  # pylint: disable=protected-access

  def test_all_reduce_skipped(self):
    opt, _ = self._sgd()
    self.assertFalse(keras_internal.all_reduce_skipped(opt))
    keras_internal.skip_all_reduce(opt, list)
    self.assertTrue(keras_internal.all_reduce_skipped(opt))

  def test_wrapped_steps_are_the_ones_apply_runs(self):
    """tf_fusion's wrappers (installed at import) sit on the methods Keras's `apply`
    calls: clipping, the optimizer's all-reduce, LossScaleOptimizer.apply."""
    calls = []
    for name in ("_clip_gradients", "_all_reduce_sum_gradients"):
      method = getattr(keras.optimizers.Optimizer, name)
      self.assertIsNotNone(getattr(method, "_tf_fusion_wrapper", None), name)
    self.assertIsNotNone(getattr(keras.optimizers.LossScaleOptimizer.apply,
                                 "_tf_fusion_wrapper", None))

    def spy(name):
      def wrapper(original, optimizer, *args):
        calls.append(name)
        return original(optimizer, *args)
      return wrapper

    saved = {n: getattr(keras.optimizers.Optimizer, n)
             for n in ("_clip_gradients", "_all_reduce_sum_gradients")}
    saved_apply = keras.optimizers.LossScaleOptimizer.apply
    try:
      keras_internal.wrap_clip_gradients(spy("clip"))
      keras_internal.wrap_all_reduce_gradients(spy("all_reduce"))
      keras_internal.wrap_loss_scale_apply(spy("loss_scale_apply"))
      v = keras.Variable([1.0, 2.0], name="w")
      opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5))
      opt.apply([tf.constant([0.5, 0.5])], [v])
    finally:
      for name, method in saved.items():
        setattr(keras.optimizers.Optimizer, name, method)
      keras.optimizers.LossScaleOptimizer.apply = saved_apply
    self.assertEqual(calls, ["loss_scale_apply", "clip", "all_reduce"])

  def test_clip_decay_update_match_apply(self):
    g = tf.constant([3.0, 4.0])
    ref, ref_v = self._sgd(clipnorm=1.0, weight_decay=0.1)
    ref.apply([g], [ref_v])
    opt, v = self._sgd(clipnorm=1.0, weight_decay=0.1)
    clipped = keras_internal.clip_gradients(opt, [g])
    self.assertAllClose(clipped[0], [0.6, 0.8])
    keras_internal.apply_weight_decay(opt, [v])
    keras_internal.update_step(opt, clipped, [v])
    self.assertAllClose(v, ref_v)

  def test_sharding_hooks_sit_on_the_steps_apply_runs(self):
    for name in ("add_variable_from_reference", "_backend_update_step",
                 "_apply_weight_decay"):
      method = getattr(keras.optimizers.Optimizer, name)
      self.assertIsNotNone(getattr(method, "_tf_fusion_wrapper", None), name)
    # Keras's apply runs decay and the update step through these names.
    calls = []
    opt, v = self._sgd(weight_decay=0.1)
    opt._apply_weight_decay = lambda vs: calls.append("decay")  # pylint: disable=protected-access
    opt._backend_update_step = lambda g, vs, lr: calls.append("update")  # pylint: disable=protected-access
    opt.apply([tf.constant([1.0, 1.0])], [v])
    self.assertEqual(calls, ["decay", "update"])

  def test_plain_weight_decay_slot_and_tracking(self):
    opt = keras.optimizers.SGD(0.1, weight_decay=0.5)
    v = keras.Variable([1.0, 2.0], name="w")
    opt.build([v])
    plain = tf.Variable([2.0, 4.0])
    keras_internal.decoupled_weight_decay(opt, [plain])
    self.assertAllClose(plain, [2.0 - 2.0 * 0.05, 4.0 - 4.0 * 0.05])
    self.assertTrue(keras_internal.uses_weight_decay(opt, plain))
    lars = tf_fusion.LARS(0.1, weight_decay=0.5)
    lars.build([plain])
    keras_internal.decoupled_weight_decay(lars, [plain])   # LARS couples its own decay
    self.assertAllClose(plain, [1.9, 3.8])
    slot = keras_internal.add_plain_slot(opt, plain, "momentum")
    self.assertEqual(tuple(slot.shape), (2,))
    count = len(opt.variables)
    keras_internal.track_variable(opt, v)
    self.assertLen(opt.variables, count + 1)
    self.assertIs(keras_internal.raw_iterations(opt), opt._iterations)  # pylint: disable=protected-access

  def test_tracked_variables_and_overwrite(self):
    opt, v = self._sgd()
    self.assertEqual([x.path for x in keras_internal.tracked_variables(opt)], [v.path])
    self.assertFalse(keras_internal.overwrites_with_gradient(opt, v))
    v.overwrite_with_gradient = True
    self.assertTrue(keras_internal.overwrites_with_gradient(opt, v))

  def test_accumulators_and_batches(self):
    opt, v = self._sgd(gradient_accumulation_steps=2)
    (acc,) = keras_internal.accumulators(opt, [v])
    keras_internal.add_to_accumulators(opt, [tf.constant([1.0, 1.0])], [acc])
    self.assertAllEqual(acc, [1.0, 1.0])
    keras_internal.reset_accumulators(opt)
    self.assertAllEqual(acc, [0.0, 0.0])
    opt.apply([tf.constant([1.0, 1.0])], [v])
    self.assertEqual(int(keras_internal.batches_seen(opt)), 1)
    self.assertEqual(int(opt.iterations), 0)

  def test_non_finite_step_halves_the_scale(self):
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1),
                                              initial_scale=8.0)
    opt.build([keras.Variable([1.0])])
    keras_internal.non_finite_step(opt)()
    self.assertEqual(float(opt.dynamic_scale), 4.0)

  def test_backup_metadata_and_save(self):
    backup_dir = self.create_tempdir().full_path
    backup = keras.callbacks.BackupAndRestore(backup_dir, save_freq=False)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    backup.set_model(model)
    backup.on_epoch_end(2)   # now in epoch 3; save_freq=False writes nothing
    self.assertIsNone(tf_fusion.callbacks.backup_epoch(backup))
    keras_internal.backup_now(backup)
    path = keras_internal.backup_metadata_path(backup)
    with open(path) as f:
      self.assertEqual(json.load(f)["epoch"], 3)
    self.assertTrue(os.path.exists(os.path.join(backup_dir, "latest.weights.h5")))
    self.assertEqual(tf_fusion.callbacks.backup_epoch(backup), 3)


if __name__ == "__main__":
  tf.test.main()
