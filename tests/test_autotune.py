"""Autotuning: exposed time with and without overlap, the threshold choice, the cost
model file, and FusedAllReduce(pack_bytes=None) using them."""

import json
import os
from unittest import mock

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
from tf_fusion._internal import tf as tf_internal
from tests.harness import helpers

F32 = tf.float32


def _wire(dtype):
  return tf.as_dtype(dtype)


def _specs(*elements):
  return [(F32, tf.TensorShape([n])) for n in elements]


def _entries(specs, pack_bytes, first=0, model=None):
  model = model or tf_fusion.CostModel({"ring": 1.0}, {"ring": 0.0})
  return plans.assign(packing.plan_packs(specs, pack_bytes, first), specs, _wire,
                           "ring", model)


class ExposedSecondsTest(tf.test.TestCase):

  def test_without_overlap_it_is_the_sum(self):
    specs = _specs(25, 25, 25)
    self.assertEqual(autotune.exposed_seconds(_entries(specs, 1), specs), 3.0)
    self.assertEqual(autotune.exposed_seconds(_entries(specs, 0), specs), 1.0)

  def test_overlap_by_hand(self):
    # Three 100-byte tensors made at t = 1, 2, 3 s (backward 3 s, last layer first);
    # each pack takes 1 s. Singles: 1->2, 2->3, 3->4: 1 s exposed.
    specs = _specs(25, 25, 25)
    self.assertAlmostEqual(
        autotune.exposed_seconds(_entries(specs, 1), specs, backward_seconds=3.0), 1.0)
    # One pack of 1.5 s, ready at 3 s: 1.5 s exposed.
    model = tf_fusion.CostModel({"ring": 1.5}, {"ring": 0.0})
    self.assertAlmostEqual(autotune.exposed_seconds(
        _entries(specs, 0, model=model), specs, backward_seconds=3.0), 1.5)
    # Slow packs (4 s each) queue behind each other: 1 + 3 x 4 - 3 = 10 s exposed.
    model = tf_fusion.CostModel({"ring": 4.0}, {"ring": 0.0})
    self.assertAlmostEqual(autotune.exposed_seconds(
        _entries(specs, 1, model=model), specs, backward_seconds=3.0), 10.0)

  def test_unequal_sizes_set_the_ready_times(self):
    # 300 B made first (backprop order: the last tensor), then 100 B: ready at 3/4 and
    # 4/4 of an 8 s backward pass; packs of 1 s: 6->7, 8->9: 1 s exposed.
    specs = _specs(25, 75)
    self.assertAlmostEqual(
        autotune.exposed_seconds(_entries(specs, 1), specs, backward_seconds=8.0), 1.0)
    specs = _specs(25, 75)
    model = tf_fusion.CostModel({"ring": 3.0}, {"ring": 0.0})
    # 6 -> 9, then 9 -> 12: 4 s exposed.
    self.assertAlmostEqual(autotune.exposed_seconds(
        _entries(specs, 1, model=model), specs, backward_seconds=8.0), 4.0)


class ChooseTest(tf.test.TestCase):

  # Eight 1 MiB tensors; 1 ms per launch, 1 ns per byte, no packing cost.
  SPECS = _specs(*[1 << 18] * 8)
  MODEL = tf_fusion.CostModel({"ring": 1e-3}, {"ring": 1e-9})

  def test_no_overlap_fuses_everything(self):
    pack_bytes, first, seconds = autotune.choose(self.SPECS, _wire, self.MODEL, "ring")
    self.assertEqual((pack_bytes, first), (0, 0))   # one pack: one launch
    self.assertAlmostEqual(seconds, 1e-3 + 1e-9 * (8 << 20))

  def test_long_backward_pass_sends_each_tensor_as_it_is_made(self):
    # Only the pack holding the first layer's tensor runs after the backward pass:
    # best is that tensor alone, 1 ms + 1 MiB x 1 ns exposed.
    pack_bytes, first, seconds = autotune.choose(self.SPECS, _wire, self.MODEL, "ring",
                                                 backward_seconds=1.0)
    last = packing.plan_packs(self.SPECS, pack_bytes, first)[-1]
    self.assertEqual(last.indices, (0,))
    self.assertAlmostEqual(seconds, 1e-3 + 1e-9 * (1 << 20))

  def test_choice_is_the_largest_within_the_margin_of_the_grids_minimum(self):
    model = helpers.fixed_cost_model()
    specs = _specs(*[int(n) for n in np.random.RandomState(0).randint(1, 300_000, 60)])
    size = lambda t: float("inf") if t == 0 else t
    for backward in (None, 0.002, 0.05):
      pack_bytes, first, seconds = autotune.choose(specs, _wire, model, "auto", backward)
      tried = {}
      for p in autotune.PACK_BYTES_GRID:
        for f in autotune.FIRST_PACK_BYTES_GRID:
          if not (f and p and f >= p):
            entries = plans.assign(packing.plan_packs(specs, p, f), specs, _wire,
                                   "auto", model)
            tried[p, f] = autotune.exposed_seconds(entries, specs, backward)
      least = min(tried.values())
      self.assertAlmostEqual(seconds, tried[pack_bytes, first])
      self.assertLessEqual(seconds, max(least * (1 + cost_lib.MARGIN), least + 1e-6))
      larger = [k for k, t in tried.items() if t <= least * (1 + cost_lib.MARGIN)
                and (size(k[0]), size(k[1])) > (size(pack_bytes), size(first))]
      self.assertEqual(larger, [], backward)

  def test_a_near_tie_keeps_the_larger_packs(self):
    """Packing copies worth 2% of the transfer make one pack per tensor the predicted
    minimum by a hair; that is no reason to launch eight collectives: one pack."""
    model = tf_fusion.CostModel({"ring": 0.0}, {"ring": 1e-9}, copy_beta=2e-11)
    self.assertEqual(autotune.choose(self.SPECS, _wire, model, "ring")[:2], (0, 0))
    costly = tf_fusion.CostModel({"ring": 0.0}, {"ring": 1e-9}, copy_beta=5e-10)
    self.assertNotEqual(autotune.choose(self.SPECS, _wire, costly, "ring")[:2], (0, 0))


class MeasureTest(tf.test.TestCase):

  def test_times_every_candidate_and_keeps_the_fastest(self):
    timed = []

    def time_plan(pack_bytes, first):
      timed.append((pack_bytes, first))
      return {0: 3.0, 1024: 1.0, 4096: 2.0}[pack_bytes]
    candidates = [(0, 0), (1024, 0), (4096, 256)]
    best, seconds = autotune.measure(candidates, time_plan)
    self.assertEqual(timed, candidates)
    self.assertEqual((best, seconds), (1, [3.0, 1.0, 2.0]))

  def test_the_models_pick_stays_unless_clearly_beaten(self):
    """The first candidate is the cost model's pick: a candidate 5% faster on one
    measurement is noise, one twice as fast is not."""
    pairs = [(0, 0), (1024, 0)]
    self.assertEqual(autotune.measure(pairs, lambda p, f: {0: 1.0, 1024: 0.95}[p])[0], 0)
    self.assertEqual(autotune.measure(pairs, lambda p, f: {0: 1.0, 1024: 0.5}[p])[0], 1)

  def test_the_workers_average_decides(self):
    # This worker saw 1024 fastest; the average over the workers says 4096.
    best, seconds = autotune.measure(
        [(1024, 0), (4096, 0)], lambda p, f: {1024: 1.0, 4096: 2.0}[p],
        across=lambda s: (s + np.array([5.0, 0.0])) / 2)
    self.assertEqual((best, seconds), (1, [3.0, 1.0]))


class MeasuredAutotuneTest(tf.test.TestCase):

  def test_op_determinism_times_nothing_and_reads_no_file(self):
    """Under op determinism "auto" everything plans from the nominal model: no
    calibration, no timed candidate, the cost-model file neither read nor written."""
    devices = collectives_lib.canonical_devices(helpers.devices(4))
    path = os.path.join(self.create_tempdir().full_path, "cost.json")
    helpers.fixed_cost_model().save(path)   # not for this topology; nor read at all
    before = open(path).read()
    specs = _specs(70000, 20, 300000, 5, 90000)
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(
        pack_bytes=None, autotune="measure", algorithm="auto", cost_model_file=path))
    untimed = mock.Mock(side_effect=AssertionError("timed under op determinism"))
    tf.config.experimental.enable_op_determinism()
    try:
      with mock.patch.object(calibration, "time_calls", untimed), \
           mock.patch.object(calibration, "calibrate", untimed):
        plan = ops.make_plan(specs, devices)
    finally:
      tf_internal.disable_op_determinism()
    nominal = cost_lib.nominal(algorithms.LOCAL_ALGORITHMS, 4)
    pack_bytes, first, _ = autotune.choose(specs, _wire, nominal, "auto")
    want = plans.build_plan(specs, pack_bytes, first, _wire, "auto", nominal)
    self.assertEqual([(p.tensor_indices, p.algorithm) for p in plan],
                     [(p.tensor_indices, p.algorithm) for p in want])
    self.assertEqual(open(path).read(), before)

  def test_measures_once_keeps_the_fastest_and_reuses_it(self):
    path = self.create_tempfile().full_path
    devices = helpers.devices(2)
    model = helpers.fixed_cost_model()
    cost_lib.CostModel(model.alpha, model.beta, model.copy_beta, "for the test",
                         topology=autotune.topology(collectives_lib.canonical_devices(devices),
                                                    1, algorithms.LOCAL_ALGORITHMS)
                         ).save(path)
    options = tf_fusion.FusionOptions(pack_bytes=None, autotune="measure",
                                      cost_model_file=path, algorithm="reduce_to_one")
    shapes = [[70000], [20], [300000], [5], [90000]]
    arrays = [[np.full(s, r + 1.0, np.float32) for s in shapes] for r in range(2)]
    specs = _specs(*[s[0] for s in shapes])
    plans = []
    for attempt in range(2):
      ops = tf_fusion.FusedAllReduce(options)
      strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
      values = [helpers.per_replica(strategy, [a[i] for a in arrays])
                for i in range(len(shapes))]
      patch = (mock.patch.object(calibration, "time_calls",
                                 side_effect=AssertionError("measured again"))
               if attempt else mock.patch.object(calibration, "time_calls",
                                                 wraps=calibration.time_calls))
      with strategy.scope(), patch as timed:
        out = ops.batch_reduce(tf.distribute.ReduceOp.SUM, [(v, v) for v in values])
      for got, shape in zip(out, shapes):
        self.assertAllEqual(got.values[1], np.full(shape, 3.0))
      plans.append([p.tensor_indices for p in ops.last_plan])
      if not attempt:
        # One timing per distinct candidate plan.
        want = autotune.candidates(specs, _wire, model, "reduce_to_one")
        self.assertEqual(timed.call_count, len(want))
    self.assertEqual(plans[0], plans[1])
    with open(path) as f:
      tuned = json.load(f)["tuned"]
    (key, (pack_bytes, first, seconds)), = tuned.items()
    self.assertEqual(key, autotune.list_key(specs, "reduce_to_one", "none"))
    self.assertIn((pack_bytes, first), want)
    self.assertGreater(seconds, 0)
    self.assertEqual(plans[0], [p.indices for p in packing.plan_packs(specs, pack_bytes,
                                                                      first)])

  def test_keeps_the_fastest_of_known_timings(self):
    """Timings fed in, one per candidate: the one given the least time is kept, whatever
    its place in the list (not the first, not the last)."""
    devices = helpers.devices(2)
    model = helpers.fixed_cost_model()
    specs = _specs(70000, 20, 300000, 5, 90000)
    want = autotune.candidates(specs, _wire, model, "reduce_to_one")
    self.assertGreater(len(want), 2)
    fastest = len(want) // 2
    fake = iter([(0.0, [1.0 if i != fastest else 0.25] * 3) for i in range(len(want))])
    ops = tf_fusion.FusedAllReduce(
        tf_fusion.FusionOptions(pack_bytes=None, autotune="measure",
                                algorithm="reduce_to_one"), cost_model=model)
    with mock.patch.object(calibration, "time_calls", side_effect=lambda *a, **k: next(fake)):
      plan = ops.make_plan(specs, collectives_lib.canonical_devices(devices))
    pack_bytes, first = want[fastest]
    self.assertEqual([p.tensor_indices for p in plan],
                     [p.indices for p in packing.plan_packs(specs, pack_bytes, first)])
    (tuned,) = ops.cost_model(devices).tuned.values()
    self.assertEqual(tuple(tuned), (pack_bytes, first, 0.25))

  def test_candidates_are_distinct_plans(self):
    specs = _specs(*[1 << 18] * 8)      # eight 1 MiB tensors
    pairs = autotune.candidates(specs, _wire, ChooseTest.MODEL, "ring")
    plans = [tuple(p.indices for p in packing.plan_packs(specs, pb, f)) for pb, f in pairs]
    self.assertLen(set(plans), len(plans))
    # The model's pick (one pack; as are 0, 16, 64 and 256 MiB), singles (64 KiB ...
    # 1 MiB) and two packs of four (4 MiB).
    self.assertEqual([len(p) for p in plans], [1, 8, 2])


if __name__ == "__main__":
  tf.test.main()
