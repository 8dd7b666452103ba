"""What each batch reduction launched: one PackPlan per collective, and its trace name.

`FusedAllReduce.last_plan` holds the plan of the latest batch reduction (set when the
train step is traced, since that is when TensorFlow calls the cross-device ops). Each
pack's ops run under the name scope `pack_scope(entry)`, so a TensorBoard profile shows
one span per pack, named after its index, algorithm and size.
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """One pack of a batch reduction.

  Attributes:
    index: launch order (back-propagation order).
    dtype: the tensors' dtype.
    tensor_count: how many tensors the pack holds.
    bytes: their total size in bytes (None if a shape is unknown).
    algorithm: how the pack is reduced ("ring", "reduce_to_one", "hierarchical").
    wire_dtype: the dtype on the wire (float16 under fp16 compression).
    wire_bytes: bytes on the wire per device (None if unknown).
    tensor_indices: positions of the pack's tensors in the reduced list.
    predicted_seconds: the cost model's prediction, when one was used.
    note: why the algorithm differs from the one asked for, if it does.
  """

  index: int
  dtype: tf.DType
  tensor_count: int
  bytes: Optional[int]
  algorithm: str
  wire_dtype: tf.DType
  wire_bytes: Optional[int]
  tensor_indices: Tuple[int, ...]
  predicted_seconds: Optional[float] = None
  note: str = ""

  @property
  def num_tensors(self) -> int:
    return self.tensor_count

  @property
  def nbytes(self) -> Optional[int]:
    return self.bytes

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["dtype"] = self.dtype.name
    d["wire_dtype"] = self.wire_dtype.name
    d["tensor_indices"] = list(self.tensor_indices)
    return d

  def __getitem__(self, key):
    return self.as_dict()[key]


def pack_scope(entry: PackPlan) -> str:
  """The name scope of a pack's ops, e.g. 'tf_fusion_pack_003_ring_4194304B'."""
  size = "unknown" if entry.wire_bytes is None else f"{entry.wire_bytes}B"
  return f"tf_fusion_pack_{entry.index:03d}_{entry.algorithm}_{size}"


def summarize(plan: Sequence[PackPlan]) -> str:
  """A short text table of a plan, for logs and reports: PackPlans or their
  as_dict()s (as a run's stats hold them)."""
  lines = [f"{'pack':>4} {'dtype':>8} {'tensors':>7} {'bytes':>12} {'wire':>12} "
           f"{'algorithm':>13}"]
  for e in plan:
    lines.append(f"{e['index']:>4} {tf.as_dtype(e['dtype']).name:>8} "
                 f"{e['tensor_count']:>7} {str(e['bytes']):>12} {str(e['wire_bytes']):>12} "
                 f"{e['algorithm']:>13}" + (f"  ({e['note']})" if e["note"] else ""))
  total = sum(e["bytes"] or 0 for e in plan)
  lines.append(f"{len(plan)} packs, {sum(e['tensor_count'] for e in plan)} tensors, "
               f"{total} bytes")
  return "\n".join(lines)
