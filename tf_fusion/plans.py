"""The plan of one batch reduction: its packs, their algorithms, and how it is built.

A plan is a tuple of PackPlan, one per collective, in launch order. `build_plan` makes
it from the tensors' (dtype, shape) list: packing.plan_packs groups the tensors, and
`assign` gives each pack the algorithm the request names or, under "auto" (the hybrid
all-reduce of Jia et al. 2018), the one the calibrated cost model predicts fastest,
splitting a pack back into single tensors when the copies cost more than the launches
they save (on a shared-memory CPU host they do; on GPUs with per-launch latency of tens
of microseconds they do not). `Topology` says which algorithms one worker or several
can run, and what a request for another one means there.

Pure Python over specs and a cost model: no op is built here.
"""

import dataclasses
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from tf_fusion import algorithms
from tf_fusion import cost_model
from tf_fusion import packing

REPLICA_LAUNCH_NOTE = ("no merge_call here (a cond or loop in the replica function, or "
                       "XLA): each replica launches its own collectives, so every pack "
                       "runs the ring")


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
    note: why the algorithm differs from the one asked for, if it does; for sparse
      gradients, why each was gathered or densified.
    densified: positions (as tensor_indices) of the pack's tensors that were
      IndexedSlices made dense (FusionOptions.sparse).
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
  densified: Tuple[int, ...] = ()

  def as_dict(self) -> dict:
    """The entry as plain JSON-ready values (dtype names, lists)."""
    d = dataclasses.asdict(self)
    d["dtype"] = self.dtype.name
    d["wire_dtype"] = self.wire_dtype.name
    d["tensor_indices"] = list(self.tensor_indices)
    d["densified"] = list(self.densified)
    return d

  def __getitem__(self, key):
    return self.as_dict()[key]


@dataclasses.dataclass(frozen=True)
class Topology:
  """Which algorithms a reduction over one worker, or several, runs.

  Attributes:
    multi_worker: the reduction crosses workers (MultiWorkerFusedAllReduce).
    num_workers: how many workers; every worker has the same local devices.

  Example:
    >>> Topology.local().resolve("hierarchical")[0]
    'reduce_to_one'
  """

  multi_worker: bool = False
  num_workers: int = 1

  @classmethod
  def local(cls) -> "Topology":
    """One worker."""
    return cls(False, 1)

  @classmethod
  def across(cls, num_workers: int) -> "Topology":
    """`num_workers` workers, each with the same local devices."""
    return cls(True, int(num_workers))

  @property
  def algorithms(self) -> Tuple[str, ...]:
    """What "auto" chooses from, and what a cost model is calibrated for."""
    if self.multi_worker:
      return algorithms.MULTI_WORKER_ALGORITHMS
    return algorithms.LOCAL_ALGORITHMS

  @property
  def unknown_size_algorithm(self) -> str:
    """For packs of unknown size: needs no size agreement, safe on zero elements."""
    return "hierarchical" if self.multi_worker else "reduce_to_one"

  def group_size(self, local_devices: Sequence[str]) -> int:
    """Devices of every worker."""
    return len(local_devices) * self.num_workers

  def resolve(self, algorithm: str) -> Tuple[str, str]:
    """(the algorithm that runs for a request of `algorithm`, why it differs or "")."""
    if self.multi_worker and algorithm == "reduce_to_one":
      return "hierarchical", (
          "reduce_to_one across workers is hierarchical: reduce to one device per worker, "
          "all-reduce those, broadcast")
    if not self.multi_worker and algorithm == "hierarchical":
      return "reduce_to_one", (
          "hierarchical on one worker is reduce_to_one: reduce in the worker, nothing to "
          "cross, broadcast in the worker")
    return algorithm, ""


def build_plan(specs, pack_bytes: int, first_pack_bytes: int, wire_dtype: Callable,
               algorithm: str, model: Optional[cost_model.CostModel] = None,
               note: str = "", unknown_size_algorithm: str = "reduce_to_one"
               ) -> Tuple[PackPlan, ...]:
  """The plan for tensors of `specs` ((dtype, shape), forward order) at these
  thresholds: packs in back-propagation order, each with its algorithm (`assign`),
  wire dtype and sizes, and `note` (why the algorithm differs from the request)."""
  packs = packing.plan_packs(specs, pack_bytes, first_pack_bytes)
  plan = []
  for index, (p, alg, seconds) in enumerate(assign(
      packs, specs, wire_dtype, algorithm, model,
      unknown_size_algorithm=unknown_size_algorithm)):
    plan.append(PackPlan(
        index=index, dtype=p.dtype, tensor_count=len(p.indices), bytes=p.nbytes,
        algorithm=alg, wire_dtype=wire_dtype(p.dtype),
        wire_bytes=wire_nbytes(p, specs, wire_dtype),
        tensor_indices=p.indices, predicted_seconds=seconds, note=note))
  return tuple(plan)


def renumbered(plan, positions) -> Tuple[PackPlan, ...]:
  """`plan` with tensor indices mapped through `positions` (where each tensor of the
  planned sub-list stands in the list the user reduced)."""
  return tuple(dataclasses.replace(
      e, tensor_indices=tuple(positions[i] for i in e.tensor_indices),
      densified=tuple(positions[i] for i in e.densified)) for e in plan)


class Assignment(NamedTuple):
  """One pack with the algorithm `assign` gave it: the step between packing.Pack (which
  tensors) and PackPlan (everything the plan says about the pack)."""
  pack: packing.Pack
  algorithm: str
  predicted_seconds: Optional[float]


def assign(packs: Sequence[packing.Pack],
           specs: Sequence[Tuple[tf.DType, tf.TensorShape]],
           wire_dtype,
           algorithm: str,
           model: Optional[cost_model.CostModel] = None,
           unknown_size_algorithm: str = "reduce_to_one",
           ) -> List["Assignment"]:
  """Gives each pack an algorithm; under "auto", may split a pack into singletons
  (when the model predicts that clearly cheaper, by cost_model.MARGIN).

  Args:
    packs: from packing.plan_packs.
    specs: the (dtype, shape) list the packs index into.
    wire_dtype: function from a tensor dtype to its dtype on the wire.
    algorithm: a local algorithm name, or "auto" (needs `model`).
    model: the cost model for "auto".
    unknown_size_algorithm: for packs of unknown size: one that needs no size
      agreement between devices and is safe on zero elements (reduce_to_one on one
      worker, hierarchical on several).

  Returns:
    Assignment(pack, algorithm, predicted seconds or None) in launch order. An empty pack
    gets "none" (nothing to send); a pack of unknown size gets
    `unknown_size_algorithm`.
  """
  if algorithm == "auto" and model is None:
    raise ValueError("algorithm='auto' needs a calibrated CostModel.")
  out = []
  for p in packs:
    if p.nbytes == 0:
      out.append(Assignment(p, "none", 0.0))
      continue
    if p.nbytes is None:
      out.append(Assignment(p, unknown_size_algorithm, None))
      continue
    if algorithm != "auto":
      out.append(Assignment(p, algorithm, _predict(model, algorithm, p, specs, wire_dtype)))
      continue
    fused_alg = _best(model, p, specs, wire_dtype)
    fused = _predict(model, fused_alg, p, specs, wire_dtype)
    singles = [packing.Pack(p.dtype, (i,), packing.tensor_nbytes(*specs[i]))
               for i in p.indices]
    if any(s.nbytes == 0 for s in singles):  # Empty tensors ride along for free.
      singles = [s for s in singles if s.nbytes] + [
          packing.Pack(p.dtype, tuple(s.indices[0] for s in singles if not s.nbytes), 0)]
    singles = [(s, _best(model, s, specs, wire_dtype) if s.nbytes else "none")
               for s in singles]
    split = [Assignment(s, a, _predict(model, a, s, specs, wire_dtype) if s.nbytes else 0.0)
             for s, a in singles]
    # Split only when clearly cheaper: a near-tie keeps the one launch.
    if len(split) > 1 and cost_model.clearly_faster(sum(t for _, _, t in split), fused):
      out.extend(split)
    else:
      out.append(Assignment(p, fused_alg, fused))
  return out


def wire_nbytes(p: packing.Pack, specs, wire_dtype) -> Optional[int]:
  """Bytes per device that pack `p` puts on the wire."""
  if p.nbytes is None:
    return None
  return sum(packing.tensor_nbytes(wire_dtype(specs[i][0]), specs[i][1])
             for i in p.indices)


def _best(model, p, specs, wire_dtype):
  return model.best(wire_nbytes(p, specs, wire_dtype) or 0,
                    num_tensors=len(p.indices))


def _predict(model, algorithm, p, specs, wire_dtype):
  if model is None or algorithm not in model.alpha:
    return None
  return model.seconds(algorithm, wire_nbytes(p, specs, wire_dtype) or 0,
                       len(p.indices))
