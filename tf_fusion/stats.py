"""How a plan is shown: its trace names (one name scope per pack) and a text table.

`FusedAllReduce.last_plan` holds the plan of the latest batch reduction (set when the
train step is traced, since that is when TensorFlow calls the cross-device ops). Each
pack's ops run under the name scope `pack_scope(entry)`, so a TensorBoard profile shows
one span per pack, named after its index, algorithm and size.
"""

from typing import Sequence

import tensorflow as tf

from tf_fusion.plans import PackPlan  # the plan's type; re-exported here, where it was
from tf_fusion.sparse import GATHERS   # the algorithms of a plan's gathered entries

__all__ = ["GATHERS", "PackPlan", "pack_scope", "summarize"]


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
