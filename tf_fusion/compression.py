"""Wire compression: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx).

The interface of horovod/tensorflow/compression.py. Only floating tensors wider than 16
bits are cast; integers and 16-bit floats travel unchanged. A 16-bit wire halves the
bytes (Jia et al. 2018, technique 8):
- "bf16": bfloat16 has float32's exponent range (1e-38 to 3e38) and an 8-bit mantissa
  (relative rounding 2^-9): nothing underflows or overflows that float32 would not.
- "fp16": float16 has 3 more mantissa bits (2^-12) but a range of 6e-8 to 65504, so a
  raw cast loses small gradients and overflows large sums. Every fp16 pack is therefore
  range-scaled: each tensor is multiplied by a power of two that all replicas agree on
  (`range_scales`, from the sum over replicas of each replica's max |x|, one tiny
  all-reduce per pack), chosen so that the group's sum tops out near 2^15; the
  reduction divides it back out, exactly. Under loss scaling this keeps the loss-scaled
  values in range whatever the scale, and an inf or NaN passes unchanged, so the
  loss-scale optimizer still sees it and skips the step.

What rides the wire: gradients. Inside a replica step of tf_fusion's strategies, a
reduction is compressed only when an optimizer reduces its gradients
(`gradient_marker.gradient_reduction`); every other one there (SyncBatchNorm's moment sums, where
E[x^2] - E[x]^2 cancels, a user's own `all_reduce` of statistics) is exact. A direct
call of the cross-device ops from cross-replica context is taken at its word.
"""

import math

import tensorflow as tf

from tf_fusion import gradient_marker
from tf_fusion import packing
from tf_fusion._internal import tf as tf_internal

# The largest magnitude a range-scaled fp16 sum may reach: half of float16's maximum
# (65504), so floor(log2(.)) computed in float32 can never land one power too high.
FP16_TARGET = 2.0 ** 15


class NoneCompressor:
  """Leaves tensors as they are."""

  name = "none"

  @staticmethod
  def compress(tensor):
    """(tensor unchanged, None)."""
    return tensor, None

  @staticmethod
  def decompress(tensor, ctx):
    """`tensor` unchanged."""
    del ctx
    return tensor

  @staticmethod
  def wire_dtype(dtype):
    """The dtype a tensor of `dtype` has on the wire: its own."""
    return tf.as_dtype(dtype)

  @staticmethod
  def range_scaled(wire_dtype) -> bool:
    """Never: nothing is cast."""
    del wire_dtype
    return False


class _CastCompressor:
  """Casts floating tensors wider than 16 bits to `WIRE` for the wire."""

  WIRE = None

  @classmethod
  def wire_dtype(cls, dtype):
    dtype = tf.as_dtype(dtype)
    if dtype.is_floating and dtype.size > 2:
      return cls.WIRE
    return dtype

  @classmethod
  def compress(cls, tensor):
    wire = cls.wire_dtype(tensor.dtype)
    if wire == tensor.dtype:
      return tensor, None
    return tf.cast(tensor, wire), tensor.dtype

  @staticmethod
  def decompress(tensor, ctx):
    if ctx is None:
      return tensor
    return tf.cast(tensor, ctx)

  @staticmethod
  def range_scaled(wire_dtype) -> bool:
    """Whether a pack with this wire dtype is range-scaled (fp16 only)."""
    del wire_dtype
    return False


class FP16Compressor(_CastCompressor):
  """float16 on the wire; packs are range-scaled (module doc) by the reduction."""

  name = "fp16"
  WIRE = tf.float16

  @staticmethod
  def range_scaled(wire_dtype) -> bool:
    return needs_range_scaling(wire_dtype)


class BF16Compressor(_CastCompressor):
  """bfloat16 on the wire: float32's range, 8 mantissa bits."""

  name = "bf16"
  WIRE = tf.bfloat16


def needs_range_scaling(wire_dtype) -> bool:
  """Whether a pack with this wire dtype is range-scaled: float16's range is narrow."""
  return tf.as_dtype(wire_dtype) == tf.float16


def local_bounds(tensors):
  """This replica's max |x| of each tensor, float32 (0 for an empty one).

  max(max x, -min x): two reads of the tensor and no |x| temporary, which on CPUs was
  the larger part of this pass."""
  bounds = []
  for t in tensors:
    t = tf.cast(t, tf.float32)
    bounds.append(tf.maximum(tf.maximum(tf.reduce_max(t), -tf.reduce_min(t)), 0.0))
  return tf.stack(bounds)


def range_scales(bounds):
  """The power of two per tensor that brings `bounds` (the sum over replicas of each
  replica's max |x|, which bounds every partial sum of the reduction) to FP16_TARGET.

  1 where the bound is 0, inf or NaN: a non-finite gradient crosses unchanged.
  """
  exponent = tf.floor(tf.math.log(FP16_TARGET / bounds) / math.log(2.0))
  scale = tf.pow(2.0, tf.clip_by_value(exponent, -120.0, 120.0))
  usable = tf.logical_and(tf.math.is_finite(bounds), bounds > 0)
  return tf.where(usable, scale, tf.ones_like(bounds))


def _wide(dtype):
  """The dtype a scale is applied in: at least float32."""
  return dtype if dtype.size >= 4 else tf.float32


# Scaling and casting are compiled together (XLA) so that each is one pass over the
# tensor: as two TensorFlow ops the multiply was a second full pass, and on CPUs it
# doubled what the fp16 wire costs over a plain cast. One compilation per shape.
@tf.function(jit_compile=True, autograph=False)
def _scale_cast(tensor, scale, dtype):
  wide = _wide(tensor.dtype)
  return tf.cast(tf.cast(tensor, wide) * tf.cast(scale, wide), dtype)


def scale_to_wire(tensors, scales, wire_dtype):
  """Each tensor times its scale (in at least float32), cast to `wire_dtype`."""
  return [_scale_cast(t, scales[i], tf.as_dtype(wire_dtype)) for i, t in enumerate(tensors)]


def scale_from_wire(parts, factors, like):
  """Each reduced wire tensor times its factor (in at least float32), cast back to the
  dtype of its tensor in `like`."""
  return [_scale_cast(p, factors[i], t.dtype) for i, (p, t) in enumerate(zip(parts, like))]


def divide(tensor, n):
  """tensor / n in at least FP32, returned in tensor's dtype (integers: floor)."""
  if tensor.dtype.is_integer:
    return tensor // tf.cast(n, tensor.dtype)
  if tensor.dtype.size < 4:
    return tf.cast(tf.cast(tensor, tf.float32) / n, tensor.dtype)
  return tensor / tf.cast(n, tensor.dtype)


class PackCodec:
  """How one pack goes on the wire and comes back: the compressor's cast and, where
  the compressor says so (fp16), range scaling; MEAN's division once, in at least FP32.

  Args:
    compressor: one of Compression's.
    reduce_op: tf.distribute.ReduceOp.SUM or MEAN.
    group_size: replicas of every worker (MEAN divides by it).
  """

  def __init__(self, compressor, reduce_op, group_size):
    self.compressor = compressor
    self.divisor = group_size if reduce_op == tf.distribute.ReduceOp.MEAN else 1

  def range_scaled(self, entry) -> bool:
    """Whether pack `entry` (a PackPlan) is range-scaled; "none" sends nothing."""
    return entry.algorithm != "none" and self.compressor.range_scaled(entry.wire_dtype)

  def encode(self, tensors, scales=None):
    """(wire buffer, ctx) of one device's tensors of a pack, range-scaled by `scales`."""
    if scales is not None:
      wire = self.compressor.wire_dtype(tensors[0].dtype)
      return packing.pack(scale_to_wire(tensors, scales, wire)), None
    compressed = [self.compressor.compress(t) for t in tensors]
    return packing.pack([c for c, _ in compressed]), compressed[0][1]

  def finisher(self, ctx, like, scaled=False):
    """What runs on a reduced pack: back from the wire dtype, MEAN's division (in at
    least float32), back to the tensors' dtype. A range-scaled pack stays on the wire
    dtype: its scales and MEAN's division are applied tensor by tensor after the split,
    in the same pass as the cast back (`decode`)."""
    dtype = like[0].dtype

    def finish(reduced):
      if scaled:
        return reduced
      reduced = self.compressor.decompress(reduced, ctx)
      if self.divisor != 1:
        reduced = divide(reduced, self.divisor)
      return tf.cast(reduced, dtype)
    return finish

  def decode(self, reduced, like, scales=None):
    """The reduced pack (one buffer, or its shards) split into tensors shaped as
    `like`; range-scaled ones divided by their scales (exact: powers of two) and by
    MEAN's divisor, back in their own dtype."""
    parts = packing.unpack(reduced, like)
    if scales is None:
      return parts
    return scale_from_wire(parts, 1.0 / (scales * float(self.divisor)), like)


def may_compress(compressor) -> bool:
  """Whether a reduction made now may ride `compressor`'s wire: not inside a replica
  step unless it reduces gradients. The others go exact, through TensorFlow's own
  reduction, unfused (they are few and small: SyncBN's moments, statistics)."""
  return (compressor is Compression.none or not tf_internal.in_replica_step()
          or gradient_marker.reducing_gradients())


class Compression:
  """The compressors by name, as in Horovod: Compression.none, .fp16, .bf16."""

  none = NoneCompressor
  fp16 = FP16Compressor
  bf16 = BF16Compressor

  @classmethod
  def get(cls, name):
    """Returns the compressor called `name` ("none", "fp16" or "bf16").

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    compressors = {"none": cls.none, "fp16": cls.fp16, "bf16": cls.bf16}
    try:
      return compressors[str(name).lower()]
    except KeyError:
      raise ValueError(f"compression={name!r} is not valid; valid values: "
                       f"{', '.join(compressors)}.") from None
