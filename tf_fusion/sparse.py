"""Sparse gradients (IndexedSlices) in the fused plan: gathered together, or densified.

An embedding's gradient is an IndexedSlices: the rows a batch touched (values) and
their row numbers (indices). Its sum over the replicas can travel two ways:
- gather: every replica receives every replica's rows and indices; the sum is left
  implied (duplicate indices are allowed, and optimizers add them up). The bytes grow
  with tokens x replicas, not with the table. All gathered gradients of one dtype
  travel together, one all-gather of their values and one of their indices (and, when
  a row count is not known when the step is traced, one small all-gather of the counts
  first), where TensorFlow runs three or four collectives per tensor;
- dense: the table-sized tensor, summed in the dense packs (and on the 16-bit wire).
  The bytes grow with the table, not the batch.
Which is cheaper depends on tokens per replica, replicas and table size (tensorflow
#53160, horovod#966): `choose` decides per tensor from the cost model, and
FusionOptions.sparse can force either. On one worker the gather itself runs as a ring
all-gather or to one device and back, as the cost model prices them (`gather_cost`).
"""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_fusion import compression
from tf_fusion import cost_model
from tf_fusion.collectives import on_device
from tf_fusion.plans import PackPlan

GATHER, DENSE = "gather", "dense"
# On one worker a gather can also run as TensorFlow's ReductionToOneDevice does: every
# device's rows copied to the first, concatenated, copied back (no collective).
GATHER_TO_ONE = "gather_to_one"
GATHERS = (GATHER, GATHER_TO_ONE)


@dataclasses.dataclass(frozen=True)
class SparseSpec:
  """What planning needs of one IndexedSlices gradient (the same on every replica).

  Attributes:
    dtype: the values' dtype.
    row_shape: the shape of one row (values.shape[1:]), always known.
    rows: rows per replica, None when not known at trace time or not the same on
      every local replica.
    dense_shape: the table's shape, None when not known at trace time.
    index_dtype: the indices' dtype.
  """

  dtype: tf.DType
  row_shape: Tuple[int, ...]
  rows: Optional[int]
  dense_shape: Optional[Tuple[int, ...]]
  index_dtype: tf.DType

  @classmethod
  def of(cls, replicas: Sequence[tf.IndexedSlices]) -> "SparseSpec":
    """The spec of one IndexedSlices gradient, from every local replica's value."""
    first = replicas[0]
    rows = {s.values.shape[0] for s in replicas}
    dense_shape = tf.get_static_value(first.dense_shape) if first.dense_shape is not None \
        else None
    return cls(first.values.dtype, tuple(first.values.shape[1:].as_list()),
               rows.pop() if len(rows) == 1 else None,
               None if dense_shape is None else tuple(int(d) for d in dense_shape),
               first.indices.dtype)

  @property
  def row_elements(self) -> int:
    return int(np.prod(self.row_shape, dtype=np.int64))

  @property
  def values_shape(self) -> tf.TensorShape:
    return tf.TensorShape([self.rows] + list(self.row_shape))

  def gather_nbytes(self) -> Optional[int]:
    """Bytes one replica sends: its rows and their int64 indices (None if unknown)."""
    if self.rows is None:
      return None
    return self.rows * (self.row_elements * self.dtype.size + 8)

  def dense_nbytes(self, wire_dtype) -> Optional[int]:
    """Bytes of the dense table on the wire (None if its shape is unknown)."""
    if self.dense_shape is None:
      return None
    return int(np.prod(self.dense_shape, dtype=np.int64)) * wire_dtype(self.dtype).size


def fusible(replicas) -> bool:
  """Whether a per-replica value is an IndexedSlices gradient the plan can take: every
  replica's value an IndexedSlices of a floating dtype with a known row shape."""
  return all(isinstance(s, tf.IndexedSlices) and s.values.dtype.is_floating
             and s.values.shape.rank is not None and s.values.shape[1:].is_fully_defined()
             for s in replicas)


def gather_cost(model, nbytes: int, group_size: int, allowed=(GATHER,)
                ) -> Tuple[str, Optional[float]]:
  """(GATHER or GATHER_TO_ONE, predicted seconds) of gathering `nbytes` per replica,
  the cheaper of the `allowed` ways.

  A ring all-gather of b bytes per replica moves (G-1)·b through each device, as a ring
  all-reduce of G·b/2 does. To one device and back moves (G-1)·b in and G·b to each of
  the G-1 others, as reduce_to_one of (G+1)·b/2 does (one worker, one launch for all
  devices only). Predictions within cost_model.MARGIN: the first of `allowed`.
  """
  equivalent = {GATHER: ("ring", group_size * nbytes // 2 if nbytes is not None else None),
                GATHER_TO_ONE: ("reduce_to_one",
                                (group_size + 1) * nbytes // 2 if nbytes is not None
                                else None)}
  options = [(model.seconds(*equivalent[a]), a) for a in allowed
             if model is not None and nbytes is not None
             and equivalent[a][0] in model.alpha]
  if not options:
    return allowed[-1], None
  # Near-ties: the first allowed (the ring's all-gather before the trip to one device).
  seconds, algorithm = cost_model.first_close(options)
  return algorithm, seconds


def choose(spec: SparseSpec, option: str, group_size: int, wire_dtype, model=None,
           allowed=(GATHER,)) -> Tuple[str, str]:
  """(GATHER or DENSE, the reason) for one IndexedSlices under FusionOptions.sparse
  `option`, over `group_size` replicas.

  The dense table of D bytes is an all-reduce of D; the gather is priced by
  `gather_cost`. Under "auto" the cost model (the best algorithm for each) decides when
  it predicts one clearly faster (cost_model.MARGIN); without a model, or when the two
  are that close (small tables, where both are a launch), the bytes do: the gather as
  the ring's G·b/2 against the table, ties to the table.
  """
  if option == GATHER:
    return GATHER, "sparse='gather'"
  dense = spec.dense_nbytes(wire_dtype)
  if dense is None:
    return GATHER, "gathered: the table's shape is not known when traced"
  if option == DENSE:
    return DENSE, "sparse='dense'"
  rows = spec.gather_nbytes()
  if rows is None:
    return GATHER, ("gathered: rows per replica not known when traced, or not the same "
                    "on every replica")
  choice = GATHER if group_size * rows // 2 < dense else DENSE   # the fewer bytes
  why = f"{group_size} x {rows} B of rows vs the {dense} B table"
  _, gather_s = gather_cost(model, rows, group_size, allowed)
  if gather_s is not None:
    dense_s = min(model.seconds(a, dense) for a in model.algorithms)
    timed = (f"{group_size} x {rows} B of rows ({1e6 * gather_s:.0f} us) vs the "
             f"{dense} B table ({1e6 * dense_s:.0f} us)")
    if cost_model.clearly_faster(gather_s, dense_s):
      choice, why = GATHER, timed
    elif cost_model.clearly_faster(dense_s, gather_s):
      choice, why = DENSE, timed
    else:
      why = timed + ", too close to call: the fewer bytes"
  return choice, f"{'gathered' if choice == GATHER else 'densified'}: {why}"


def densify(slices: tf.IndexedSlices, spec: SparseSpec) -> tf.Tensor:
  """The dense table of `slices` (duplicate indices added up)."""
  flat = tf.reshape(slices.values, [-1, spec.row_elements])
  summed = tf.math.unsorted_segment_sum(flat, slices.indices, spec.dense_shape[0])
  return tf.reshape(summed, spec.dense_shape)


def gather_plan(specs: Sequence[SparseSpec], start: int, first_index: int,
                reasons: Sequence[str], model=None, group_size: int = 1,
                allowed=(GATHER,)) -> Tuple[PackPlan, ...]:
  """The plan entries of the gathered tensors `specs` (positions start, start+1, ...
  in the reduced list): one per dtype, launched after the dense packs, each by the
  `allowed` gather that `gather_cost` finds cheaper."""
  by_dtype = {}
  for k, spec in enumerate(specs):
    by_dtype.setdefault(spec.dtype, []).append(k)
  entries = []
  for dtype, members in by_dtype.items():
    sizes = [specs[k].gather_nbytes() for k in members]
    nbytes = None if None in sizes else sum(sizes)
    algorithm, seconds = gather_cost(model, nbytes, group_size, allowed)
    entries.append(PackPlan(
        index=first_index + len(entries), dtype=dtype, tensor_count=len(members),
        bytes=nbytes, algorithm=algorithm, wire_dtype=dtype, wire_bytes=nbytes,
        tensor_indices=tuple(start + k for k in members), predicted_seconds=seconds,
        note="; ".join(dict.fromkeys(reasons[k] for k in members))))
  return tuple(entries)


def gather(per_device: List[List[tf.IndexedSlices]], launch, divisor: int = 1,
           carries_timeout: bool = False, to_one: bool = False
           ) -> List[List[tf.IndexedSlices]]:
  """Every replica's rows of the IndexedSlices `per_device` (one list per device of
  `launch`, the same tensors on each), gathered in one all-gather of values and one
  of indices; MEAN's `divisor` applied to the values. Returns the lists of gathered
  IndexedSlices, on each device. `to_one`: through the first device instead of
  all-gathers (GATHER_TO_ONE)."""
  specs = [SparseSpec.of([slices[k] for slices in per_device])
           for k in range(len(per_device[0]))]
  known = all(s.rows is not None for s in specs)
  values, indices, counts = [], [], []
  for device, slices in zip(launch.devices, per_device):
    with on_device(device):
      values.append(tf.concat([tf.reshape(s.values, [-1]) for s in slices], 0))
      indices.append(tf.concat([tf.cast(s.indices, tf.int64) for s in slices], 0))
      if not known:
        counts.append(tf.stack([tf.shape(s.indices, out_type=tf.int64)[0]
                                for s in slices]))
  devices = launch.devices
  if to_one:
    # Joined on the first device, unpacked there once, the parts copied to the others.
    all_gather = lambda buffers, carries_timeout=False: [_joined(buffers, devices[0])]
  else:
    all_gather = launch.gather
  if not known:
    counts = all_gather(counts)
    values, indices = _padded(values, indices, counts * len(devices) if to_one else counts,
                              specs, devices)
  values = all_gather(values)
  indices = all_gather(indices, carries_timeout=carries_timeout)
  group = launch.collectives.group_size
  out = []
  for d, device in enumerate(devices[:1] if to_one else devices):
    with on_device(device):
      out.append(_unpack(values[d], indices[d], None if known else counts[d], specs,
                         per_device[d], divisor, group))
  if to_one:
    out = [[_copied(s, device) for s in out[0]] for device in devices]
  return out


def _joined(buffers, device):
  with on_device(device):
    return tf.concat(list(buffers), 0)


def _copied(slices, device):
  with on_device(device):
    return tf.IndexedSlices(tf.identity(slices.values), tf.identity(slices.indices),
                            slices.dense_shape)


def _row_elements(specs):
  return tf.constant([s.row_elements for s in specs], tf.int64)


def _padded(values, indices, counts, specs, devices):
  """Each device's buffers padded to the longest replica's (the gather needs one size)."""
  out_values, out_indices = [], []
  for device, v, i, c in zip(devices, values, indices, counts):
    with on_device(device):
      table = tf.reshape(c, [-1, len(specs)])
      value_lengths = tf.reduce_sum(table * _row_elements(specs), axis=1)
      index_lengths = tf.reduce_sum(table, axis=1)
      out_values.append(tf.pad(v, [[0, tf.reduce_max(value_lengths) - tf.size(
          v, out_type=tf.int64)]]))
      out_indices.append(tf.pad(i, [[0, tf.reduce_max(index_lengths) - tf.size(
          i, out_type=tf.int64)]]))
  return out_values, out_indices


def _unpack(values, indices, counts, specs, like, divisor, group):
  """One device's gathered buffers back into one IndexedSlices per spec."""
  k = len(specs)
  if counts is None and k == 1:   # one table: the buffers are its rows, nothing to split
    value_parts, index_parts = [values], [indices]
  elif counts is None:   # every replica sent the same static rows: fixed offsets
    rows = [s.rows for s in specs]
    value_parts = tf.split(tf.reshape(values, [-1, sum(r * s.row_elements for r, s in
                                                       zip(rows, specs))]),
                           [r * s.row_elements for r, s in zip(rows, specs)], axis=1)
    index_parts = tf.split(tf.reshape(indices, [-1, sum(rows)]), rows, axis=1)
  else:
    table = tf.reshape(counts, [group, k])
    value_lengths = table * _row_elements(specs)
    value_stride = tf.reduce_max(tf.reduce_sum(value_lengths, axis=1))
    index_stride = tf.reduce_max(tf.reduce_sum(table, axis=1))
    per_replica_values, per_replica_indices = [], []
    for r in range(group):
      per_replica_values.append(tf.split(
          values[r * value_stride:r * value_stride + tf.reduce_sum(value_lengths[r])],
          value_lengths[r], num=k))
      per_replica_indices.append(tf.split(
          indices[r * index_stride:r * index_stride + tf.reduce_sum(table[r])],
          table[r], num=k))
    value_parts = [tf.concat([p[j] for p in per_replica_values], 0) for j in range(k)]
    index_parts = [tf.concat([p[j] for p in per_replica_indices], 0) for j in range(k)]
  out = []
  for spec, v, i, original in zip(specs, value_parts, index_parts, like):
    v = tf.reshape(v, [-1] + list(spec.row_shape))
    if divisor != 1:
      v = compression.divide(v, divisor)
    out.append(tf.IndexedSlices(v, tf.cast(tf.reshape(i, [-1]), spec.index_dtype),
                                original.dense_shape))
  return out


@dataclasses.dataclass(frozen=True)
class Arrangement:
  """How one batch reduction's tensors enter the plan: the dense ones and the
  densified IndexedSlices first (in their order), then the gathered ones.

  Attributes:
    positions: for each arranged tensor, its position in the batch.
    densify: for each arranged tensor, the SparseSpec it is densified by, or None.
    gathered: (SparseSpec, reason) of each gathered tensor, in arranged order after
      the dense ones.
    densified_reasons: (arranged position, reason) of each densified tensor.
    specs: (dtype, shape) of the dense arranged tensors, for the planner.
  """

  positions: Tuple[int, ...]
  densify: Tuple[Optional[SparseSpec], ...]
  gathered: Tuple[Tuple[SparseSpec, str], ...] = ()
  densified_reasons: Tuple[Tuple[int, str], ...] = ()
  specs: tuple = dataclasses.field(default=(), compare=False, hash=False)

  @classmethod
  def of(cls, per_device, option, group_size, wire_dtype, model_fn, allowed=(GATHER,)
         ) -> "Arrangement":
    """The arrangement of `per_device` (one list per local device) under
    FusionOptions.sparse `option`; `model_fn()` gives the cost model for "auto" (called
    only if an IndexedSlices is there); `allowed`: the gathers possible (gather_cost)."""
    first = per_device[0]
    dense, densify, reasons, gathered = [], [], [], []
    model = None
    for i, t in enumerate(first):
      if not isinstance(t, tf.IndexedSlices):
        dense.append(i)
        densify.append(None)
        continue
      spec = SparseSpec.of([tensors[i] for tensors in per_device])
      if model is None and option == "auto":
        model = model_fn()
      choice, reason = choose(spec, option, group_size, wire_dtype, model, allowed)
      if choice == DENSE:
        reasons.append((len(dense), reason))
        dense.append(i)
        densify.append(spec)
      else:
        gathered.append((i, spec, reason))
    specs = tuple((first[i].dtype, first[i].shape) if s is None else
                  (s.dtype, tf.TensorShape(s.dense_shape)) for i, s in zip(dense, densify))
    return cls(tuple(dense) + tuple(i for i, _, _ in gathered),
               tuple(densify) + (None,) * len(gathered),
               tuple((s, r) for _, s, r in gathered), tuple(reasons), specs)

  def arrange(self, tensors):
    """One device's tensors in plan order, the densified ones made dense."""
    return [tensors[p] if s is None else densify(tensors[p], s)
            for p, s in zip(self.positions, self.densify)]

  def restore(self, arranged):
    """One device's reduced tensors back in the batch's order."""
    out = [None] * len(arranged)
    for p, t in zip(self.positions, arranged):
      out[p] = t
    return out

  def around(self, reduce_fn):
    """`reduce_fn` (lists of dense and gathered tensors per device, in plan order, to
    their reductions) as a function of the batch's own per-device lists."""
    def reduce_batch(per_device):
      outputs = reduce_fn([self.arrange(tensors) for tensors in per_device])
      return [self.restore(out) for out in outputs]
    return reduce_batch

  def marked(self, plan):
    """`plan` (over the arranged tensors) with the densified tensors and their
    reasons on the packs that carry them."""
    if not self.densified_reasons:
      return plan
    reasons = dict(self.densified_reasons)
    out = []
    for e in plan:
      mine = tuple(i for i in e.tensor_indices if i in reasons)
      if mine:
        note = "; ".join(dict.fromkeys([e.note] * bool(e.note) + [reasons[i] for i in mine]))
        e = dataclasses.replace(e, densified=mine, note=note)
      out.append(e)
    return tuple(out)
