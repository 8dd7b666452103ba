"""All-reduce algorithms for one pack, on TensorFlow's collectives.

One pack, already flattened into one buffer per local device, is reduced by one of:
- ring: TensorFlow's collective all-reduce across the group (CollectiveReduceV2; ring on
  CPUs, NCCL on GPUs), one launch per device;
- reduce_to_one: sum onto one device of the worker in device order, then a copy back to
  each device (bit-identical to a left-to-right sum, run after run);
- hierarchical: the multi-worker scheme of Jia et al. 2018 (reduce in a worker, all-reduce
  across workers, back to every device of the worker); on one worker it *is*
  reduce_to_one. The cross-worker step is split over the local devices: device i
  all-reduces shard i with device i of every other worker, k groups in parallel, so no
  one device carries the whole buffer across. On GPUs the step inside the worker is
  NCCL (as Jia et al.'s), and a DeviceOrder keeps every GPU's NCCL launches in one
  order.

Each algorithm launches its collectives through collectives.Collectives; which one a
pack gets is decided in plans.assign (the hybrid choice), not here.
"""

import tensorflow as tf

from tf_fusion import packing
from tf_fusion._internal import tf as tf_internal

LOCAL_ALGORITHMS = ("ring", "reduce_to_one")
MULTI_WORKER_ALGORITHMS = ("ring", "hierarchical")


def _ordered(devices, buffers, order, launch):
  """launch(buffers) (one result per device), in `order` (a DeviceOrder, or None)."""
  if order is None:
    return launch(buffers)
  buffers = [order.before(d, b) for d, b in zip(devices, buffers)]
  return [order.after(d, r) for d, r in zip(devices, launch(buffers))]


def _launch(group, buffers, carries_timeout, order):
  """group.all_reduce(buffers), in `order`."""
  return _ordered(group.devices, buffers, order,
                  lambda b: group.all_reduce(b, carries_timeout))


def ring(buffers, collectives, finish=None, carries_timeout=False,
         order=None):
  """All-reduce with TF's collective ops; `finish` runs on every device's result."""
  reduced = _launch(collectives, buffers, carries_timeout, order)
  if finish is None:
    return reduced
  out = []
  for device, r in zip(collectives.devices, reduced):
    with tf.device(device):
      out.append(finish(r))
  return out


def nothing_to_reduce(buffers, collectives, finish=None, carries_timeout=False,
                      order=None):
  """For empty packs: nothing to add, so no collective (TF's CPU collective crashes
  on zero elements); each device keeps its own, equally empty, buffer."""
  del carries_timeout, order
  out = []
  for device, b in zip(collectives.devices, buffers):
    with tf.device(device):
      out.append(finish(b) if finish is not None else tf.identity(b))
  return out


def reduce_to_one(buffers, collectives, finish=None, carries_timeout=False,
                  order=None):
  """Sums in device order onto one device, runs `finish` there once, copies back.

  The sum is a chain of binary adds, step k placed on device k: (((b0 + b1) + b2) + b3).
  Not tf.add_n: on CPU, AddN reuses whichever input buffer it may forward and moves
  that input to the front, so its summation order depends on buffer refcounts (not
  reproducible); and a chain on one device is collapsed into an AddN by Grappler's
  arithmetic optimizer. A binary add is commutative, so its own buffer reuse cannot
  change a bit, and adds on different devices are never collapsed. On shared memory
  the chain was also faster than AddN when measured.
  """
  del carries_timeout, order  # The order, so the last device, is fixed; no collective.
  return _sum_then_copy(buffers, collectives.devices, finish)


def hierarchical(buffers, collectives, finish=None, carries_timeout=False,
                 order=None):
  """Jia et al. 2018, section 6: reduce inside the worker, all-reduce across workers,
  back to every device of the worker.

  On several workers with k local devices, for a buffer of static size:
  1. the worker's sum on every device: NCCL's all-reduce on GPUs; elsewhere
     reduce_to_one's chain of adds onto the last device, which every device reads
     (one host's memory: no copy);
  2. device i all-reduces shard i (1/k of the buffer, aligned) with device i of every
     other worker: k cross-worker groups in parallel, each carrying 1/k of the bytes,
     and `finish` runs on each shard once;
  3. every device gets the other devices' reduced shards (device-to-device copies).

  Returns, per device, the list of reduced shards (consecutive parts of the buffer,
  for packing.unpack), or one buffer when there is a single shard. With one local
  device, or a buffer of unknown size, the sum crosses workers from the last device
  whole, as Jia et al.'s; on one worker this is reduce_to_one.
  """
  devices = collectives.devices
  if collectives.num_workers == 1:
    return _sum_then_copy(buffers, devices, finish)
  size = buffers[0].shape.num_elements()
  if len(devices) == 1 or size is None:
    across = lambda total: _launch(collectives.across_workers(), [total], carries_timeout,
                                   order)[0]
    return _sum_then_copy(buffers, devices, finish, across)
  sums = _local_sums(buffers, collectives, order)
  sizes = packing.shard_sizes(size, len(devices), buffers[0].dtype)
  shards, start = [], 0
  for i, n in enumerate(sizes):
    with tf.device(devices[i]):
      shard = tf.slice(sums[i], [start], [n])
      shard = _launch(collectives.shard_group(i), [shard],
                      carries_timeout and i == len(sizes) - 1, order)[0]
      shards.append(finish(shard) if finish is not None else shard)
    start += n
  if len(shards) == 1:
    return _copy_to(devices, shards[0])
  out = []
  for j, device in enumerate(devices):
    with tf.device(device):
      out.append([s if i == j else tf.identity(s) for i, s in enumerate(shards)])
  return out


def _local_sums(buffers, collectives, order):
  """The sum of this worker's `buffers`, one tensor per local device."""
  devices = collectives.devices
  if not collectives.uses_nccl:
    total = _chain_sum(buffers, devices)
    return [total] * len(devices)
  return _ordered(devices, buffers, order, tf_internal.nccl_all_sum)


def _chain_sum(buffers, devices):
  """(((b0 + b1) + b2) + ...), step k on device k (reduce_to_one's doc says why)."""
  total = buffers[0]
  for device, b in zip(devices[1:], buffers[1:]):
    with tf.device(device):
      total = tf.math.add(total, b)
  return total


def _copy_to(devices, tensor):
  out = []
  for device in devices:
    with tf.device(device):
      out.append(tf.identity(tensor))
  return out


def _sum_then_copy(buffers, devices, finish, across=None):
  """Chain-adds in device order onto the last device, runs `across` (the cross-worker
  all-reduce) and `finish` there, copies the result to every device."""
  total = _chain_sum(buffers, devices)
  with tf.device(devices[-1]):
    if across is not None:
      total = across(total)
    if finish is not None:
      total = finish(total)
  return _copy_to(devices, total)


_IMPLEMENTATIONS = {"ring": ring, "reduce_to_one": reduce_to_one,
                    "hierarchical": hierarchical, "none": nothing_to_reduce}


def run(algorithm, buffers, collectives, finish=None, carries_timeout=False,
        order=None, sharded=False):
  """Reduces one pack with `algorithm` (a key of _IMPLEMENTATIONS); `carries_timeout`: its
  collective carries the timeout (Collectives.all_reduce); `order`: a DeviceOrder for
  NCCL launches (or None).

  Returns one reduced buffer per device or, with `sharded`, one list of consecutive
  shards of it per device (packing.unpack takes either; it saves a concat per device
  where hierarchical split the buffer).
  """
  try:
    fn = _IMPLEMENTATIONS[algorithm]
  except KeyError:
    raise ValueError(f"unknown algorithm {algorithm!r}; valid values: "
                     f"{', '.join(_IMPLEMENTATIONS)}.") from None
  if algorithm == "reduce_to_one" and collectives.num_workers > 1:
    raise ValueError("reduce_to_one stays on one worker; across workers use "
                     "hierarchical (its multi-worker form).")
  out = fn(buffers, collectives, finish=finish, carries_timeout=carries_timeout,
           order=order)
  if sharded:
    return [list(o) if isinstance(o, list) else [o] for o in out]
  whole = []
  for device, o in zip(collectives.devices, out):
    if isinstance(o, list):
      with tf.device(device):
        o = tf.concat(o, axis=0)
    whole.append(o)
  return whole
