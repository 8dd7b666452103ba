"""tf_fusion.pipeline: every stage of a pack (range bounds, encode, launch, finish,
decode) on both launches (all devices from merge_call; each replica its own), on a
16-bit wire that loses nothing float32 keeps: fp16 range-scaled, bf16 by its range.

Random floats across magnitudes (integers would be summed exactly by any wire), summed
over 4 replicas and compared with the float64 sum: fp16 within 1% (its rounding is 2^-11
per addition), bf16 within its own rounding (2^-8 per addition, 4 additions).
"""

import itertools

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers

SUM, MEAN = tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN
TOLERANCE = {"fp16": 1e-2, "bf16": 2e-2, "none": 1e-6}


def _arrays(magnitudes, n=4, size=64, seed=0):
  """Per replica, one float32 tensor per magnitude: random signs and mantissas."""
  rng = np.random.RandomState(seed)
  return [[(m * rng.uniform(0.5, 1.0, size) * rng.choice([-1, 1], size)).astype(np.float32)
           for m in magnitudes] for _ in range(n)]


def _check(test, got, arrays, reduce_op, compression):
  for i, _ in enumerate(arrays[0]):
    want = np.sum([a[i].astype(np.float64) for a in arrays], axis=0)
    scale = np.sum([np.abs(a[i].astype(np.float64)) for a in arrays], axis=0)
    if reduce_op == MEAN:
      want, scale = want / len(arrays), scale / len(arrays)
    for replica in got[i]:
      replica = np.asarray(replica, np.float64)
      test.assertTrue(np.all(np.isfinite(replica)), f"tensor {i}: {replica[:4]}")
      # Relative to the magnitudes summed: a sum that cancels is judged by its parts.
      err = np.max(np.abs(replica - want) / scale)
      test.assertLess(err, TOLERANCE[compression], f"tensor {i} ({compression})")


class WireRangeTest(tf.test.TestCase, parameterized.TestCase):

  CASES = {"tiny": [1e-9], "huge": [3e5], "tiny_and_one": [1e-9, 1.0],
           "spread": [1e-30, 1e-12, 1e-3, 1.0, 1e4, 1e12, 1e30]}

  @parameterized.named_parameters(
      (f"_{case}_{comp}_{alg}_{op.name}", case, comp, alg, op)
      for case, comp, alg, op in itertools.product(
          CASES, ("fp16", "bf16", "none"), ("ring", "reduce_to_one"), (SUM, MEAN))
      # fp16's range-scaling is per tensor: float32's 1e-30..1e30 in one tensor is
      # beyond any 16-bit format; "spread" puts each magnitude in its own tensor.
      )
  def test_sum_over_replicas_matches_float64(self, case, compression, algorithm,
                                             reduce_op):
    arrays = _arrays(self.CASES[case])
    strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=(
        ops := tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(
            compression=compression, algorithm=algorithm, pack_bytes=32 << 20))))
    values = [helpers.per_replica(strategy, [a[i] for a in arrays])
              for i in range(len(arrays[0]))]
    with strategy.scope():
      out = tf.function(lambda: [r.values for r in ops.batch_reduce(
          reduce_op, [(v, v) for v in values])])()
    self.assertLen(ops.last_plan, 1)   # every magnitude in one pack
    _check(self, [[t.numpy() for t in r] for r in out], arrays, reduce_op, compression)

  @parameterized.parameters("fp16", "bf16")
  def test_16_bit_tensors(self, compression):
    """bfloat16 and float16 gradients (mixed policies without float32 master grads)."""
    for dtype, magnitudes in ((np.float16, [1e-3, 3e3]), (tf.bfloat16.as_numpy_dtype,
                                                          [1e-20, 1e20])):
      arrays = [[a.astype(dtype) for a in r] for r in _arrays(magnitudes)]
      ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(
          compression=compression, algorithm="ring"))
      strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=ops)
      values = [helpers.per_replica(strategy, [a[i] for a in arrays])
                for i in range(len(magnitudes))]
      with strategy.scope():
        out = ops.batch_reduce(SUM, [(v, v) for v in values])
      got = [[np.asarray(t.numpy(), np.float32) for t in r.values] for r in out]
      self.assertEqual(out[0].values[0].dtype, tf.as_dtype(dtype))
      # The tensors' own dtype rounds the result: its epsilon sets the tolerance.
      _check(self, got, [[a.astype(np.float32) for a in r] for r in arrays], SUM,
             "bf16")

  def test_no_merge_call_path(self):
    """Inside a cond of the replica function (gradient accumulation's path)."""
    arrays = _arrays([1e-9, 3e5])
    strategy = tf_fusion.mirrored_strategy(
        helpers.devices(4), tf_fusion.FusionOptions(compression="fp16"))
    values = [helpers.per_replica(strategy, [a[i] for a in arrays]) for i in range(2)]

    @tf.function
    def step():
      def replica_fn(a, b):
        ctx = tf.distribute.get_replica_context()
        return tf.cond(tf.constant(True), lambda: tuple(ctx.all_reduce(SUM, [a, b])),
                       lambda: (a, b))
      return strategy.run(replica_fn, args=tuple(values))
    with strategy.scope():
      out = step()
    got = [[t.numpy() for t in strategy.experimental_local_results(r)] for r in out]
    _check(self, got, arrays, SUM, "fp16")


if __name__ == "__main__":
  tf.test.main()
