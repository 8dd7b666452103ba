"""How the shards of a sharded weight update cross devices: reduce-scatter, all-gather.

Three ways, by where the replicas are and who launches:
- "in_graph": one worker whose process holds every replica's buffer (merge_call) and no
  NCCL: replica k sums block k of every replica's buffer itself, a chain of adds on its
  own device in replica order (((b0 + b1) + b2) + b3), the same order reduce_to_one
  uses, and reads the other replicas' new blocks back without a collective. On one
  host's memory nothing is copied; the adds of one pack run on N devices at once.
- "nccl": every device a GPU: NCCL's reduce-scatter and all-gather (TensorFlow's
  CollectiveReduceScatterV2 / CollectiveGatherV2 with the hint "nccl").
- "hierarchical": several workers whose processes each hold their replicas' buffers
  (merge_call), no NCCL: local replica k adds, in-graph, the worker's part of every
  block it shares with replica k of the other workers (blocks k, K + k, 2K + k, ...),
  sends each of those blocks to its owner and adds what it receives (an all-to-all
  in one group per k, K groups at once, as the hierarchical all-reduce's cross-worker
  step); the new blocks come back by an all-gather in the same groups, and the columns
  are read in-graph by the worker's other replicas.
- "all_to_all": a replica launching alone where merge_call is impossible (off NCCL):
  block i of its buffer to replica i, an all-to-all over the whole group, and the
  received blocks added in group order; then TensorFlow's all-gather.
TensorFlow has no reduce-scatter off NCCL; an all-to-all and the adds are one, with a
reduce-scatter's bytes.

Every way hands each replica the same bits: a block is reduced once, by one device or
by TensorFlow's ring (whose all-gather phase copies each reduced element), and gathered
as it is.
"""

from typing import List, Sequence

import tensorflow as tf

from tf_fusion.collectives import Collectives
from tf_fusion.collectives import DeviceOrder


class Exchange:
  """The collectives of one sharded step for local replicas `ks` (all of this worker's
  under merge_call, one where each replica launches alone).

  Args:
    collectives: the launchers of the whole group (every worker's devices).
    ks: the local replica indices this launch runs for.
    shards: the global shard index of each of `ks`.
    replica_launch: each replica launches its own collectives (no merge_call).
  """

  def __init__(self, collectives: Collectives, ks: Sequence[int], shards: Sequence[int],
               replica_launch: bool):
    self.collectives = collectives
    self.ks = list(ks)
    self.shards = list(shards)
    self.devices = [collectives.devices[k] for k in ks]
    self.replica_launch = replica_launch
    if collectives.uses_nccl:
      self.name = "nccl"
    elif replica_launch:
      self.name = "all_to_all"
    else:
      self.name = "in_graph" if collectives.num_workers == 1 else "hierarchical"
    self._order = DeviceOrder() if collectives.uses_nccl and not replica_launch else None

  def _each(self, launch_all, launch_one, buffers):
    """`launch_all(buffers)` for every local device, or `launch_one(k, buffer)` for a
    replica alone; in each GPU's NCCL order."""
    if self.replica_launch:
      return [launch_one(self.ks[0], buffers[0])]
    if self._order is None:
      return launch_all(buffers)
    held = [self._order.before(d, b) for d, b in zip(self.devices, buffers)]
    return [self._order.after(d, r) for d, r in zip(self.devices, launch_all(held))]

  def reduce_scatter(self, buffers: List[tf.Tensor], shard_size: int) -> List[tf.Tensor]:
    """Per local replica, block `shard` (shard_size elements) of the sum over the
    group of `buffers` (one padded pack per local replica)."""
    c = self.collectives
    if self.name == "nccl":
      return self._each(c.reduce_scatter, c.launch_reduce_scatter, buffers)
    if self.name == "in_graph":
      return self._chain_blocks(buffers, shard_size)
    if self.name == "hierarchical":
      return self._columns_across_workers(buffers, shard_size)
    rows = [tf.reshape(b, [c.group_size, shard_size]) for b in buffers]
    received = self._each(c.all_to_all, c.launch_all_to_all, rows)
    out = []
    for device, r in zip(self.devices, received):
      with tf.device(device):
        out.append(_add_in_order(tf.unstack(r)))
    return out

  def _chain_blocks(self, buffers, shard_size):
    return [self._local_sum(buffers, s, shard_size, device)
            for device, s in zip(self.devices, self.shards)]

  def _columns_across_workers(self, buffers, shard_size):
    c = self.collectives
    local = len(self.devices)
    out = []
    for k, device in enumerate(self.devices):
      column = [self._local_sum(buffers, w * local + k, shard_size, device)
                for w in range(c.num_workers)]
      with tf.device(device):
        received = c.shard_group(k).all_to_all([tf.stack(column)])[0]
        out.append(_add_in_order(tf.unstack(received)))
    return out

  def _local_sum(self, buffers, block, shard_size, device):
    """Block `block` of this worker's `buffers` added in replica order on `device`
    (each slice taken where its buffer is: aligned, so no copy)."""
    blocks = []
    for source, b in zip(self.devices, buffers):
      with tf.device(source):
        blocks.append(tf.slice(b, [block * shard_size], [shard_size]))
    with tf.device(device):
      return _add_in_order(blocks)

  def all_gather(self, shards: List[tf.Tensor], carries_timeout=False) -> List[List[tf.Tensor]]:
    """Per local replica, the consecutive blocks of the whole padded pack (every
    replica's shard, in shard order): a list of blocks, or of one gathered buffer."""
    c = self.collectives
    if self.name == "in_graph":
      return [list(shards) for _ in self.devices]
    if self.name == "hierarchical":
      columns = [c.shard_group(k).all_gather([s], carries_timeout)[0]
                 for k, s in enumerate(shards)]
      per = shards[0].shape[0]
      blocks = []
      for w in range(c.num_workers):
        for k, (device, column) in enumerate(zip(self.devices, columns)):
          with tf.device(device):
            blocks.append(tf.slice(column, [w * per], [per]))
      return [list(blocks) for _ in self.devices]
    gather_all = lambda b: c.all_gather(b, carries_timeout)
    gather_one = lambda k, b: c.launch_gather(k, b, carries_timeout)
    return [[g] for g in self._each(gather_all, gather_one, shards)]

  def all_sum(self, vectors: List[tf.Tensor]) -> List[tf.Tensor]:
    """Small float32 vectors (one per local replica) summed over the group; the same
    bits on every replica."""
    if self.name == "in_graph":
      with tf.device(self.devices[0]):
        total = _add_in_order(vectors)
      out = []
      for device in self.devices:
        with tf.device(device):
          out.append(tf.identity(total))
      return out
    c = self.collectives
    return self._each(c.all_reduce, c.launch, vectors)


def _add_in_order(tensors):
  """tensors[0] + tensors[1] + ..., a chain of binary adds: a fixed summation order
  (tf.add_n's is not, on CPUs; reduce_to_one's doc says why)."""
  total = tensors[0]
  for t in tensors[1:]:
    total = tf.math.add(total, t)
  return total
