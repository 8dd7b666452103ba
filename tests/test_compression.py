"""Compression.none / Compression.fp16."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion.compression import Compression


class CompressionTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      (tf.float32, tf.float16), (tf.float64, tf.float16), (tf.float16, tf.float16),
      (tf.bfloat16, tf.bfloat16), (tf.int32, tf.int32), (tf.int64, tf.int64))
  def test_fp16_casts_only_wide_floats(self, dtype, wire):
    tensor = tf.cast(tf.constant([1.0, -2.0, 3.0]), dtype)
    compressed, ctx = Compression.fp16.compress(tensor)
    self.assertEqual(compressed.dtype, wire)
    restored = Compression.fp16.decompress(compressed, ctx)
    self.assertEqual(restored.dtype, dtype)
    self.assertAllEqual(tf.cast(restored, tf.float64), [1.0, -2.0, 3.0])

  def test_fp16_rounds_like_numpy(self):
    values = np.random.RandomState(0).randn(1000).astype(np.float32)
    compressed, ctx = Compression.fp16.compress(tf.constant(values))
    self.assertAllEqual(compressed, values.astype(np.float16))
    self.assertAllEqual(Compression.fp16.decompress(compressed, ctx),
                        values.astype(np.float16).astype(np.float32))

  def test_none_is_identity(self):
    tensor = tf.constant([1.0, 2.0])
    compressed, ctx = Compression.none.compress(tensor)
    self.assertIs(compressed, tensor)
    self.assertIs(Compression.none.decompress(compressed, ctx), tensor)

  def test_get(self):
    self.assertIs(tf_fusion.Compression.get("FP16"), Compression.fp16)
    with self.assertRaisesRegex(ValueError, "valid values: none, fp16"):
      Compression.get("int8")


if __name__ == "__main__":
  tf.test.main()
