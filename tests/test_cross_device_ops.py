"""FusedAllReduce on 4 logical CPU devices against a NumPy reference."""

import itertools

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion._internal import tf as tf_internal
from tests.harness import helpers

SUM, MEAN = tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN

# A mix of dtypes and shapes: scalars, zero-size tensors, and one float32 tensor of
# 4.4 MB that is larger than the 4 MiB threshold.
SHAPES_AND_DTYPES = [
    ([3, 4], np.float32), ([], np.float32), ([0, 3], np.float32), ([300, 40], np.float32),
    ([5], np.float16), ([2, 2], np.float64), ([6], np.int32), ([1100 * 1000], np.float32),
    ([], np.float16), ([17], np.float32),
]


def _arrays(kind, seed=0, num_replicas=4):
  """Per replica, one array per tensor. "integers": values whose sums are exact."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(num_replicas):
    arrays = []
    for shape, dtype in SHAPES_AND_DTYPES:
      if kind == "integers" or np.dtype(dtype).kind == "i":
        arrays.append(rng.randint(-8, 9, size=shape).astype(dtype))
      else:
        arrays.append(rng.standard_normal(shape).astype(dtype))
    out.append(arrays)
  return out


def _reduce(strategy, ops, reduce_op, arrays, mode):
  values = [helpers.per_replica(strategy, [r[i] for r in arrays])
            for i in range(len(arrays[0]))]

  def body():
    results = ops.batch_reduce(reduce_op, [(v, v) for v in values])
    return [r.values for r in results]

  with strategy.scope():
    out = tf.function(body)() if mode == "graph" else body()
  return [[t.numpy() for t in per_device] for per_device in out]


# Pack sizes (none fused, some, the large tensor alone, all in one) x wire x algorithm
# x op x tf.function or eager: every pair of two settings (12 runs, not the product's 96).
_FACTORS = dict(pack_bytes=[0, 1024, 4 << 20, 1 << 40], compression=["none", "fp16"],
                algorithm=["ring", "reduce_to_one", "auto"], reduce_op=[SUM, MEAN],
                mode=["graph", "eager"])
_PARAMS = [
    dict(testcase_name=f"_{s['pack_bytes']}_{s['compression']}_{s['algorithm']}_"
         f"{s['reduce_op'].name}_{s['mode']}", **s)
    for s in helpers.all_pairs(**_FACTORS)
]


class FusedAllReduceTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.devices = helpers.devices(4)

  def _ops(self, **kwargs):
    return tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(**kwargs),
                                    cost_model=helpers.fixed_cost_model())

  @parameterized.named_parameters(*_PARAMS)
  def test_exact_sums_are_bit_exact(self, pack_bytes, compression, algorithm,
                                    reduce_op, mode):
    # Values whose sums are exact in every dtype: any summation order, any packing
    # and any wire dtype must give the NumPy result to the bit.
    ops = self._ops(pack_bytes=pack_bytes, compression=compression, algorithm=algorithm)
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    arrays = _arrays("integers")
    got = _reduce(strategy, ops, reduce_op, arrays, mode)
    for i, per_device in enumerate(got):
      want = helpers.reference([r[i] for r in arrays], reduce_op.name, compression)
      for value in per_device:
        self.assertEqual(value.dtype, want.dtype)
        self.assertAllEqual(value, want)
    self._check_plan(ops.last_plan, algorithm)

  def test_the_matrix_meets_every_pair_of_settings(self):
    for a, b in itertools.combinations(_FACTORS, 2):
      met = {(p[a], p[b]) for p in _PARAMS}
      self.assertEqual(met, set(itertools.product(_FACTORS[a], _FACTORS[b])), msg=(a, b))
    self.assertLen({p["testcase_name"] for p in _PARAMS}, len(_PARAMS))

  def _check_plan(self, plan, algorithm):
    fused = [i for i, (_, d) in enumerate(SHAPES_AND_DTYPES) if d != np.int32]
    self.assertEqual(sorted(i for e in plan for i in e.tensor_indices), fused)
    for entry in plan:
      if entry.bytes == 0:
        self.assertEqual(entry.algorithm, "none")  # Nothing to send.
      elif algorithm != "auto":
        self.assertEqual(entry.algorithm, algorithm)
      else:
        self.assertIn(entry.algorithm, ("ring", "reduce_to_one"))
      self.assertEqual(entry.tensor_count, len(entry.tensor_indices))

  @parameterized.product(algorithm=["ring", "reduce_to_one", "auto"],
                         compression=["none", "fp16"], reduce_op=[SUM, MEAN])
  def test_random_values(self, algorithm, compression, reduce_op):
    ops = self._ops(pack_bytes=1024, compression=compression, algorithm=algorithm)
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    arrays = _arrays("random", seed=3)
    got = _reduce(strategy, ops, reduce_op, arrays, "graph")
    for i, per_device in enumerate(got):
      want = helpers.reference([r[i] for r in arrays], reduce_op.name, compression)
      for value in per_device:
        self.assertAllEqual(value, per_device[0])  # Replicas agree to the bit.
      if algorithm == "reduce_to_one" or want.dtype.kind == "i":
        # Same summation order per element as the unfused reduction.
        self.assertAllEqual(per_device[0], want)
      else:
        # The ring adds in another order; fp16 sums differ by an fp16 ulp.
        tol = 2e-2 if (compression == "fp16" or want.dtype == np.float16) else 1e-5
        self.assertAllClose(per_device[0], want, rtol=tol, atol=tol)

  def _traceable_reduction(self, ops):
    """(strategy, tf.function reducing the "integers" arrays, the arrays)."""
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    arrays = _arrays("integers")
    values = [helpers.per_replica(strategy, [r[i] for r in arrays])
              for i in range(len(arrays[0]))]

    @tf.function
    def body():
      return [r.values for r in ops.batch_reduce(SUM, [(v, v) for v in values])]

    return strategy, body, arrays

  @parameterized.parameters("ring", "reduce_to_one")
  def test_one_collective_per_pack(self, algorithm):
    ops = self._ops(pack_bytes=1024, algorithm=algorithm)
    strategy, body, _ = self._traceable_reduction(ops)
    with strategy.scope():
      graph = body.get_concrete_function().graph
    types = [op.type for op in graph.get_operations()]
    num_packs = len(ops.last_plan)
    self.assertGreater(num_packs, 2)
    self.assertTrue(all(e.algorithm == algorithm for e in ops.last_plan))
    if algorithm == "ring":
      self.assertEqual(types.count("CollectiveReduceV2"), num_packs * len(self.devices))
    else:
      self.assertEqual(types.count("CollectiveReduceV2"), 0)
      # Each pack: a chain of (devices - 1) adds; the int32 value goes to AddN.
      self.assertEqual(types.count("AddV2"), num_packs * (len(self.devices) - 1))
    scopes = {op.name.split("/")[0] for op in graph.get_operations()
              if op.type in ("CollectiveReduceV2", "AddV2")}
    for entry in ops.last_plan:
      self.assertIn(tf_fusion.stats.pack_scope(entry), scopes)

  def test_only_the_last_pack_carries_the_timeout(self):
    # TF gives each timed collective a thread that sleeps for the whole timeout
    # (tensorflow#62466): one timed collective per device per step, not one per pack.
    ops = self._ops(pack_bytes=1024, algorithm="ring", timeout_seconds=30)
    strategy, body, arrays = self._traceable_reduction(ops)
    with strategy.scope():
      graph = body.get_concrete_function().graph
    collectives = [op for op in graph.get_operations() if op.type == "CollectiveReduceV2"]
    last = tf_fusion.stats.pack_scope(ops.last_plan[-1])
    self.assertGreater(len(ops.last_plan), 2)
    for op in collectives:
      want = 30.0 if op.name.startswith(last + "/") else 0.0
      self.assertEqual(op.get_attr("timeout_seconds"), want, op.name)
    self.assertLen([op for op in collectives if op.get_attr("timeout_seconds")],
                   len(self.devices))
    with strategy.scope():
      out = body()
    self.assertAllEqual(out[0][0], sum(r[0] for r in arrays))

  def test_unknown_shapes(self):
    ops = self._ops(pack_bytes=1 << 20, algorithm="ring")
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    arrays = [np.full([3, 2], r + 1.0, np.float32) for r in range(4)]

    @tf.function(input_signature=[tf.TensorSpec([None, 2])] * 4)
    def body(*per_device):
      parts = []
      for device, x in zip(self.devices, per_device):
        with tf.device(device):
          parts.append(tf.identity(x))
      known = tf_internal.per_replica(tuple(tf.ones([2]) for _ in self.devices))
      results = ops.batch_reduce(MEAN, [(tf_internal.per_replica(tuple(parts)),) * 2,
                                        (known, known)])
      return [r.values for r in results]

    with strategy.scope():
      unknown, known = body(*arrays)
    for value in unknown:
      self.assertAllEqual(value, np.full([3, 2], 2.5))
    self.assertEqual([e.bytes for e in ops.last_plan], [8, None])

  @parameterized.parameters("graph", "eager")
  def test_sparse_values_beside_dense_ones(self, mode):
    ops = self._ops(algorithm="ring")
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    dense = np.zeros([5, 2], np.float32)
    slices = []
    for r in range(4):
      dense[r % 5] += r + 1
      slices.append(tf.IndexedSlices(tf.fill([1, 2], r + 1.0), tf.constant([r % 5]),
                                     tf.constant([5, 2])))

    def body():
      value = strategy.experimental_distribute_values_from_function(
          lambda ctx: slices[ctx.replica_id_in_sync_group])
      dense_value = helpers.per_replica(strategy, [np.ones(3, np.float32)] * 4)
      results = ops.batch_reduce(SUM, [(value, value), (dense_value, dense_value)])
      return [tf.convert_to_tensor(v) for v in results[0].values], results[1].values

    with strategy.scope():
      sparse_sums, dense_sums = tf.function(body)() if mode == "graph" else body()
    for value in sparse_sums:
      self.assertAllEqual(value, dense)
    for value in dense_sums:
      self.assertAllEqual(value, [4.0, 4.0, 4.0])

  def test_empty_tensor_alone(self):
    # TF's CPU collective crashes on zero elements; an empty pack sends nothing.
    ops = self._ops(pack_bytes=1, algorithm="ring")
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    arrays = [[np.zeros([0, 3], np.float32), np.full([2], r + 1.0, np.float32)]
              for r in range(4)]
    got = _reduce(strategy, ops, SUM, arrays, "eager")
    self.assertEqual([e.algorithm for e in ops.last_plan], ["ring", "none"])
    self.assertEqual(got[0][0].shape, (0, 3))
    self.assertAllEqual(got[1][3], [10.0, 10.0])

  def test_deepcopy_shares_settings_and_models_not_traces(self):
    import copy  # pylint: disable=g-import-not-at-top
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(compression="fp16"),
                                   cost_model=helpers.fixed_cost_model())
    strategy = tf.distribute.MirroredStrategy(helpers.devices(2), cross_device_ops=ops)
    arrays = [[np.ones((3,), np.float32)], [np.full((3,), 2.0, np.float32)]]
    _reduce(strategy, ops, SUM, arrays, "eager")
    clone = copy.deepcopy(ops)
    self.assertIsInstance(clone, tf_fusion.FusedAllReduce)
    self.assertIs(clone.options, ops.options)
    devices = helpers.devices(2)
    self.assertIs(clone.cost_model(devices), ops.cost_model(devices))
    self.assertEqual(clone.last_plan, ())
    self.assertEmpty(clone._eager_fns)  # pylint: disable=protected-access
    got = _reduce(strategy, clone, SUM, arrays, "eager")
    self.assertAllEqual(got[0][0], [3.0, 3.0, 3.0])
    self.assertAllEqual(got[0][1], [3.0, 3.0, 3.0])

  def test_two_strategies_in_one_process_do_not_collide(self):
    results = []
    for devices in (self.devices[:2], self.devices, self.devices[1:3]):
      ops = self._ops(pack_bytes=64, algorithm="ring")
      strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
      arrays = [[np.full([8], r + 1.0, np.float32), np.full([3], 1.0, np.float32)]
                for r in range(len(devices))]
      got = _reduce(strategy, ops, SUM, arrays, "graph")
      results.append(got[0][0][0])
    self.assertEqual(results, [3.0, 10.0, 3.0])

  def test_hierarchical_on_one_worker_says_so(self):
    ops = self._ops(algorithm="hierarchical")
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    arrays = [[np.full([4], r + 1.0, np.float32)] for r in range(4)]
    with self.assertLogs(level="WARNING") as logs:
      got = _reduce(strategy, ops, SUM, arrays, "graph")
    self.assertAllEqual(got[0][0], [10.0] * 4)
    self.assertEqual(ops.last_plan[0].algorithm, "reduce_to_one")
    self.assertIn("hierarchical on one worker", ops.last_plan[0].note)
    self.assertIn("hierarchical on one worker", "\n".join(logs.output))

  def test_fused_ops_of(self):
    ops = self._ops()
    strategy = tf.distribute.MirroredStrategy(self.devices, cross_device_ops=ops)
    self.assertIs(tf_fusion.fused_ops_of(strategy), ops)
    self.assertIsNone(tf_fusion.fused_ops_of(tf.distribute.MirroredStrategy(self.devices)))
    self.assertIsInstance(tf_fusion.fused_ops_of(tf_fusion.mirrored_strategy(self.devices)),
                          tf_fusion.FusedAllReduce)

  def test_options_type_is_checked(self):
    with self.assertRaisesRegex(TypeError, "FusionOptions"):
      tf_fusion.FusedAllReduce({"pack_bytes": 0})


if __name__ == "__main__":
  tf.test.main()
