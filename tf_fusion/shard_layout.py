"""Who updates what under the sharded weight update: flat packs cut into equal shards.

The variables an optimizer updates are grouped into packs, as the gradients are
(packing.plan_packs: per dtype, back-propagation order, the same thresholds), and each
pack, laid flat and padded to a multiple of the replica count N, is cut into N equal
shards: replica s owns shard s of every pack. A shard crosses variable boundaries; the
part of one variable inside one shard is a `Segment`, and the optimizer's state of a
shard is held segment by segment (so per-variable choices such as weight-decay
exclusions still apply). Even, flat shards keep the replicas balanced whatever the
sizes of the variables; owning whole variables would not (DeepSpeed and PyTorch/XLA
moved to flat partitions for that reason).

Pure Python over (dtype, shape) specs: no op is built here.

References:
  Xu et al. 2020, "Automatic Cross-Replica Sharding of Weight Update in Data-Parallel
  Training", arXiv:2004.13336.
  Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", arXiv:1910.02054 (stage 1).
"""

import dataclasses
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_fusion import packing

# A shard's size is a multiple of this many bytes: shards start aligned (see
# packing.SHARD_ALIGN_BYTES), so slicing a pack buffer copies nothing on CPUs.
_ALIGN_BYTES = packing.SHARD_ALIGN_BYTES


@dataclasses.dataclass(frozen=True)
class Segment:
  """The part of one variable inside one shard.

  Attributes:
    variable: the variable's index in the optimizer's variable list.
    start: its first element in the flattened variable.
    size: how many elements.
    offset: where it starts inside the shard.
  """

  variable: int
  start: int
  size: int
  offset: int


@dataclasses.dataclass(frozen=True)
class ShardedPack:
  """One pack of variables, flat and padded, cut into `num_shards` equal shards.

  Attributes:
    index: the pack's place in the layout (launch order).
    dtype: the variables' dtype.
    variables: their indices, in the order they lie in the pack.
    sizes: their element counts, in that order.
    num_shards: N, the number of replicas.
    shard_size: elements per shard; `shard_size * num_shards` >= the pack's size.
  """

  index: int
  dtype: tf.DType
  variables: Tuple[int, ...]
  sizes: Tuple[int, ...]
  num_shards: int
  shard_size: int

  @property
  def size(self) -> int:
    """Elements of the pack, without padding."""
    return int(sum(self.sizes))

  @property
  def padded_size(self) -> int:
    return self.shard_size * self.num_shards

  def segments(self, shard: int) -> Tuple[Segment, ...]:
    """The segments of shard `shard`, in the order they lie in it."""
    lo, hi = shard * self.shard_size, (shard + 1) * self.shard_size
    out, start = [], 0
    for var, size in zip(self.variables, self.sizes):
      a, b = max(lo, start), min(hi, start + size)
      if a < b:
        out.append(Segment(var, a - start, b - a, a - lo))
      start += size
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Every pack of one optimizer's variables, and which shard holds what.

  Example:
    >>> layout = plan_layout([(tf.float32, (10, 3)), (tf.float32, (3,))], 4, 0)
    >>> [p.shard_size for p in layout.packs]
    [16]
  """

  packs: Tuple[ShardedPack, ...]
  num_shards: int
  shapes: Tuple[Tuple[int, ...], ...]

  def segments(self, shard: int) -> List[Tuple[ShardedPack, Segment]]:
    """(pack, segment) of every segment of shard `shard`, pack by pack."""
    return [(p, s) for p in self.packs for s in p.segments(shard)]

  def variable_segments(self, variable: int) -> List[Tuple[int, Segment]]:
    """(shard, segment) of every piece of `variable`, in element order."""
    for p in self.packs:
      if variable in p.variables:
        return [(shard, s) for shard in range(self.num_shards)
                for s in p.segments(shard) if s.variable == variable]
    raise ValueError(f"variable {variable} is not in the layout.")

  def state_elements(self, shard: int) -> int:
    """Elements of shard `shard` that hold a variable's part (padding excluded)."""
    return sum(s.size for _, s in self.segments(shard))


def plan_layout(specs: Sequence[Tuple[tf.DType, Sequence[int]]], num_shards: int,
                pack_bytes: int, first_pack_bytes: int = 0) -> Layout:
  """The layout of variables of `specs` ((dtype, shape), the optimizer's order) over
  `num_shards` replicas, packed as packing.plan_packs packs them.

  Raises:
    ValueError: a shape that is not fully known, or num_shards < 1.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
  shapes = []
  for i, (dtype, shape) in enumerate(specs):
    shape = tf.TensorShape(shape)
    if not shape.is_fully_defined():
      raise ValueError(f"variable {i} has shape {shape}: a sharded update needs the "
                       "full shape of every variable.")
    shapes.append(tuple(shape.as_list()))
  packs = []
  for index, p in enumerate(packing.plan_packs(specs, pack_bytes, first_pack_bytes)):
    sizes = tuple(int(np.prod(shapes[i], dtype=np.int64)) for i in p.indices)
    align = max(1, _ALIGN_BYTES // tf.as_dtype(p.dtype).size)
    per = -(-sum(sizes) // num_shards)
    per = -(-per // align) * align
    packs.append(ShardedPack(index, tf.as_dtype(p.dtype), tuple(p.indices), sizes,
                             num_shards, per))
  return Layout(tuple(packs), num_shards, tuple(shapes))
