"""Cost model, hybrid assignment and calibration."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import algorithms
from tf_fusion import packing
from tests import helpers

F32 = tf.float32


def _identity_wire(dtype):
  return tf.as_dtype(dtype)


class CostModelTest(tf.test.TestCase, parameterized.TestCase):

  def test_seconds_follow_alpha_beta(self):
    m = tf_fusion.CostModel({"ring": 1e-4, "reduce_to_one": 1e-5},
                            {"ring": 1e-9, "reduce_to_one": 2e-9}, copy_beta=5e-10)
    self.assertAlmostEqual(m.seconds("ring", 1000), 1e-4 + 1e-6)
    self.assertAlmostEqual(m.seconds("ring", 1000, num_tensors=3), 1e-4 + 1e-6 + 5e-7)
    # Crossover at (1e-4 - 1e-5) / (2e-9 - 1e-9) = 90,000 bytes.
    self.assertEqual(m.best(80_000), "reduce_to_one")
    self.assertEqual(m.best(100_000), "ring")

  def test_json_round_trip(self):
    m = helpers.fixed_cost_model()
    self.assertEqual(tf_fusion.CostModel.from_json(m.to_json()), m)
    path = self.create_tempfile().full_path
    m.save(path)
    self.assertEqual(tf_fusion.CostModel.load(path), m)

  def test_measured_points_are_interpolated(self):
    # 1 KB: 1 ms, 1 MB: 2 ms, 2 MB: 5 ms (the per-byte cost rises), 3 MB measured
    # faster than 2 MB (noise): taken as 5 ms.
    m = tf_fusion.CostModel({"ring": 1e-3}, {"ring": 1e-9}, points={"ring": [
        (1000, 1e-3), (2_000_000, 5e-3), (1_000_000, 2e-3), (3_000_000, 4e-3)]})
    self.assertAlmostEqual(m.seconds("ring", 10), 1e-3)            # flat below
    self.assertAlmostEqual(m.seconds("ring", 1_000_000), 2e-3)
    self.assertAlmostEqual(m.seconds("ring", 1_500_000), 3.5e-3)   # linear between
    self.assertAlmostEqual(m.seconds("ring", 2_500_000), 5e-3)     # non-decreasing
    # Past 3 MB: the last segment (flat, 5 ms -> 5 ms) extended.
    self.assertAlmostEqual(m.seconds("ring", 4_000_000), 5e-3)
    self.assertAlmostEqual(m.seconds("ring", 4_000_000, num_tensors=2), 5e-3)
    m2 = tf_fusion.CostModel({"ring": 0.0}, {"ring": 0.0},
                             points={"ring": [(0, 0.0), (100, 1.0), (200, 3.0)]})
    self.assertAlmostEqual(m2.seconds("ring", 300), 5.0)           # slope 2 s / 100 B
    self.assertEqual(tf_fusion.CostModel.from_json(m.to_json()), m)

  @parameterized.parameters(
      dict(alpha={"ring": 1.0}, beta={"ring": 0.0}, points={"tree": [(1, 1.0)]}),
      dict(alpha={"ring": 1.0}, beta={"ring": 0.0}, points={"ring": [(1, -1.0)]}),
      dict(alpha={"ring": -1.0}, beta={"ring": 0.0}),
      dict(alpha={"ring": 1.0}, beta={"reduce_to_one": 0.0}),
      dict(alpha={"ring": float("nan")}, beta={"ring": 0.0}),
  )
  def test_bad_constants(self, alpha, beta, points=None):
    with self.assertRaises(ValueError):
      tf_fusion.CostModel(alpha, beta, points=points or {})


class AssignTest(tf.test.TestCase):

  def _specs(self, *sizes):
    return [(F32, tf.TensorShape([n])) for n in sizes]

  def test_auto_keeps_small_tensors_fused_and_splits_large_ones(self):
    # Launch latency 1e-4 s, copy 1e-9 s/byte: fusing pays below ~100 KB per tensor.
    m = tf_fusion.CostModel({"ring": 1e-4}, {"ring": 1e-10}, copy_beta=1e-9)
    small = self._specs(*[100] * 10)      # 10 x 400 B
    large = self._specs(*[1 << 20] * 3)   # 3 x 4 MiB
    for specs, want in ((small, 1), (large, 3)):
      packs = packing.plan_packs(specs, pack_bytes=1 << 30)
      out = algorithms.assign(packs, specs, _identity_wire, "auto", m)
      self.assertLen(out, want)
      # Hand-computed: fused = alpha + (beta + copy) S; split = n alpha + beta S.
      n, size = len(specs), sum(packing.tensor_nbytes(*s) for s in specs)
      fused = 1e-4 + (1e-10 + 1e-9) * size
      split = n * 1e-4 + 1e-10 * size
      self.assertAlmostEqual(sum(t for _, _, t in out), min(fused, split))

  def test_auto_picks_the_cheaper_algorithm_per_pack(self):
    m = helpers.fixed_cost_model()  # ring below ~100 KB, reduce_to_one above.
    specs = self._specs(10, 1 << 20)
    packs = packing.plan_packs(specs, pack_bytes=1)
    out = algorithms.assign(packs, specs, _identity_wire, "auto", m)
    self.assertEqual([(p.indices, a) for p, a, _ in out],
                     [((1,), "reduce_to_one"), ((0,), "ring")])

  def test_fp16_wire_halves_predicted_bytes(self):
    specs = self._specs(1000)
    packs = packing.plan_packs(specs, pack_bytes=0)
    wire = tf_fusion.Compression.fp16.wire_dtype
    self.assertEqual(algorithms.wire_nbytes(packs[0], specs, wire), 2000)

  def test_auto_without_model_is_refused(self):
    specs = self._specs(4)
    with self.assertRaisesRegex(ValueError, "CostModel"):
      algorithms.assign(packing.plan_packs(specs, 0), specs, _identity_wire, "auto")


class CalibrateTest(tf.test.TestCase):

  def test_calibration_measures_positive_finite_constants(self):
    model = tf_fusion.calibrate(helpers.devices(2), sizes=(4 << 10, 64 << 10, 1 << 20),
                                repeats=2)
    self.assertEqual(model.algorithms, ("reduce_to_one", "ring"))
    for alg in model.algorithms:
      self.assertTrue(np.isfinite(model.alpha[alg]) and model.alpha[alg] >= 0)
      self.assertTrue(np.isfinite(model.beta[alg]) and model.beta[alg] >= 0)
      # Something is measured: a 1 MiB all-reduce is predicted to take time.
      self.assertGreater(model.seconds(alg, 1 << 20), 0)
    self.assertGreater(model.copy_beta, 0)

  def test_auto_calibrates_once_on_first_use(self):
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(algorithm="auto"))
    devices = helpers.devices(2)
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
    value = helpers.per_replica(strategy, [np.full([64], r + 1.0, np.float32)
                                           for r in range(2)])

    @tf.function
    def reduce():
      return ops.batch_reduce(tf.distribute.ReduceOp.SUM, [(value, value)])[0].values

    with strategy.scope():
      first = reduce()
      model = ops.cost_model(devices)
      reduce()  # Same trace: no second calibration.
    self.assertAllEqual(first[1], np.full([64], 3.0))
    self.assertIs(ops.cost_model(devices), model)
    self.assertIn(ops.last_plan[0].algorithm, model.algorithms)
    self.assertIsNotNone(ops.last_plan[0].predicted_seconds)


if __name__ == "__main__":
  tf.test.main()
