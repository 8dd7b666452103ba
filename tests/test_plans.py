"""tf_fusion.plans: the hybrid assignment of an algorithm to each pack (Jia et al. 2018),
against a fixed cost model."""

import tensorflow as tf

import tf_fusion
from tf_fusion import plans
from tf_fusion import packing
from tests.harness import helpers

F32 = tf.float32


def _wire(dtype):
  return tf.as_dtype(dtype)


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
      out = plans.assign(packs, specs, _wire, "auto", m)
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
    out = plans.assign(packs, specs, _wire, "auto", m)
    self.assertEqual([(p.indices, a) for p, a, _ in out],
                     [((1,), "reduce_to_one"), ((0,), "ring")])

  def test_fp16_wire_halves_predicted_bytes(self):
    specs = self._specs(1000)
    packs = packing.plan_packs(specs, pack_bytes=0)
    wire = tf_fusion.Compression.fp16.wire_dtype
    self.assertEqual(plans.wire_nbytes(packs[0], specs, wire), 2000)

  def test_auto_without_model_is_refused(self):
    specs = self._specs(4)
    with self.assertRaisesRegex(ValueError, "CostModel"):
      plans.assign(packing.plan_packs(specs, 0), specs, _wire, "auto")


if __name__ == "__main__":
  tf.test.main()
