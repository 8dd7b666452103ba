"""TensorFlow's collectives for one group of devices: launchers, keys, order, errors.

Every collective tf_fusion runs is launched here: `Collectives.get(devices, group_size)`
gives the launchers of one group (shared by every FusedAllReduce in the process, so
group and instance keys never collide); `DeviceOrder` keeps each GPU's NCCL launches in
one order; `sum_across_workers` is the small eager all-reduce that planning,
calibration and the workers' agreement checks use; `explain_errors` turns a
collective's timeout or abort into what it most likely means.
"""

import contextlib
import threading
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_fusion._internal import tf as tf_internal

# TF's strategies count their collective group keys up from 1 (+ a per-strategy base in
# tests); ours start far above so that no strategy of TF's can collide with them, and
# one process-wide table means two of our strategies never reuse an instance key.
_GROUP_KEY_BASE = 1 << 28
_KEYS = tf_internal.collective_keys(_GROUP_KEY_BASE)
_COLLECTIVES_CACHE = {}
_COUNTERS = {}
_COUNTERS_LOCK = threading.RLock()
_IMPLEMENTATION = tf.distribute.experimental.CommunicationImplementation
_HINTS = {"nccl": _IMPLEMENTATION.NCCL, "ring": _IMPLEMENTATION.RING,
          "auto": _IMPLEMENTATION.AUTO}


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
      _COUNTERS[key] = tf_internal.host_int64_counter(host.to_string(),
                                                      "tf_fusion_instance_key")
    return _COUNTERS[key]


def collectives_run(device) -> int:
  """How many of tf_fusion's collectives this process has run on `device` so far, in
  all groups (read from the instance-key counters: what ran, not what was traced)."""
  device = canonical_devices([device])[0]
  with _COUNTERS_LOCK:
    counters = [c for (_, d), c in _COUNTERS.items() if d == device]
  return int(sum(c.numpy() for c in counters))


def _launcher(group_key, group_size, device, options):
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
  counter = _instance_key_counter(group_key, device)

  def next_instance_key():
    # Its own name scope: these ops run as soon as the step starts, long before the
    # pack's data exists; tools/profile_step leaves them out of a pack's time in flight.
    with tf.device(counter.device), tf.name_scope("instance_key"):
      count = counter.assign_add(1)
      return tf.cast(tf.math.floormod(count, (1 << 31) - 1), tf.int32)

  return tf_internal.CollectiveLauncher(group_key, group_size, _KEYS, device, options,
                                        next_instance_key)


def on_device(device):
  """`tf.device(device)`, or no placement for None (a replica's own launch)."""
  return tf.device(device) if device is not None else contextlib.nullcontext()


def canonical_devices(devices: Sequence[str]) -> Tuple[str, ...]:
  """Fully qualified device names, as the collective group table wants them."""
  return tuple(tf_internal.canonical_device(d) for d in devices)


def use_run_time_keys(tf_ops):
  """Gives TF's CollectiveAllReduce `tf_ops` launchers that draw instance keys at run time
  (see _launcher), for the reductions a strategy sends there instead of to tf_fusion
  (metrics to the host, sparse values): else those crash in a cond as TF's do."""
  tf_internal.replace_launchers(tf_ops, _launcher)
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
    # process cannot start one more. Only calls with carries_timeout carry it (below).
    self.implementation = _hint(self.devices, implementation)
    self._implementation = implementation
    self._options = tf.distribute.experimental.CommunicationOptions(
        implementation=self.implementation)
    self._with_timeout = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=timeout_seconds)
    self._launchers = [_launcher(group_key, group_size, d, self._options)
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

  def all_reduce(self, buffers: Sequence[tf.Tensor], carries_timeout: bool = False
                 ) -> List[tf.Tensor]:
    """Sums `buffers` (one per local device) across the whole group.

    `carries_timeout`: this call carries the group's timeout. One such collective per step,
    launched last, is enough: it cannot finish while a peer is dead or stuck, and its
    timeout aborts every pending collective of the step (TF's StartAbort).
    """
    options = self._with_timeout if carries_timeout and self._timeout_seconds else None
    return [l.all_reduce(b, options=options) for l, b in zip(self._launchers, buffers)]

  def all_gather(self, buffers: Sequence[tf.Tensor], carries_timeout: bool = False
                 ) -> List[tf.Tensor]:
    """Concatenates `buffers` (one per local device, the same shape everywhere) of the
    whole group along their first axis, in group order, on every device."""
    options = self._with_timeout if carries_timeout and self._timeout_seconds else None
    return [l.all_gather_rows(b, options=options)
            for l, b in zip(self._launchers, buffers)]

  def reduce_scatter(self, buffers: Sequence[tf.Tensor], carries_timeout: bool = False
                     ) -> List[tf.Tensor]:
    """Sums `buffers` (one per local device, rank 1, a multiple of the group size
    long) across the group; group member i gets block i of the sum. NCCL only."""
    options = self._with_timeout if carries_timeout and self._timeout_seconds else None
    return [l.reduce_scatter(b, options=options) for l, b in zip(self._launchers, buffers)]

  def launch_reduce_scatter(self, index, buffer, carries_timeout=False):
    """Local device `index`'s part of a reduce-scatter (the no-merge-call path)."""
    options = self._with_timeout if carries_timeout and self._timeout_seconds else None
    return self._launchers[index].reduce_scatter(buffer, options=options)

  def all_to_all(self, buffers: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """Row i of each local device's buffer (first dimension: the group size) to group
    member i; each device gets the rows sent to it, in group order."""
    return [l.all_to_all(b) for l, b in zip(self._launchers, buffers)]

  def launch_all_to_all(self, index, buffer):
    """Local device `index`'s part of an all-to-all (the no-merge-call path)."""
    return self._launchers[index].all_to_all(buffer)

  def launch_gather(self, index, buffer, carries_timeout=False):
    """Local device `index`'s part of an all-gather (the no-merge-call path)."""
    options = self._with_timeout if carries_timeout and self._timeout_seconds else None
    return self._launchers[index].all_gather_rows(buffer, options=options)

  def launcher(self, index):
    """The launcher of local device `index` (for per-replica, no-merge-call reductions)."""
    return self._launchers[index]

  def launch(self, index, buffer, carries_timeout=False):
    """Local device `index`'s part of an all-reduce (the no-merge-call path)."""
    options = self._with_timeout if carries_timeout and self._timeout_seconds else None
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

  def sum_across_workers(self, vector) -> np.ndarray:
    """Eagerly sums a small float64 vector over the workers (also while tracing).

    Every worker must call it at the same point of the program; each gets the same sum.
    """
    across = self.across_workers()
    with tf.init_scope(), tf.device(across.devices[0]):
      fn = tf.function(lambda v: across.all_reduce([v], carries_timeout=True)[0])
      return run_as_graph(fn, tf.constant(vector, tf.float64)).numpy()


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


_EAGER_SWITCH = threading.Lock()


def run_as_graph(fn, *args):
  """Calls the tf.function `fn` as a graph, also under
  `tf.config.run_functions_eagerly(True)`.

  A collective waits until every device of its group has launched it. Run eagerly, a
  function launches the first device's and waits for ever for the others, which the
  same Python thread would launch next: a hang with no error. Users switch eager
  functions on to debug their own code; tf_fusion's collectives still run as the one
  graph they need (the switch is off for the call, on again after it).
  """
  if not tf.config.functions_run_eagerly():
    return fn(*args)
  with _EAGER_SWITCH:
    tf.config.run_functions_eagerly(False)
    try:
      return fn(*args)
    finally:
      tf.config.run_functions_eagerly(True)


@contextlib.contextmanager
def explain_errors(num_workers: int, timeout_seconds=None):
  """Re-raises a collective's timeout or abort with what it most likely means.

  TF reports either the dead task (when its heartbeats stop first) or only "Collective
  has timed out" (when timeout_seconds runs out first); the second names nothing.
  """
  try:
    yield
  except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
          tf.errors.AbortedError) as e:
    raise type(e)(e.node_def, e.op, (
        f"tf_fusion: an all-reduce across {num_workers} worker(s) did not complete "
        f"(timeout_seconds={timeout_seconds}): a peer worker died, hangs, or runs a "
        f"different program. TensorFlow said: {e.message}")) from None
