"""Workers that agree, or say why: the same gradient list and the same plan everywhere.

Mismatched collectives across workers hang with no name or, when sizes happen to
match, give silently wrong sums. Options, an environment variable, a cost model file or
a model that differ between workers all end in one of the checks here, on every worker
at once, with what differs and where. Each check is one small sum across workers while
the step is traced, once per distinct list or plan: it costs nothing per step.
"""

import zlib
from typing import Dict, List

import numpy as np
import tensorflow as tf

from tf_fusion import stats
from tf_fusion.collectives import Collectives


class Agreement:
  """The checks of one MultiWorkerFusedAllReduce (it remembers what passed).

  Args:
    num_workers: workers in the cluster.
    rank: this worker's index, 0..num_workers-1, or None to read it from the strategy
      in scope when first needed.
  """

  def __init__(self, num_workers: int, rank=None):
    self.num_workers = int(num_workers)
    self._rank = rank
    self._lists = set()
    self._plans = set()

  def rank(self) -> int:
    if self._rank is not None:
      return self._rank
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None or resolver.task_id is None:
      raise ValueError("tf_fusion: cannot tell this worker's index; pass worker_index.")
    return resolver.task_id

  def check_gradients(self, specs, collectives: Collectives) -> None:
    """Raises on every worker if the workers' tensor lists differ (count, shape, dtype).

    The signature (count and two hashes of the dtypes and shapes) is summed across
    workers; equal lists give exactly num_workers times one's own signature.
    """
    key = tuple((dtype.name, tuple(tf.TensorShape(shape).as_list())) for dtype, shape in specs)
    if key in self._lists:
      return
    text = repr(key).encode()
    mine = np.array([len(key), zlib.crc32(text), zlib.adler32(text)], np.float64)
    total = collectives.sum_across_workers(mine)
    n = self.num_workers
    if total[0] != mine[0] * n:
      raise ValueError(
          f"tf_fusion: the workers all-reduce different numbers of tensors (this worker "
          f"{len(key)}, mean over {n} workers {total[0] / n:g}). Every worker must build "
          "the same model and optimizer.")
    if np.any(total[1:] != mine[1:] * n):
      raise ValueError(
          f"tf_fusion: the workers all-reduce {len(key)} tensors each, but their shapes or "
          f"dtypes differ (this worker: {_describe(key)}). Every worker must build the same "
          "model and optimizer.")
    self._lists.add(key)

  def check_plan(self, plan, collectives: Collectives) -> None:
    """Raises on every worker, naming what differs and where, if the workers' plans
    differ: packs, their order, algorithms, wire dtypes or group sizes."""
    parts = plan_parts(plan, collectives.group_size, len(collectives.devices))
    key = tuple(parts.values())
    if key in self._plans:
      return
    rank = self.rank()
    found = differences(collectives, parts, rank)
    if found:
      raise ValueError(
          f"tf_fusion: the workers would run different all-reduce plans: "
          f"{'; '.join(found)}. This is worker {rank}, whose plan is:\n"
          f"{stats.summarize(plan)}\nGive every worker the same FusionOptions, "
          "TF_FUSION_* environment variables and cost model file.")
    self._plans.add(key)


def differences(collectives: Collectives, parts: Dict[str, float], rank: int) -> List[str]:
  """What differs between the workers' `parts` ({name: float64-exact hash}), as
  "name (worker(s) 1, 3 differ from worker 0)", one entry per differing part.

  Each worker writes its hashes in its own row (`rank`) of a table that one sum across
  workers hands to everyone, so every worker learns every other's: all of them can
  name the same difference. Every worker must call it at the same point.
  """
  n, k = collectives.num_workers, len(parts)
  table = np.zeros((n, k), np.float64)
  table[rank] = list(parts.values())
  table = collectives.sum_across_workers(table.ravel()).reshape(n, k)
  found = []
  for j, name in enumerate(parts):
    others = [w for w in range(n) if table[w, j] != table[0, j]]
    if others:
      found.append(f"{name} (worker(s) {', '.join(map(str, others))} differ "
                   "from worker 0)")
  return found


def plan_parts(plan, group_size, local_devices) -> Dict[str, float]:
  """Hashes of the parts of a plan that every worker must share (float64-exact)."""
  def crc(value):
    return float(zlib.crc32(repr(value).encode()))
  return {
      "number of packs": float(len(plan)),
      "tensors in each pack and their order": crc([e.tensor_indices for e in plan]),
      "algorithms": crc([e.algorithm for e in plan]),
      "wire dtypes": crc([e.wire_dtype.name if e.wire_dtype else None for e in plan]),
      "pack sizes": crc([e.wire_bytes for e in plan]),
      "group sizes": crc((group_size, local_devices)),
  }


def _describe(key, limit=6):
  shown = ", ".join(f"{d}{list(s)}" for d, s in key[:limit])
  return shown + (f", ... ({len(key) - limit} more)" if len(key) > limit else "")
