"""All-reduce algorithms on TensorFlow's collectives, and the hybrid pick.

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

The cost of one pack comes from a calibrated cost model (cost_model.py): measured on
the devices in use, never guessed. The hybrid ("auto") choice picks, per pack, the
algorithm with the lowest predicted time, and splits a pack back into single tensors
when the copies cost more than the launches they save (on a shared-memory CPU host they
do; on GPUs with per-launch latency of tens of microseconds they do not).
"""

import threading
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
# Private TF modules: the launcher gives us ordered collective launches and unique
# per-call instance keys, the two things a hand-rolled launcher gets wrong. Pinned TF.
from tensorflow.python.distribute import collective_util
from tensorflow.python.distribute import cross_device_utils
from tensorflow.python.ops import nccl_ops
from tensorflow.python.ops import resource_variable_ops

from tf_fusion import packing

if TYPE_CHECKING:   # cost_model imports this module
  from tf_fusion import cost_model

LOCAL_ALGORITHMS = ("ring", "reduce_to_one")
MULTI_WORKER_ALGORITHMS = ("ring", "hierarchical")

# TF's strategies count their collective group keys up from 1 (+ a per-strategy base in
# tests); ours start far above so that no strategy of TF's can collide with them, and
# one process-wide table means two of our strategies never reuse an instance key.
_GROUP_KEY_BASE = 1 << 28
_KEYS = cross_device_utils.CollectiveKeys(group_key_start=_GROUP_KEY_BASE)
_COLLECTIVES_CACHE = {}
_COUNTERS = {}
_COUNTERS_LOCK = threading.RLock()
_HINTS = {"nccl": collective_util.CommunicationImplementation.NCCL,
          "ring": collective_util.CommunicationImplementation.RING,
          "auto": collective_util.CommunicationImplementation.AUTO}


def _hint(devices, implementation):
  """The CommunicationImplementation for `implementation` on `devices`."""
  if implementation not in _HINTS:
    raise ValueError(f"unknown collective implementation {implementation!r}; valid: "
                     f"{', '.join(_HINTS)}.")
  gpus = all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)
  if implementation == "auto" and gpus:
    return _HINTS["nccl"]
  if implementation == "nccl" and not gpus:
    return _HINTS["auto"]   # as TF: no NCCL off GPUs, the ring runs
  return _HINTS[implementation]


def _instance_key_counter(group_key, device):
  """The counter that numbers the collectives of (group, device): one per pair in the
  process, so every launcher of the pair draws from the same sequence."""
  with _COUNTERS_LOCK:
    key = (group_key, device)
    if key not in _COUNTERS:
      host = tf.DeviceSpec.from_string(device).replace(device_type="CPU", device_index=0)
      # ResourceVariable, not tf.Variable: a strategy's scope would make it mirrored.
      with tf.init_scope(), tf.device(host.to_string()):
        _COUNTERS[key] = resource_variable_ops.ResourceVariable(
            0, dtype=tf.int64, trainable=False, name="tf_fusion_instance_key")
    return _COUNTERS[key]


def collectives_run(device) -> int:
  """How many of tf_fusion's collectives this process has run on `device` so far, in
  all groups (read from the instance-key counters: what ran, not what was traced)."""
  device = canonical_devices([device])[0]
  with _COUNTERS_LOCK:
    counters = [c for (_, d), c in _COUNTERS.items() if d == device]
  return int(sum(c.numpy() for c in counters))


class _Launcher(cross_device_utils.CollectiveReplicaLauncher):
  """TF's launcher of one device's collectives, with instance keys drawn at run time.

  TF's launcher gives each call a fresh instance key by capturing a Python counter at
  call time (`FuncGraph.capture_call_time_value`). When the function holding the
  collective is itself called inside a `tf.cond` of another function (Keras's
  `steps_per_execution` loop calls its one-step tf.function in a cond in a while), TF
  re-captures that value in the cond's branch graph, which nothing feeds: "You must
  feed a value for placeholder tensor ...". TF's own CollectiveAllReduce fails the same
  way. Here the key is read from a counter variable on the host, incremented by the
  collective itself: fresh on every run, as TF's, with nothing captured, so it works in
  any control flow. Automatic control dependencies order a device's increments as its
  collectives are ordered; every device and worker runs the same sequence, so the k-th
  collective gets the same key everywhere.
  """

  def __init__(self, group_key, group_size, device, options):
    super().__init__(group_key, group_size, _KEYS, device, options)
    self._counter = _instance_key_counter(group_key, device)

  def _next_instance_key(self):
    # Its own name scope: these ops run as soon as the step starts, long before the
    # pack's data exists; tools/profile_step leaves them out of a pack's time in flight.
    with tf.device(self._counter.device), tf.name_scope("instance_key"):
      count = self._counter.assign_add(1)
      return tf.cast(tf.math.floormod(count, (1 << 31) - 1), tf.int32)


def canonical_devices(devices: Sequence[str]) -> Tuple[str, ...]:
  """Fully qualified device names, as the collective group table wants them."""
  from tensorflow.python.distribute import device_util  # pylint: disable=g-import-not-at-top
  return tuple(device_util.canonicalize(d) for d in devices)


def use_run_time_keys(tf_ops):
  """Gives TF's CollectiveAllReduce `tf_ops` launchers that draw instance keys at run time
  (see _Launcher), for the reductions a strategy sends there instead of to tf_fusion
  (metrics to the host, sparse values): else those crash in a cond as TF's do."""
  tf_ops._launchers = [  # pylint: disable=protected-access
      _Launcher(l._group_key, l._group_size, l._device, l._options)  # pylint: disable=protected-access
      for l in tf_ops._launchers]  # pylint: disable=protected-access
  return tf_ops


class Collectives:
  """Launchers of TF collectives for one group of local devices.

  Get one with `Collectives.get(devices, group_size)`: launchers are shared by every
  FusedAllReduce in the process, so the group and instance keys never collide.
  `group_size` counts the devices of every worker; it is len(devices) on one worker.

  Group keys are handed out in order of first use, like TF's own: every worker runs the
  same program, so every worker gives the same group the same key.

  `implementation` is the collective TF runs: "nccl", "ring", or "auto": NCCL when
  every device is a GPU (as TF's MirroredStrategy does there), else TF's ring. TF's
  runtime picks NCCL only for the hint "nccl" (CollectiveParamResolverLocal); with
  "auto" it would run its ring on GPUs too.
  """

  def __init__(self, devices, group_size, timeout_seconds=None, implementation="auto"):
    self.devices = tuple(devices)
    self.group_size = group_size
    if group_size % len(self.devices):
      raise ValueError(f"group_size={group_size} is not a multiple of the "
                       f"{len(self.devices)} local devices: workers must have equal "
                       "device counts.")
    self.num_workers = group_size // len(self.devices)
    self._timeout_seconds = timeout_seconds
    # The size is part of the key: the same devices in a local and a global group are
    # two groups.
    group_key = _KEYS.get_group_key(self.devices + (f"group_size:{group_size}",))
    # No timeout by default: TF 2.21 gives every collective run with a timeout a thread
    # that sleeps for the whole timeout (tensorflow#62466), so timing every pack of
    # every step piles up (packs x devices x timeout / step time) threads until the
    # process cannot start one more. Only "watched" calls carry the timeout (below).
    self.implementation = _hint(self.devices, implementation)
    self._implementation = implementation
    self._options = collective_util.Options(implementation=self.implementation)
    self._watched = collective_util.Options(timeout_seconds=timeout_seconds)
    self._launchers = [_Launcher(group_key, group_size, d, self._options)
                       for d in self.devices]

  @classmethod
  def get(cls, devices, group_size=None, timeout_seconds=None, implementation="auto"):
    devices = canonical_devices(devices)
    group_size = group_size or len(devices)
    key = (devices, group_size, timeout_seconds, implementation)
    with _COUNTERS_LOCK:
      if key not in _COLLECTIVES_CACHE:
        _COLLECTIVES_CACHE[key] = cls(devices, group_size, timeout_seconds, implementation)
      return _COLLECTIVES_CACHE[key]

  def all_reduce(self, buffers: Sequence[tf.Tensor], watched: bool = False
                 ) -> List[tf.Tensor]:
    """Sums `buffers` (one per local device) across the whole group.

    `watched`: this call carries the group's timeout. One watched collective per step,
    launched last, is enough: it cannot finish while a peer is dead or stuck, and its
    timeout aborts every pending collective of the step (TF's StartAbort).
    """
    options = self._watched if watched and self._timeout_seconds else None
    return [l.all_reduce(b, options=options) for l, b in zip(self._launchers, buffers)]

  def launcher(self, index):
    """The launcher of local device `index` (for per-replica, no-merge-call reductions)."""
    return self._launchers[index]

  def launch(self, index, buffer, watched=False):
    """Local device `index`'s part of an all-reduce (the no-merge-call path)."""
    options = self._watched if watched and self._timeout_seconds else None
    return self._launchers[index].all_reduce(buffer, options=options)

  @property
  def uses_nccl(self) -> bool:
    """Whether this group's collectives run NCCL (GPUs, hint "nccl")."""
    return self.implementation == _HINTS["nccl"]

  def across_workers(self) -> "Collectives":
    """The group of one device per worker (this worker's last local device)."""
    return self.shard_group(len(self.devices) - 1)

  def shard_group(self, index) -> "Collectives":
    """The group of local device `index` of every worker (hierarchical's shard `index`)."""
    return Collectives.get(self.devices[index:index + 1], self.num_workers,
                           self._timeout_seconds, self._implementation)

  def differences_across_workers(self, parts, rank) -> List[str]:
    """What differs between the workers' `parts` ({name: float64-exact hash}), as
    "name (worker(s) 1, 3 differ from worker 0)", one entry per differing part.

    Each worker writes its hashes in its own row (`rank`) of a table that one sum across
    workers hands to everyone, so every worker learns every other's: all of them can
    name the same difference. Every worker must call it at the same point.
    """
    n, k = self.num_workers, len(parts)
    table = np.zeros((n, k), np.float64)
    table[rank] = list(parts.values())
    table = self.sum_across_workers(table.ravel()).reshape(n, k)
    differences = []
    for j, name in enumerate(parts):
      others = [w for w in range(n) if table[w, j] != table[0, j]]
      if others:
        differences.append(f"{name} (worker(s) {', '.join(map(str, others))} differ "
                           "from worker 0)")
    return differences

  def sum_across_workers(self, vector) -> np.ndarray:
    """Eagerly sums a small float64 vector over the workers (also while tracing).

    Every worker must call it at the same point of the program; each gets the same sum.
    """
    across = self.across_workers()
    with tf.init_scope(), tf.device(across.devices[0]):
      return tf.function(lambda v: across.all_reduce([v], watched=True)[0])(
          tf.constant(vector, tf.float64)).numpy()


class DeviceOrder:
  """Chains one reduction's NCCL launches per device, in the plan's order.

  NCCL runs a GPU's kernels in the order they were enqueued. Two communicators on one
  GPU (hierarchical's node sum and its cross-worker shard group; the ring's group),
  enqueued in one order on one GPU and the other order on another, wait for each other
  forever. TF's launchers order only their own collectives (an ordering token), and
  nccl_ops nothing. Here each NCCL launch on a device waits (a control dependency) for
  the previous one's result there, so every GPU of every worker launches in plan order.
  Not used off GPUs: TF's CPU ring has no such hazard, and the chain would cost overlap.
  """

  def __init__(self):
    self._last = {}

  def before(self, device, tensor):
    """`tensor`, held back until `device`'s previous NCCL launch is done."""
    last = self._last.get(device)
    if last is None:
      return tensor
    with tf.device(device), tf.control_dependencies([last]):
      return tf.identity(tensor)

  def after(self, device, tensor):
    """Records `tensor` as `device`'s latest NCCL result; returns it."""
    self._last[device] = tensor
    return tensor


def _ordered(devices, buffers, order, launch):
  """launch(buffers) (one result per device), in `order` (a DeviceOrder, or None)."""
  if order is None:
    return launch(buffers)
  buffers = [order.before(d, b) for d, b in zip(devices, buffers)]
  return [order.after(d, r) for d, r in zip(devices, launch(buffers))]


def _launch(group, buffers, watched, order):
  """group.all_reduce(buffers), in `order`."""
  return _ordered(group.devices, buffers, order, lambda b: group.all_reduce(b, watched))


def ring(buffers, collectives, finish=None, root=0, watched=False, order=None):
  """All-reduce with TF's collective ops; `finish` runs on every device's result."""
  del root
  reduced = _launch(collectives, buffers, watched, order)
  if finish is None:
    return reduced
  out = []
  for device, r in zip(collectives.devices, reduced):
    with tf.device(device):
      out.append(finish(r))
  return out


def copy_only(buffers, collectives, finish=None, root=0, watched=False, order=None):
  """For empty packs: nothing to add, so no collective (TF's CPU collective crashes
  on zero elements); each device keeps its own, equally empty, buffer."""
  del root, watched, order
  out = []
  for device, b in zip(collectives.devices, buffers):
    with tf.device(device):
      out.append(finish(b) if finish is not None else tf.identity(b))
  return out


def reduce_to_one(buffers, collectives, finish=None, root=0, watched=False, order=None):
  """Sums in device order onto one device, runs `finish` there once, copies back.

  The sum is a chain of binary adds, step k placed on device k: (((b0 + b1) + b2) + b3).
  Not tf.add_n: on CPU, AddN reuses whichever input buffer it may forward and moves
  that input to the front, so its summation order depends on buffer refcounts (not
  reproducible); and a chain on one device is collapsed into an AddN by Grappler's
  arithmetic optimizer. A binary add is commutative, so its own buffer reuse cannot
  change a bit, and adds on different devices are never collapsed. On shared memory
  the chain is also the fastest form measured (ResNet-50 gradients, 4 logical CPUs:
  39.8 ms against 43.9 ms for AddN).
  """
  del root, watched, order  # The order, hence the last device, is fixed; no collective.
  return _sum_then_copy(buffers, collectives.devices, finish)


def hierarchical(buffers, collectives, finish=None, root=0, watched=False, order=None):
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
  del root
  devices = collectives.devices
  if collectives.num_workers == 1:
    return _sum_then_copy(buffers, devices, finish)
  size = buffers[0].shape.num_elements()
  if len(devices) == 1 or size is None:
    across = lambda total: _launch(collectives.across_workers(), [total], watched,
                                   order)[0]
    return _sum_then_copy(buffers, devices, finish, across)
  sums = _local_sums(buffers, collectives, order)
  sizes = packing.shard_sizes(size, len(devices), buffers[0].dtype)
  shards, start = [], 0
  for i, n in enumerate(sizes):
    with tf.device(devices[i]):
      shard = tf.slice(sums[i], [start], [n])
      shard = _launch(collectives.shard_group(i), [shard],
                      watched and i == len(sizes) - 1, order)[0]
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
  return _ordered(devices, buffers, order, nccl_ops.all_sum)


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
                    "hierarchical": hierarchical, "none": copy_only}


def run(algorithm, buffers, collectives, finish=None, root=0, watched=False,
        order=None, sharded=False):
  """Reduces one pack with `algorithm` (a key of _IMPLEMENTATIONS); `watched`: its
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
  out = fn(buffers, collectives, finish=finish, root=root, watched=watched, order=order)
  if sharded:
    return [list(o) if isinstance(o, list) else [o] for o in out]
  whole = []
  for device, o in zip(collectives.devices, out):
    if isinstance(o, list):
      with tf.device(device):
        o = tf.concat(o, axis=0)
    whole.append(o)
  return whole


def assign(packs: Sequence[packing.Pack],
           specs: Sequence[Tuple[tf.DType, tf.TensorShape]],
           wire_dtype,
           algorithm: str,
           model: Optional["cost_model.CostModel"] = None,
           unknown_size_algorithm: str = "reduce_to_one",
           ) -> List[Tuple[packing.Pack, str, Optional[float]]]:
  """Gives each pack an algorithm; under "auto", may split a pack into singletons.

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
    (pack, algorithm, predicted seconds or None) in launch order. An empty pack
    gets "none" (nothing to send); a pack of unknown size gets
    `unknown_size_algorithm`.
  """
  if algorithm == "auto" and model is None:
    raise ValueError("algorithm='auto' needs a calibrated CostModel.")
  out = []
  for p in packs:
    if p.nbytes == 0:
      out.append((p, "none", 0.0))
      continue
    if p.nbytes is None:
      out.append((p, unknown_size_algorithm, None))
      continue
    if algorithm != "auto":
      out.append((p, algorithm, _predict(model, algorithm, p, specs, wire_dtype)))
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
    split = [(s, a, _predict(model, a, s, specs, wire_dtype) if s.nbytes else 0.0)
             for s, a in singles]
    if len(split) > 1 and sum(t for _, _, t in split) < fused:
      out.extend(split)
    else:
      out.append((p, fused_alg, fused))
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
