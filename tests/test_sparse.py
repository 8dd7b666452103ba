"""IndexedSlices gradients in the fused plan (FusionOptions.sparse): gathered together
or densified, against the dense sum computed in NumPy; the plan's choice and reasons;
the collectives a gather costs; a transformer's training against one device."""

import itertools

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import sparse
from tf_fusion import stats
from tests.harness import helpers
from tests.harness import training_cases

SUM, MEAN = tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN
TABLES = ((6, (3,)), (4, (2, 2)), (5, (3,)))   # (rows of the table, shape of a row)


def _ops(option, algorithm="ring", cost_model=None, **kwargs):
  return tf_fusion.FusedAllReduce(
      tf_fusion.FusionOptions(pack_bytes=64, first_pack_bytes=0, algorithm=algorithm,
                              sparse=option, **kwargs),
      cost_model=cost_model or helpers.fixed_cost_model())


def _data(rows, seed=0, dtype=np.float32):
  """Per replica, per table: (values, indices); few table rows, so indices repeat."""
  rng = np.random.RandomState(seed)
  return [[(rng.randn(rows[r], *row).astype(dtype), rng.randint(0, n, rows[r]))
           for n, row in TABLES] for r in range(len(rows))]


def _numpy_sum(data, k):
  n, row = TABLES[k]
  out = np.zeros((n,) + row, np.float64)
  for replica in data:
    values, indices = replica[k]
    np.add.at(out, indices, values.astype(np.float64))
  return out


def _distribute(strategy, data, k, index_dtype=tf.int64):
  n, row = TABLES[k]
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.IndexedSlices(
          tf.constant(data[ctx.replica_id_in_sync_group][k][0]),
          tf.constant(data[ctx.replica_id_in_sync_group][k][1], index_dtype),
          tf.constant((n,) + row, tf.int64)))


class SparseReductionTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      (f"_{option}_{alg}_{rows}_{op.name}_{mode}", option, alg, rows, op, mode)
      for option, alg, rows, (op, mode) in itertools.product(
          ("gather", "dense", "auto"), ("ring", "reduce_to_one"), ("equal", "different"),
          ((SUM, "function"), (MEAN, "eager"))))
  def test_equals_the_dense_sum(self, option, algorithm, rows, reduce_op, mode):
    ops = _ops(option, algorithm)
    strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=ops)
    data = _data([3, 3, 3, 3] if rows == "equal" else [2, 5, 0, 3])
    dense = [np.full(7, r + 1.0, np.float32) for r in range(4)]

    def body():
      values = [_distribute(strategy, data, k, tf.int32 if k == 1 else tf.int64)
                for k in range(len(TABLES))]
      values.insert(1, helpers.per_replica(strategy, dense))
      results = ops.batch_reduce(reduce_op, [(v, v) for v in values])
      return [[tf.convert_to_tensor(t) for t in r.values] for r in results]

    with strategy.scope():
      got = tf.function(body)() if mode == "function" else body()
    divisor = 4 if reduce_op == MEAN else 1
    want = [_numpy_sum(data, 0), np.full(7, 10.0), _numpy_sum(data, 1), _numpy_sum(data, 2)]
    for replicas, w in zip(got, want):
      self.assertLen(replicas, 4)
      for t in replicas:
        self.assertAllClose(t, w / divisor, rtol=1e-6, atol=1e-6)
    kinds = {e.algorithm for e in ops.last_plan}
    gather = "gather" if algorithm == "ring" else "gather_to_one"
    if option == "gather" or (option == "auto" and rows == "different"):
      self.assertIn(gather, kinds)
    if option == "dense":
      self.assertFalse(kinds & set(sparse.GATHERS))
      self.assertCountEqual(sum((e.densified for e in ops.last_plan), ()), [0, 2, 3])

  def test_the_gather_is_one_pack_per_dtype_after_the_dense_packs(self):
    ops = _ops("gather")
    strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=ops)
    data32, data16 = _data([2, 2, 2, 2]), _data([2, 2, 2, 2], seed=1, dtype=np.float16)

    def body():
      values = [_distribute(strategy, data32, 0), _distribute(strategy, data16, 1),
                helpers.per_replica(strategy, [np.ones(3, np.float32)] * 4),
                _distribute(strategy, data32, 2)]
      results = ops.batch_reduce(SUM, [(v, v) for v in values])
      return [tf.convert_to_tensor(r.values[0]) for r in results]

    with strategy.scope():
      got = tf.function(body)()
    self.assertAllClose(got[1], _numpy_sum(data16, 1), rtol=2e-3, atol=2e-3)
    self.assertEqual([(e.algorithm, e.dtype.name, e.tensor_indices) for e in ops.last_plan],
                     [("ring", "float32", (2,)), ("gather", "float32", (0, 3)),
                      ("gather", "float16", (1,))])
    # Per replica: 2 rows x (3 values x 4 B + an 8 B index) for each float32 table.
    self.assertEqual(ops.last_plan[1].bytes, 2 * (2 * 3 * 4 + 2 * 8))
    self.assertIn("sparse='gather'", stats.summarize(ops.last_plan))

  def test_collectives_of_a_gather(self):
    """Three tables, rows known: one all-gather of values and one of indices; rows
    not the same everywhere: one more, of the counts. TF runs 3 or 4 per table."""
    for rows, want in (([3, 3, 3, 3], 2), ([1, 2, 3, 4], 3)):
      ops = _ops("gather")
      strategy = tf.distribute.MirroredStrategy(helpers.devices(4),
                                                cross_device_ops=ops)
      with strategy.scope():
        graph = tf.function(_gather_all(ops, strategy, _data(rows))
                            ).get_concrete_function().graph
      gathers = [op for op in graph.get_operations() if op.type == "CollectiveGatherV2"]
      self.assertLen(gathers, want * 4, msg=rows)   # per device
    # To one device and back: copies and a concat, no collective at all.
    ops = _ops("gather", "reduce_to_one")
    strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=ops)
    with strategy.scope():
      graph = tf.function(_gather_all(ops, strategy, _data([1, 2, 3, 4]))
                          ).get_concrete_function().graph
    self.assertEqual([e.algorithm for e in ops.last_plan], ["gather_to_one"])
    self.assertFalse([op for op in graph.get_operations() if "Collective" in op.type])

  def test_choice_by_bytes_and_cost_model(self):
    wire = tf_fusion.Compression.get("none").wire_dtype
    big_table = sparse.SparseSpec(tf.float32, (768,), 4096, (30522, 768), tf.int64)
    ring = tf_fusion.CostModel({"ring": 1e-5}, {"ring": 1e-9})
    # 4 x 12.6 MB of rows (as a ring all-reduce of 25 MB) against a 94 MB table.
    choice, reason = sparse.choose(big_table, "auto", 4, wire, ring)
    self.assertEqual(choice, "gather")
    self.assertIn("4 x 12615680 B of rows", reason)
    # Where the table's best algorithm is 10x cheaper per byte than the ring, the
    # table wins: the choice follows the model, not the bytes alone.
    self.assertEqual(sparse.choose(big_table, "auto", 4, wire,
                                   helpers.fixed_cost_model())[0], "dense")
    # On one worker the gather may also go to one device and back, priced as
    # reduce_to_one of (G+1)/2 x the rows: cheaper than the table here.
    both = (sparse.GATHER, sparse.GATHER_TO_ONE)
    self.assertEqual(sparse.choose(big_table, "auto", 4, wire, helpers.fixed_cost_model(),
                                   both)[0], "gather")
    model = helpers.fixed_cost_model()
    self.assertEqual(sparse.gather_cost(model, 12615680, 4, both)[0], "gather_to_one")
    self.assertEqual(sparse.gather_cost(model, 1000, 4, both)[0], "gather")   # alpha
    self.assertEqual(sparse.gather_cost(model, 12615680, 4)[0], "gather")   # across workers
    small_table = sparse.SparseSpec(tf.float32, (8,), 4096, (10, 8), tf.int64)
    self.assertEqual(sparse.choose(small_table, "auto", 4, wire)[0], "dense")
    self.assertEqual(sparse.choose(small_table, "gather", 4, wire)[0], "gather")
    unknown = sparse.SparseSpec(tf.float32, (8,), None, (10, 8), tf.int64)
    self.assertEqual(sparse.choose(unknown, "auto", 4, wire)[0], "gather")
    self.assertEqual(sparse.choose(unknown, "dense", 4, wire)[0], "dense")
    # The 16-bit wire halves the dense table's bytes, never the gathered rows'.
    fp16 = tf_fusion.Compression.get("fp16").wire_dtype
    self.assertEqual(small_table.dense_nbytes(fp16), 10 * 8 * 2)

  def test_a_near_tie_goes_to_the_fewer_bytes_not_to_the_timing(self):
    """A 256-byte table whose 4 replicas each bring 268 rows: gathering moves ~34 KB,
    densifying 256 B, and both are one launch (205 us against 205 us, or 10% apart
    either way in a noisy calibration): the table, in every case. With a large table
    and few rows the same tie goes to the gather."""
    wire = tf_fusion.Compression.get("none").wire_dtype
    table = sparse.SparseSpec(tf.float32, (8,), 268, (8, 8), tf.int64)
    for leaning in (0.9, 1.0, 1.1):
      # The gather is priced as the ring of G·b/2; reduce_to_one prices the table.
      model = tf_fusion.CostModel({"ring": 205e-6 * leaning, "reduce_to_one": 205e-6},
                                  {"ring": 0.0, "reduce_to_one": 0.0})
      choice, reason = sparse.choose(table, "auto", 4, wire, model)
      self.assertEqual(choice, "dense", leaning)
      self.assertIn("too close to call: the fewer bytes", reason)
    large = sparse.SparseSpec(tf.float32, (8,), 4, (1000, 8), tf.int64)
    self.assertEqual(sparse.choose(large, "auto", 4, wire, model)[0], "gather")

  def test_option_is_checked(self):
    with self.assertRaisesRegex(ValueError, "sparse='both' is not valid; valid values: "
                                "auto, gather, dense"):
      tf_fusion.FusionOptions(sparse="both")
    self.assertEqual(tf_fusion.FusionOptions.from_env({"TF_FUSION_SPARSE": "Dense"}).sparse,
                     "dense")


def _gather_all(ops, strategy, data):
  def body():
    values = [_distribute(strategy, data, k) for k in range(len(TABLES))]
    return [r.values[0].values for r in ops.batch_reduce(SUM, [(v, v) for v in values])]
  return body


class EmbeddingTrainingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("_sgd_gather", "sgd", "gather"), ("_sgd_dense", "sgd", "dense"),
      ("_lamb_auto", "lamb", "auto"), ("_lamb_gather", "lamb", "gather"))
  def test_same_weights_as_one_device(self, optimizer_name, option):
    case = training_cases.TRANSFORMER
    want = training_cases.train(None, case, optimizer_name)
    initial = [v.numpy() for v in training_cases.build(case, optimizer_name).weights]
    ops = _ops(option)
    strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=ops)
    got = training_cases.train(strategy, case, optimizer_name)
    for g, w, i in zip(got, want, initial):
      moved = np.linalg.norm(w - i)
      self.assertGreater(moved, 0)
      self.assertLess(np.linalg.norm(g - w) / moved, 1e-4)
    gathered = "gather" in [e.algorithm for e in ops.last_plan]
    densified = any(e.densified for e in ops.last_plan)
    # The position and segment embeddings' gradients are IndexedSlices; each went one
    # way or the other.
    self.assertTrue(gathered or densified)
    if option == "gather":
      self.assertTrue(gathered and not densified)
    if option == "dense":
      self.assertTrue(densified and not gathered)


if __name__ == "__main__":
  tf.test.main()
