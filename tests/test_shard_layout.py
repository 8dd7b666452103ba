"""shard_layout: flat even shards of the packs, against a NumPy walk of the elements."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tf_fusion import packing
from tf_fusion import shard_layout

SPECS = [(tf.float32, (10, 3)), (tf.float32, (7,)), (tf.bfloat16, (5, 5)),
         (tf.float32, (1000,)), (tf.float32, ()), (tf.float32, (0,))]


class LayoutTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters((1, 0), (4, 0), (3, 256), (8, 1024))
  def test_every_element_once_in_equal_aligned_shards(self, shards, pack_bytes):
    layout = shard_layout.plan_layout(SPECS, shards, pack_bytes)
    # Reference: mark each element of each variable by walking the segments.
    seen = [np.zeros(int(np.prod(shape)), np.int64) for _, shape in SPECS]
    for p in layout.packs:
      self.assertGreaterEqual(p.padded_size, p.size)
      align = packing.SHARD_ALIGN_BYTES // p.dtype.size   # elements
      self.assertLess(p.padded_size - p.size, shards * align)   # less than one each
      self.assertEqual(p.shard_size * p.dtype.size % packing.SHARD_ALIGN_BYTES, 0)
      starts = np.cumsum([0] + list(p.sizes))
      for s in range(shards):
        for seg in p.segments(s):
          # The segment lies where the flat pack says: inside shard s, in order.
          flat_start = starts[p.variables.index(seg.variable)] + seg.start
          self.assertEqual(flat_start, s * p.shard_size + seg.offset)
          seen[seg.variable][seg.start:seg.start + seg.size] += 1
    for count in seen:
      self.assertTrue(np.all(count == 1))
    self.assertEqual(sum(layout.state_elements(s) for s in range(shards)),
                     sum(int(np.prod(shape)) for _, shape in SPECS))

  def test_balanced_whatever_the_variable_sizes(self):
    # One large variable and a few small: flat shards differ by less than the padding,
    # under 16 elements (64 bytes) per shard (owning whole variables would give one
    # replica 1000 of 1038 elements).
    layout = shard_layout.plan_layout(SPECS[:2] + SPECS[3:], 4, 0)
    counts = [layout.state_elements(s) for s in range(4)]
    self.assertEqual(sum(counts), 1038)
    self.assertLess(max(counts) - min(counts), 4 * 16)

  def test_packs_are_the_gradients_packs(self):
    layout = shard_layout.plan_layout(SPECS, 4, 256, 64)
    self.assertEqual([p.variables for p in layout.packs],
                     [p.indices for p in packing.plan_packs(SPECS, 256, 64)])

  def test_bad_input_is_named(self):
    with self.assertRaisesRegex(ValueError, "num_shards must be >= 1"):
      shard_layout.plan_layout(SPECS, 0, 0)
    with self.assertRaisesRegex(ValueError, "variable 0 has shape"):
      shard_layout.plan_layout([(tf.float32, (None, 3))], 2, 0)
    with self.assertRaisesRegex(ValueError, "not in the layout"):
      shard_layout.plan_layout(SPECS, 2, 0).variable_segments(99)


if __name__ == "__main__":
  tf.test.main()
