"""plan_packs / pack / unpack."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tf_fusion import packing

F32, F16, I32 = tf.float32, tf.float16, tf.int32


def _specs(*items):
  return [(dtype, tf.TensorShape(shape)) for dtype, shape in items]


class PlanPacksTest(tf.test.TestCase, parameterized.TestCase):

  def test_backprop_order_and_threshold(self):
    # Four float32 tensors of 400 bytes each; threshold 1000 bytes -> pairs.
    specs = _specs(*[(F32, [100])] * 4)
    packs = packing.plan_packs(specs, pack_bytes=1000)
    self.assertEqual([p.indices for p in packs], [(3, 2), (1, 0)])
    self.assertEqual([p.nbytes for p in packs], [800, 800])

  def test_first_pack_is_smaller(self):
    specs = _specs(*[(F32, [100])] * 5)
    packs = packing.plan_packs(specs, pack_bytes=1200, first_pack_bytes=400)
    self.assertEqual([p.indices for p in packs], [(4,), (3, 2, 1), (0,)])

  def test_first_pack_never_larger_than_pack_bytes(self):
    specs = _specs(*[(F32, [100])] * 3)
    packs = packing.plan_packs(specs, pack_bytes=400, first_pack_bytes=1 << 20)
    self.assertEqual([p.indices for p in packs], [(2,), (1,), (0,)])

  def test_tensor_over_threshold_goes_alone(self):
    specs = _specs((F32, [10]), (F32, [1000]), (F32, [10]))
    packs = packing.plan_packs(specs, pack_bytes=100)
    self.assertEqual([p.indices for p in packs], [(2,), (1,), (0,)])

  def test_zero_means_one_pack_per_dtype(self):
    specs = _specs((F32, [10]), (F16, [3]), (F32, [1000]), (I32, []), (F16, [2, 2]))
    packs = packing.plan_packs(specs, pack_bytes=0, first_pack_bytes=16)
    by_dtype = {p.dtype: p.indices for p in packs}
    self.assertEqual(by_dtype, {F16: (4, 1), I32: (3,), F32: (2, 0)})
    self.assertLen(packs, 3)

  def test_dtypes_never_mix_and_every_index_once(self):
    rng = np.random.RandomState(0)
    dtypes = [F32, F16, tf.float64]
    specs = _specs(*[(dtypes[rng.randint(3)], [rng.randint(0, 50)]) for _ in range(40)])
    for pack_bytes in (0, 1, 64, 256, 1 << 30):
      packs = packing.plan_packs(specs, pack_bytes, first_pack_bytes=32)
      seen = sorted(i for p in packs for i in p.indices)
      self.assertEqual(seen, list(range(40)))
      for p in packs:
        self.assertTrue(all(specs[i][0] == p.dtype for i in p.indices))
        self.assertEqual(p.nbytes, sum(packing.tensor_nbytes(*specs[i]) for i in p.indices))
        self.assertEqual(list(p.indices), sorted(p.indices, reverse=True))

  def test_unknown_shapes_go_alone(self):
    specs = _specs((F32, [4]), (F32, [None, 3]), (F32, [4]))
    packs = packing.plan_packs(specs, pack_bytes=1 << 20)
    self.assertEqual([(p.indices, p.nbytes) for p in packs],
                     [((2, 0), 32), ((1,), None)])

  def test_scalars_and_zero_size(self):
    specs = _specs((F32, []), (F32, [0, 3]), (F32, [2]))
    packs = packing.plan_packs(specs, pack_bytes=1 << 20)
    self.assertEqual([(p.indices, p.nbytes) for p in packs], [((2, 1, 0), 12)])

  def test_negative_threshold_is_refused(self):
    with self.assertRaisesRegex(ValueError, "pack_bytes=-1"):
      packing.plan_packs(_specs((F32, [1])), pack_bytes=-1)


class PackUnpackTest(tf.test.TestCase):

  def test_round_trip_bit_exact(self):
    rng = np.random.RandomState(1)
    arrays = [rng.randn(3, 4).astype(np.float32), np.float32(7.5),
              np.zeros([0, 5], np.float32), rng.randn(11).astype(np.float32)]
    tensors = [tf.constant(a) for a in arrays]
    buffer = packing.pack(tensors)
    self.assertEqual(buffer.shape, [12 + 1 + 0 + 11])
    for got, want in zip(packing.unpack(buffer, tensors), arrays):
      self.assertAllEqual(got, want)
      self.assertEqual(got.shape, np.shape(want))

  def test_dynamic_shapes(self):
    @tf.function(input_signature=[tf.TensorSpec([None, 2]), tf.TensorSpec([None])])
    def round_trip(a, b):
      return packing.unpack(packing.pack([a, b]) * 2.0, [a, b])

    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.arange(4, dtype=np.float32)
    got_a, got_b = round_trip(a, b)
    self.assertAllEqual(got_a, 2 * a)
    self.assertAllEqual(got_b, 2 * b)


class ShardsTest(tf.test.TestCase, parameterized.TestCase):
  """shard_sizes and unpack_shards: a buffer held in consecutive shards (hierarchical's
  cross-worker step) unpacks to what NumPy's split of the whole buffer gives."""

  @parameterized.parameters((99, 2, F32, [64, 35]), (38, 2, F32, [32, 6]),
                            (6, 4, F32, [6]), (64, 4, F32, [16, 16, 16, 16]),
                            (65, 4, F16, [32, 32, 1]), (1000, 3, F32, [336, 336, 328]))
  def test_shard_sizes_are_aligned_and_cover_the_buffer(self, n, k, dtype, want):
    got = packing.shard_sizes(n, k, dtype)
    self.assertEqual(got, want)
    self.assertEqual(sum(got), n)
    for size in got[:-1]:    # every shard but the last starts and ends on 64 bytes
      self.assertEqual(size * dtype.size % packing.SHARD_ALIGN_BYTES, 0)

  @parameterized.parameters(([32, 7],), ([1, 38],), ([16, 16, 7],), ([15, 7, 17],),
                            ([22, 17],), ([39],))
  def test_unpack_shards_equals_numpy_split(self, shard_lengths):
    shapes = [(3, 5), (7,), (0, 4), (2, 2, 4), (1,)]   # 15 + 7 + 0 + 16 + 1 = 39
    rng = np.random.RandomState(3)
    arrays = [np.asarray(rng.randn(*s), np.float32) for s in shapes]
    whole = np.concatenate([a.ravel() for a in arrays])
    shards = [tf.constant(p) for p in np.split(whole, np.cumsum(shard_lengths)[:-1])]
    like = [tf.zeros(s) for s in shapes]
    for got, want in zip(packing.unpack(shards, like), arrays):
      self.assertAllEqual(got, want)
      self.assertEqual(got.shape, want.shape)

  def test_shards_that_do_not_add_up_are_refused(self):
    with self.assertRaisesRegex(ValueError, "add up to the same"):
      packing.unpack_shards([tf.zeros([3]), tf.zeros([3])], [tf.zeros([7])])


class UnpackBlocksTest(tf.test.TestCase):

  def test_blocks_with_padding_give_the_tensors_back(self):
    like = [tf.zeros([3, 2]), tf.zeros([5]), tf.zeros([0]), tf.zeros([4])]
    flat = np.arange(15, dtype=np.float32)
    padded = np.concatenate([flat, np.full([5], -1.0, np.float32)])   # 4 blocks of 5
    want = np.split(flat, [6, 11, 11])
    for blocks in ([tf.constant(padded)], [tf.constant(b) for b in np.split(padded, 4)]):
      got = packing.unpack_blocks(blocks, 15, 5, like)
      for g, w, t in zip(got, want, like):
        self.assertAllEqual(g, w.reshape(t.shape))


if __name__ == "__main__":
  tf.test.main()
