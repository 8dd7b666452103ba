"""Tensor fusion: plan packs, pack a list of tensors into one buffer, unpack it.

`plan_packs` is pure Python over (dtype, shape) pairs so it can be tested and reasoned
about without TensorFlow devices; `pack` and `unpack` are the only graph ops. Packs
follow back-propagation order (the reverse of the variable list): the last layer's
gradients are ready first, so their pack can be reduced while earlier layers are still
being differentiated (Jia et al. 2018, section 4; PyTorch DDP's reducer does the same).
"""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Pack:
  """A group of same-dtype tensors reduced by one collective.

  Attributes:
    dtype: the tensors' dtype (a tf.DType).
    indices: positions of the tensors in the original list, in the order they
      are laid out in the packed buffer (back-propagation order).
    nbytes: total size in bytes, or None when a shape is not fully known (such a
      tensor always goes alone).
  """

  dtype: tf.DType
  indices: Tuple[int, ...]
  nbytes: Optional[int]


def tensor_nbytes(dtype, shape) -> Optional[int]:
  """Bytes of a tensor of `dtype` and `shape`; None if the shape is not fully known."""
  shape = tf.TensorShape(shape)
  if not shape.is_fully_defined():
    return None
  return int(np.prod(shape.as_list(), dtype=np.int64)) * tf.as_dtype(dtype).size


def plan_packs(specs: Sequence[Tuple[tf.DType, tf.TensorShape]],
               pack_bytes: int,
               first_pack_bytes: int = 0) -> List[Pack]:
  """Groups tensors into packs per dtype, in back-propagation order.

  Walks the tensors from last to first. For each dtype a pack is filled until the
  next tensor would push it past the threshold, which is `first_pack_bytes` for the
  dtype's first pack (when non-zero) and `pack_bytes` afterwards; a tensor larger
  than the threshold goes alone. Tensors of unknown shape go alone.

  Args:
    specs: (dtype, shape) of each tensor, in variable (forward) order.
    pack_bytes: fusion threshold in bytes; 0 means one pack per dtype.
    first_pack_bytes: threshold of each dtype's first pack, capped at pack_bytes;
      0 means the same as pack_bytes.

  Returns:
    Packs ordered by the back-propagation position of their first tensor. Every
    index of `specs` appears in exactly one pack.

  Raises:
    ValueError: on a negative threshold.
  """
  if pack_bytes < 0 or first_pack_bytes < 0:
    raise ValueError(
        f"pack sizes must be >= 0, got pack_bytes={pack_bytes}, "
        f"first_pack_bytes={first_pack_bytes}.")
  if first_pack_bytes == 0 or pack_bytes == 0:
    first_limit = pack_bytes
  else:
    first_limit = min(first_pack_bytes, pack_bytes)
  packs = []
  open_packs = {}  # dtype -> [indices, nbytes, limit] of the pack being filled.
  started = set()  # dtypes whose first pack has been opened.

  def close(dtype):
    indices, nbytes, _ = open_packs.pop(dtype)
    packs.append(Pack(dtype, tuple(indices), nbytes))

  for index in reversed(range(len(specs))):
    dtype, shape = tf.as_dtype(specs[index][0]), specs[index][1]
    size = tensor_nbytes(dtype, shape)
    if size is None:
      packs.append(Pack(dtype, (index,), None))
      continue
    current = open_packs.get(dtype)
    if current is not None and current[2] and current[1] + size > current[2]:
      close(dtype)
      current = None
    if current is None:
      limit = pack_bytes if dtype in started else first_limit
      started.add(dtype)
      current = open_packs[dtype] = [[], 0, limit]
    current[0].append(index)
    current[1] += size
    if current[2] and current[1] >= current[2]:
      close(dtype)
  for dtype in list(open_packs):
    close(dtype)
  backprop_position = lambda p: len(specs) - 1 - p.indices[0]
  return sorted(packs, key=backprop_position)


def pack(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Flattens and concatenates `tensors` into one rank-1 buffer."""
  flat = [tf.reshape(t, [-1]) for t in tensors]
  if len(flat) == 1:
    return flat[0]
  return tf.concat(flat, axis=0)


# Shards start on multiples of 64 bytes: TF's CPU Slice and Split hand out such a part
# of a buffer without copying it (Eigen's alignment), and GPUs read them coalesced.
SHARD_ALIGN_BYTES = 64


def shard_sizes(num_elements: int, num_shards: int, dtype) -> List[int]:
  """Element counts of at most `num_shards` nearly equal, non-empty, aligned shards of a
  buffer of `num_elements` (fewer shards when it is too small to give each one an
  aligned part; the last shard takes the remainder)."""
  align = max(1, SHARD_ALIGN_BYTES // tf.as_dtype(dtype).size)
  per = -(-num_elements // max(1, num_shards))
  per = max(align, -(-per // align) * align)
  sizes = []
  while num_elements > 0:
    sizes.append(min(per, num_elements))
    num_elements -= sizes[-1]
  return sizes


def unpack(buffer, like: Sequence[tf.Tensor]) -> List[tf.Tensor]:
  """Splits `buffer` back into tensors shaped as `like` (inverse of `pack`).

  `buffer` is one rank-1 tensor, or a list of consecutive shards of one (see
  `unpack_shards`). Static sizes are used when known, so the split needs no shape ops
  at run time; otherwise sizes and shapes are read dynamically.
  """
  if isinstance(buffer, (list, tuple)):
    if len(buffer) > 1:
      return unpack_shards(buffer, like)
    buffer = buffer[0]
  if len(like) == 1:
    return [_reshape_like(buffer, like[0])]
  static = [t.shape.num_elements() for t in like]
  if all(n is not None for n in static):
    sizes = static
  else:
    sizes = tf.stack([tf.size(t) for t in like])
  parts = tf.split(buffer, sizes, num=len(like))
  return [_reshape_like(p, t) for p, t in zip(parts, like)]


def _reshape_like(flat, like):
  if like.shape.is_fully_defined():
    return tf.reshape(flat, like.shape)
  return tf.reshape(flat, tf.shape(like))


def unpack_shards(shards: Sequence[tf.Tensor], like: Sequence[tf.Tensor]) -> List[tf.Tensor]:
  """`unpack` of a buffer held as consecutive shards (static sizes): no concat of the
  whole buffer. Each shard is split at the tensor boundaries inside it; only a tensor
  that straddles shards is concatenated from its pieces (at most one per boundary)."""
  sizes = [t.shape.num_elements() for t in like]
  shard_lengths = [s.shape.num_elements() for s in shards]
  if None in sizes or None in shard_lengths or sum(sizes) != sum(shard_lengths):
    raise ValueError(f"cannot unpack shards of sizes {shard_lengths} into tensors of "
                     f"sizes {sizes}: both must be static and add up to the same.")
  ends = np.cumsum(sizes)
  pieces = [[] for _ in like]
  start = 0
  for shard, length in zip(shards, shard_lengths):
    stop = start + length
    # Cut points inside this shard: tensor ends strictly between start and stop.
    cuts = [int(e) for e in ends if start < e < stop]
    bounds = [start] + cuts + [stop]
    parts = (tf.split(shard, np.diff(bounds).tolist(), num=len(bounds) - 1)
             if cuts else [shard])
    for lo, part in zip(bounds[:-1], parts):
      pieces[int(np.searchsorted(ends, lo, side="right"))].append(part)
    start = stop
  out = []
  for t, p in zip(like, pieces):
    if not p:   # an empty tensor: no element in any shard
      p = [tf.zeros([0], shards[0].dtype)]
    flat = p[0] if len(p) == 1 else tf.concat(p, axis=0)
    out.append(_reshape_like(flat, t))
  return out


def unpack_blocks(blocks: Sequence[tf.Tensor], size: int, block_size: int,
                  like: Sequence[tf.Tensor]) -> List[tf.Tensor]:
  """`unpack` of a buffer of `size` elements held as consecutive blocks of `block_size`
  (one gathered buffer, or a list of blocks), zero padding after `size` dropped."""
  if len(blocks) == 1:
    return unpack(blocks[0][:size], like)
  kept, start = [], 0
  for b in blocks:
    n = min(block_size, max(0, size - start))
    if n == block_size:
      kept.append(b)
    elif n > 0:
      kept.append(b[:n])
    start += block_size
  return unpack_shards(kept, like)
