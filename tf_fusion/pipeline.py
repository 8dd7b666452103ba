"""The pack pipeline: every pack of a plan, from the tensors to the reduced tensors.

For each pack, in plan order, under its own name scope (stats.pack_scope): a pack of
sparse gradients is gathered (sparse.gather); a dense one goes range bounds (fp16
only: one tiny all-reduce of each tensor's max |x|, under the scope "range") -> encode (cast, scale, concat) -> launch -> finish (off the wire, MEAN) ->
decode (split, reshape, unscale). The two ways a strategy reduces differ only in the
launch:
- `AllDevicesLaunch`: the merge_call path, where this process holds the buffers of all
  its local devices and runs the pack's algorithm over them (ring, reduce_to_one,
  hierarchical);
- `ReplicaLaunch`: where the strategy cannot merge_call (a cond or loop in the replica
  function, XLA), each replica launches its own buffer into TF's collective (the ring).
"""

from typing import List, Optional, Sequence

import tensorflow as tf

from tf_fusion import algorithms
from tf_fusion import compression
from tf_fusion import sparse
from tf_fusion import stats
from tf_fusion.collectives import Collectives
from tf_fusion.collectives import DeviceOrder
from tf_fusion.collectives import on_device

# The algorithms whose packs run a collective (reduce_to_one and "none" only copy).
_COLLECTIVE_ALGORITHMS = ("ring", "hierarchical", sparse.GATHER)


class AllDevicesLaunch:
  """Runs each pack's algorithm over the buffers of every local device (merge_call)."""

  def __init__(self, collectives: Collectives):
    self.collectives = collectives
    self.devices: Sequence[Optional[str]] = collectives.devices
    self._order = DeviceOrder() if collectives.uses_nccl else None

  def bounds(self, entry, bounds):
    """The sum over the group of each device's `bounds`, one per device."""
    return algorithms.run(entry.algorithm, bounds, self.collectives, None,
                          order=self._order)

  def pack(self, entry, buffers, finish, carries_timeout):
    """Pack `entry` reduced: per device, the list of its reduced shards."""
    return algorithms.run(entry.algorithm, buffers, self.collectives, finish=finish,
                          carries_timeout=carries_timeout, order=self._order,
                          sharded=True)

  def gather(self, buffers, carries_timeout=False):
    """Every device's `buffers` concatenated over the group, on every device (kept in
    each GPU's NCCL order)."""
    if self._order is None:
      return self.collectives.all_gather(buffers, carries_timeout)
    held = [self._order.before(d, b) for d, b in zip(self.devices, buffers)]
    return [self._order.after(d, g) for d, g in
            zip(self.devices, self.collectives.all_gather(held, carries_timeout))]


class ReplicaLaunch:
  """One replica's share: its own buffer into TF's collective (no merge_call)."""

  def __init__(self, collectives: Collectives, replica_id: int):
    self.collectives = collectives
    self.devices: Sequence[Optional[str]] = (None,)   # the replica thread's own device
    self._replica_id = replica_id

  def bounds(self, entry, bounds):
    del entry
    return [self.collectives.launch(self._replica_id, bounds[0])]

  def pack(self, entry, buffers, finish, carries_timeout):
    buffer = buffers[0]
    if entry.algorithm != "none":
      buffer = self.collectives.launch(self._replica_id, buffer,
                                       carries_timeout=carries_timeout)
    return [[finish(buffer)]]

  def gather(self, buffers, carries_timeout=False):
    return [self.collectives.launch_gather(self._replica_id, buffers[0], carries_timeout)]


def reduce_packs(plan, per_device: List[List[tf.Tensor]], codec: compression.PackCodec,
                 launch) -> List[List[tf.Tensor]]:
  """Reduces the tensors of `per_device` (one list per device of `launch`, the
  planned tensors in their order) pack by pack; returns the reduced lists.

  The timeout rides on the last pack that runs a collective (see
  Collectives.all_reduce): launched last, it cannot finish while a peer is gone.
  """
  outputs = [[None] * len(per_device[0]) for _ in per_device]
  last_collective = max((e.index for e in plan if e.algorithm in _COLLECTIVE_ALGORITHMS),
                default=None)
  for entry in plan:
    with tf.name_scope(stats.pack_scope(entry)):
      parts = [[tensors[i] for i in entry.tensor_indices] for tensors in per_device]
      if entry.algorithm in sparse.GATHERS:
        gathered = sparse.gather(parts, launch, codec.divisor,
                                 carries_timeout=entry.index == last_collective,
                                 to_one=entry.algorithm == sparse.GATHER_TO_ONE)
        for d, part in enumerate(gathered):
          for i, slices in zip(entry.tensor_indices, part):
            outputs[d][i] = slices
        continue
      scales = _agreed_scales(entry, parts, codec, launch)
      buffers, ctx = [], None
      for device, p, sc in zip(launch.devices, parts, scales):
        with on_device(device):
          buffer, ctx = codec.encode(p, sc)
          buffers.append(buffer)
      finish = codec.finisher(ctx, parts[0], scaled=scales[0] is not None)
      reduced = launch.pack(entry, buffers, finish, entry.index == last_collective)
      for d, device in enumerate(launch.devices):
        with on_device(device):
          for i, part in zip(entry.tensor_indices,
                             codec.decode(reduced[d], parts[d], scales[d])):
            outputs[d][i] = part
  return outputs


def _agreed_scales(entry, parts, codec, launch):
  """Per device, the range scales of pack `entry` that every replica agrees on (from
  the group's sum of each replica's max |x|), or None each where it is not scaled."""
  if not codec.range_scaled(entry):
    return [None] * len(parts)
  bounds = []
  for device, p in zip(launch.devices, parts):
    with on_device(device):
      bounds.append(compression.local_bounds(p))
  with tf.name_scope("range"):
    bounds = launch.bounds(entry, bounds)
  scales = []
  for device, b in zip(launch.devices, bounds):
    with on_device(device):
      scales.append(compression.range_scales(b))
  return scales


def reduce_unpacked(launcher, value, reduce_op, group_size):
  """One replica's all-reduce of a value that is not packed (integer, or sparse where
  the reduction must be exact), by TF's own launcher."""
  mean = reduce_op == tf.distribute.ReduceOp.MEAN
  if isinstance(value, tf.IndexedSlices):
    reduced = launcher.all_reduce_indexed_slices(value)
    if mean:
      reduced = tf.IndexedSlices(compression.divide(reduced.values, group_size),
                                 reduced.indices, reduced.dense_shape)
    return reduced
  reduced = launcher.all_reduce(value)
  return compression.divide(reduced, group_size) if mean else reduced
