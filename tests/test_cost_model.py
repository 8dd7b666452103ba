"""tf_fusion.cost_model: its predictions, interpolation and near-tie rule; the cost model
file (tf_fusion.autotune reads or calibrates it). Calibration itself: test_calibration.py;
one calibration per process and devices: test_planner.py."""

import json
import os
from unittest import mock

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import algorithms
from tf_fusion import collectives as collectives_lib
from tf_fusion import plans
from tf_fusion import calibration
from tf_fusion import autotune
from tf_fusion import cost_model as cost_lib
from tf_fusion import packing
from tests.harness import helpers

F32 = tf.float32


def _wire(dtype):
  return tf.as_dtype(dtype)


def _specs(*elements):
  return [(F32, tf.TensorShape([n])) for n in elements]


class CostModelFileTest(tf.test.TestCase):

  def test_calibrates_once_then_reads_the_file(self):
    path = os.path.join(self.create_tempdir().full_path, "sub", "cost_model.json")
    devices = helpers.devices(2)
    first = autotune.load_or_calibrate(path, devices, algorithms.LOCAL_ALGORITHMS)
    self.assertTrue(os.path.exists(path))
    self.assertIn("1 worker(s) x 2 CPU device(s)", first.topology)
    with mock.patch.object(calibration, "calibrate",
                           side_effect=AssertionError("calibrated again")):
      again = autotune.load_or_calibrate(path, devices, algorithms.LOCAL_ALGORITHMS)
    self.assertEqual(again, first)

  def test_a_file_for_another_topology_or_unreadable_is_replaced(self):
    # Neither is read (each alike: the caller calibrates); one calibration replaces it.
    for content in (helpers.fixed_cost_model().to_json(), "{not json", "{}"):
      path = self.create_tempfile(content=content).full_path
      self.assertIsNone(cost_lib.read(path, "1 worker(s) x 2 CPU device(s)"), content)
    model = autotune.load_or_calibrate(path, helpers.devices(2), algorithms.LOCAL_ALGORITHMS)
    self.assertEqual(model.algorithms, ("reduce_to_one", "ring"))
    with open(path) as f:
      self.assertEqual(json.load(f)["topology"], model.topology)

  def test_fused_all_reduce_uses_the_file_and_autotunes(self):
    path = self.create_tempfile().full_path
    os.remove(path)
    model = helpers.fixed_cost_model()
    devices = helpers.devices(2)
    model = cost_lib.CostModel(
        model.alpha, model.beta, model.copy_beta, "kept by the user",
        topology=autotune.topology(collectives_lib.canonical_devices(devices), 1,
                                   algorithms.LOCAL_ALGORITHMS))
    model.save(path)
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(
        pack_bytes=None, cost_model_file=path, backward_seconds=0.01))
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
    shapes = [[3000], [20], [70000], [5], [900]]
    arrays = [[np.full(s, r + 1.0, np.float32) for s in shapes] for r in range(2)]
    values = [helpers.per_replica(strategy, [a[i] for a in arrays])
              for i in range(len(shapes))]
    with strategy.scope(), mock.patch.object(
        calibration, "calibrate", side_effect=AssertionError("calibrated")):
      out = ops.batch_reduce(tf.distribute.ReduceOp.SUM, [(v, v) for v in values])
    for got, shape in zip(out, shapes):
      self.assertAllEqual(got.values[0], np.full(shape, 3.0))
    specs = _specs(*[s[0] for s in shapes])
    pack_bytes, first, _ = autotune.choose(specs, _wire, model, "auto", 0.01)
    want = [e[0].indices for e in plans.assign(
        packing.plan_packs(specs, pack_bytes, first), specs, _wire, "auto", model)]
    self.assertEqual([p.tensor_indices for p in ops.last_plan], want)


class CostModelTest(tf.test.TestCase, parameterized.TestCase):

  def test_seconds_follow_alpha_beta(self):
    m = tf_fusion.CostModel({"ring": 1e-4, "reduce_to_one": 1e-5},
                            {"ring": 1e-9, "reduce_to_one": 2e-9}, copy_beta=5e-10)
    self.assertAlmostEqual(m.seconds("ring", 1000), 1e-4 + 1e-6)
    self.assertAlmostEqual(m.seconds("ring", 1000, num_tensors=3), 1e-4 + 1e-6 + 5e-7)
    # Crossover at (1e-4 - 1e-5) / (2e-9 - 1e-9) = 90,000 bytes.
    self.assertEqual(m.best(40_000), "reduce_to_one")   # 90 us against 140 us
    self.assertEqual(m.best(100_000), "ring")

  def test_near_ties_go_to_the_preferred_algorithm_not_to_the_timing(self):
    """reduce_to_one predicted 6% faster at 80,000 bytes (170 us against 180 us) is
    within the margin: the ring. Two launch-bound algorithms whose calibrations lean
    10% either way: the ring every time. A clearly faster reduce_to_one still wins."""
    m = tf_fusion.CostModel({"ring": 1e-4, "reduce_to_one": 1e-5},
                            {"ring": 1e-9, "reduce_to_one": 2e-9})
    self.assertLess(m.seconds("reduce_to_one", 80_000), m.seconds("ring", 80_000))
    self.assertEqual(m.best(80_000), "ring")
    self.assertEqual(m.best(60_000), "reduce_to_one")   # 130 us against 160 us
    for leaning in (0.9, 0.95, 1.05, 1.1):
      noisy = tf_fusion.CostModel({"ring": 1e-4 * leaning, "reduce_to_one": 1e-4},
                                  {"ring": 0.0, "reduce_to_one": 0.0})
      self.assertEqual(noisy.best(1000), "ring", leaning)

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


if __name__ == "__main__":
  tf.test.main()
