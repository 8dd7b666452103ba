"""Wire compression: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx).

The interface of horovod/tensorflow/compression.py. Only floating tensors wider than 16
bits are cast; integers and 16-bit floats travel unchanged. FP16 halves the bytes on the
wire (Jia et al. 2018, technique 8); gradients keep their loss scaling on the wire so
that small values do not flush to zero, and a pack whose sum overflows FP16 becomes inf,
which the loss-scale optimizer treats like any other overflow.
"""

import tensorflow as tf


class NoneCompressor:
  """Leaves tensors as they are."""

  name = "none"

  @staticmethod
  def compress(tensor):
    return tensor, None

  @staticmethod
  def decompress(tensor, ctx):
    del ctx
    return tensor

  @staticmethod
  def wire_dtype(dtype):
    return tf.as_dtype(dtype)


class FP16Compressor:
  """Casts floating tensors wider than 16 bits to float16 for the wire."""

  name = "fp16"

  @staticmethod
  def wire_dtype(dtype):
    dtype = tf.as_dtype(dtype)
    if dtype.is_floating and dtype.size > 2:
      return tf.float16
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


class Compression:
  """The compressors by name, as in Horovod: Compression.none, Compression.fp16."""

  none = NoneCompressor
  fp16 = FP16Compressor

  @classmethod
  def get(cls, name):
    """Returns the compressor called `name` ("none" or "fp16").

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    compressors = {"none": cls.none, "fp16": cls.fp16}
    try:
      return compressors[str(name).lower()]
    except KeyError:
      raise ValueError(f"compression={name!r} is not valid; valid values: "
                       f"{', '.join(compressors)}.") from None
