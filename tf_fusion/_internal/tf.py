"""TensorFlow's internals that tf_fusion relies on, each behind one named function.

Tested with TensorFlow 2.21 (TESTED_TENSORFLOW). tests/test_internal_seam.py holds one
contract test per name below, so an upgrade that moves one fails there, by name.
"""

import threading

from absl import logging
import tensorflow as tf

TESTED_TENSORFLOW = ("2.21",)

try:
  # pylint: disable=g-direct-tensorflow-import
  from tensorflow.python.distribute import collective_all_reduce_strategy as _mwms
  from tensorflow.python.distribute import cross_device_ops as _cross_device_ops
  from tensorflow.python.distribute import cross_device_utils as _cross_device_utils
  from tensorflow.python.distribute import device_util as _device_util
  from tensorflow.python.distribute import distribute_lib as _distribute_lib
  from tensorflow.python.distribute import distribute_utils as _distribute_utils
  from tensorflow.python.distribute import mirrored_run as _mirrored_run
  from tensorflow.python.distribute import mirrored_strategy as _mirrored
  from tensorflow.python.distribute import values as _values
  from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as _slurm
  from tensorflow.python.eager import context as _context
  from tensorflow.python.framework import config as _config
  from tensorflow.python.ops import nccl_ops as _nccl_ops
  from tensorflow.python.ops import resource_variable_ops as _resource_variable_ops
except ImportError as e:   # pragma: no cover - only on an untested TensorFlow
  raise ImportError(
      f"tf_fusion needs TensorFlow internals that TensorFlow {tf.__version__} does not "
      f"have ({e}). tf_fusion is tested with TensorFlow "
      f"{', '.join(TESTED_TENSORFLOW)}: pip install 'tensorflow==2.21.*'.") from e

if not tf.__version__.startswith(TESTED_TENSORFLOW):
  logging.warning("tf_fusion is tested with TensorFlow %s, not %s: it relies on some of "
                  "TensorFlow's internals (tf_fusion/_internal/tf.py), which may have "
                  "changed.", ", ".join(TESTED_TENSORFLOW), tf.__version__)


# --- devices and distributed values ---------------------------------------------------

def canonical_device(device: str) -> str:
  """A fully qualified device name, as TF's collective group table wants it."""
  return _device_util.canonicalize(device)


def is_per_replica(value) -> bool:
  """Whether `value` is a PerReplica (one value per replica, not yet reduced)."""
  return isinstance(value, _values.PerReplica)


def per_replica(values) -> tf.distribute.DistributedValues:
  """A PerReplica of `values`, one per local replica in device order."""
  return _values.PerReplica(tuple(values))


def mirrored(values) -> tf.distribute.DistributedValues:
  """Equal per-device `values` as a Mirrored value (what a reduction returns)."""
  return _distribute_utils.regroup(tuple(values), wrap_class=_values.Mirrored)


def is_mirrored_variable(variable) -> bool:
  """Whether `variable` is a MirroredVariable (one copy per replica)."""
  return isinstance(variable, _values.MirroredVariable)


def devices_match(value, destinations) -> bool:
  """Whether `destinations` names the devices `value` lives on (an all-reduce)."""
  return _cross_device_ops._devices_match(value, destinations)  # pylint: disable=protected-access


# --- collectives ----------------------------------------------------------------------

def collective_keys(group_key_start: int):
  """TF's table of collective group and instance keys, its group keys from
  `group_key_start` up."""
  return _cross_device_utils.CollectiveKeys(group_key_start=group_key_start)


class CollectiveLauncher(_cross_device_utils.CollectiveReplicaLauncher):
  """TF's launcher of one device's collectives (ordering token, all_reduce,
  all_reduce_indexed_slices), with instance keys from `next_instance_key()`."""

  def __init__(self, group_key, group_size, keys, device, options, next_instance_key):
    super().__init__(group_key, group_size, keys, device, options)
    self._tf_fusion_next_key = next_instance_key

  def _next_instance_key(self):
    return self._tf_fusion_next_key()

  def reduce_scatter(self, tensor, options=None):
    """This device's part of a reduce-scatter (sum) of a rank-1 `tensor` whose length is
    a multiple of the group size: element block i of the sum lands on group member i.
    TensorFlow implements it with NCCL only (on CPUs: "did not find collective
    implementation")."""
    return self._raw_collective(tf.raw_ops.CollectiveReduceScatterV2, tensor, options,
                                merge_op="Add", final_op="Id")

  def all_to_all(self, tensor, options=None):
    """This device's part of an all-to-all: row i of `tensor` (its first dimension is
    the group size) goes to group member i; row i of the result came from member i.
    TensorFlow runs it on CPUs too (where it has no reduce-scatter)."""
    return self._raw_collective(tf.raw_ops.CollectiveAllToAllV2, tensor, options)

  def _raw_collective(self, op, tensor, options, **attrs):
    """`op` (a raw V2 collective) of `tensor` on this launcher's device, group and next
    instance key, ordered by its token, as TF's own launches are."""
    instance_key = self._next_instance_key()
    options = self._options.merge(options)
    token = self._get_ordering_token()
    with tf.device(self._device):
      return op(input=tensor, group_size=self._group_size, group_key=self._group_key,
                instance_key=instance_key,
                ordering_token=[token] if token is not None else [],
                communication_hint=options.implementation.value.lower(),
                timeout_seconds=options.timeout_seconds or 0.0, **attrs)

  def all_gather_rows(self, tensor, options=None):
    """All-gather of `tensor` along its first axis; every replica's `tensor` must have
    the same shape (TF's `all_gather` pads for that with a collective of its own)."""
    return self._all_gather(tensor, options)  # pylint: disable=protected-access


def replace_launchers(tf_ops, make) -> None:
  """Replaces the launchers of TF's CollectiveAllReduce `tf_ops` by
  `make(group_key, group_size, device, options)`, one per device."""
  tf_ops._launchers = [  # pylint: disable=protected-access
      make(l._group_key, l._group_size, l._device, l._options)  # pylint: disable=protected-access
      for l in tf_ops._launchers]  # pylint: disable=protected-access


def nccl_all_sum(tensors):
  """NCCL's in-process all-reduce (sum) of one tensor per GPU."""
  return _nccl_ops.all_sum(tensors)


def host_int64_counter(device: str, name: str):
  """A resource variable holding int64 0 on `device`, outside any function and
  strategy (a strategy's scope would make a tf.Variable mirrored)."""
  with tf.init_scope(), tf.device(device):
    return _resource_variable_ops.ResourceVariable(0, dtype=tf.int64, trainable=False,
                                                   name=name)


class _PlainVariables:
  """A variable creator that makes plain (not distributed) variables where it is
  entered, also inside a strategy's scope, whose own creator it skips."""

  _ARGS = ("initial_value", "trainable", "name", "dtype", "shape", "caching_device",
           "validate_shape", "constraint")

  def __call__(self, next_creator, **kwargs):
    del next_creator
    return _resource_variable_ops.ResourceVariable(
        **{k: v for k, v in kwargs.items() if k in self._ARGS and v is not None})


def plain_variables():
  """A context in which tf.Variable (and Keras variables) are plain ResourceVariables
  on the current device, not a strategy's mirrored ones: one replica's own state."""
  return tf.variable_creator_scope(_PlainVariables())


def is_collective_all_reduce(ops) -> bool:
  """Whether `ops` is TF's CollectiveAllReduce (MultiWorkerMirroredStrategy's ops)."""
  return isinstance(ops, _cross_device_ops.CollectiveAllReduce)


def collective_all_reduce(devices, group_size):
  """TF's CollectiveAllReduce over local `devices` in a group of `group_size`."""
  return _cross_device_ops.CollectiveAllReduce(
      devices=devices, group_size=group_size,
      options=tf.distribute.experimental.CommunicationOptions())


def local_devices_of(tf_ops):
  """The local devices of TF's CollectiveAllReduce `tf_ops`."""
  return tuple(tf_ops._devices)  # pylint: disable=protected-access


def gather(ops, per_replica_value, destinations, axis, options=None):
  """TF's `ops` gathering `per_replica_value` along `axis` (strategy.gather's path)."""
  return ops._gather(per_replica_value, destinations, axis, options)  # pylint: disable=protected-access


class CrossDeviceOpsHooks:
  """The private hooks TF's strategies call on a CrossDeviceOps, mapped to public
  methods of the subclass: `_all_reduce` (a replica-context all-reduce where the
  strategy does not merge_call) to `all_reduce_in_replica`, `_gather_implementation`
  to `gather_exact`, `_num_between_graph_workers` to `num_workers`."""

  @property
  def _num_between_graph_workers(self):
    # > 1 keeps CrossDeviceOps.reduce/batch_reduce from skipping the reduction when a
    # worker has a single device.
    return self.num_workers

  def _all_reduce(self, reduce_op, value, replica_id, options):
    return self.all_reduce_in_replica(reduce_op, value, replica_id, options)

  def _gather_implementation(self, per_replica_value, destinations, axis, options):
    return self.gather_exact(per_replica_value, destinations, axis, options)


def op_determinism() -> bool:
  """Whether `tf.config.experimental.enable_op_determinism()` is in force (TensorFlow
  has no public getter)."""
  return bool(_config.is_op_determinism_enabled())


def disable_op_determinism() -> None:
  """Turns op determinism off again (tests that enable it for one case)."""
  _config.disable_op_determinism()


def abort_collectives(message: str) -> None:
  """Aborts this process's pending collectives with DEADLINE_EXCEEDED and `message`."""
  _context.context().abort_collective_ops(tf.errors.DEADLINE_EXCEEDED, message)


def set_cluster_value(key: str, value: str) -> None:
  """Writes `key` in the cluster's coordination service (raises if it is set)."""
  _context.context().set_config_key_value(key, value)


def get_cluster_value(key: str, timeout_ms=None) -> str:
  """Reads `key` from the coordination service, waiting up to `timeout_ms` (None:
  for ever); raises tf.errors.OpError when it is not set by then."""
  ctx = _context.context()
  if timeout_ms is None:
    return ctx.get_config_key_value(key)
  return ctx.get_config_key_value(key, timeout_in_ms=timeout_ms)


# --- strategies -----------------------------------------------------------------------

def merge_call_impossible() -> bool:
  """True while a replica thread builds a graph other than its own: a branch of a
  `tf.cond` or a `tf.while_loop`, or a nested tf.function. TF's merge_call raises there
  ("merge_call called while defining a new graph"), so the step must go on without it.
  """
  thread = threading.current_thread()
  return (isinstance(thread, _mirrored_run._MirroredReplicaThread)  # pylint: disable=protected-access
          and not thread.in_eager
          and tf.compat.v1.get_default_graph() is not thread.graph)


_replica_steps = [0]   # replica steps running (strategy.run) in this process


def in_replica_step() -> bool:
  """Whether a replica function of tf_fusion's strategies is running: in one of its
  replica threads, or in a merge_call made from one (which runs in the caller's
  thread while the replicas wait)."""
  return (_replica_steps[0] > 0 or isinstance(threading.current_thread(),
                                              _mirrored_run._MirroredReplicaThread))  # pylint: disable=protected-access


def strategy_reduces_without_merge_call() -> bool:
  """Whether the strategy in scope all-reduces in replica context without merge_call."""
  return tf.__internal__.distribute.strategy_supports_no_merge_call()


class _ReplicaLaunchWhereNeeded:
  """Mixin for a strategy's extended: no merge_call where merge_call cannot work.

  MirroredStrategy reduces and updates through merge_call, which cannot run inside a
  cond or a loop of the replica function: Keras's gradient accumulation updates the
  weights in an `ops.cond` and fails under every strategy (keras-team/keras#20582). TF
  already has a path without merge_call (each replica all-reduces with collectives and
  updates its own copy), but takes it only under XLA on GPUs, and then with its own
  CollectiveAllReduce instead of the strategy's cross-device ops. Here it is also taken
  wherever merge_call is impossible, and with the strategy's cross-device ops (their
  `all_reduce_in_replica`). Everywhere else nothing changes.
  """

  def _use_merge_call(self):
    return super()._use_merge_call() and not merge_call_impossible()  # pytype: disable=attribute-error

  def _call_for_each_replica(self, fn, args, kwargs):
    _replica_steps[0] += 1
    try:
      return super()._call_for_each_replica(fn, args, kwargs)  # pytype: disable=attribute-error
    finally:
      _replica_steps[0] -= 1

  def _get_cross_device_ops(self, value):
    if not self._use_merge_call():
      return self._cross_device_ops  # pytype: disable=attribute-error
    return super()._get_cross_device_ops(value)  # pytype: disable=attribute-error


class MirroredExtended(_ReplicaLaunchWhereNeeded, _mirrored.MirroredExtended):
  """MirroredStrategy's extended, without merge_call where it fails."""


class MultiWorkerExtended(_ReplicaLaunchWhereNeeded, _mwms.CollectiveAllReduceExtended):
  """MultiWorkerMirroredStrategy's extended, except that a CPU-only worker may have
  several (logical) devices, and no merge_call where it cannot work.

  TF gives a worker without GPUs exactly one replica; tests and the launcher use
  logical CPU devices to stand for a worker's GPUs.
  """

  def __init__(self, container_strategy, cluster_resolver, communication_options,
               cpu_devices_per_worker):
    self._cpu_devices_per_worker = cpu_devices_per_worker
    super().__init__(container_strategy, cluster_resolver=cluster_resolver,
                     communication_options=communication_options)

  def _initialize_local_devices(self, cluster_resolver, worker_device):
    devices, kind = super()._initialize_local_devices(cluster_resolver, worker_device)
    n = self._cpu_devices_per_worker
    if kind == "CPU" and n and n > 1:
      have = len(tf.config.list_logical_devices("CPU"))
      if have < n:
        raise ValueError(
            f"devices_per_worker={n} but this worker has {have} CPU device(s): call "
            "tf_fusion.multi_worker_strategy before TensorFlow runs anything, or create "
            "them with tf.config.set_logical_device_configuration.")
      devices = tuple(f"{worker_device}/device:CPU:{i}" for i in range(n))
    return devices, kind


def init_strategy(strategy, extended) -> None:
  """Strategy.__init__ with our `extended` (TF's strategies hard-code theirs)."""
  _distribute_lib.Strategy.__init__(strategy, extended)  # pylint: disable=non-parent-init-called


def cross_device_ops_of(strategy):
  """The CrossDeviceOps `strategy` reduces replica values with (None if none)."""
  return getattr(strategy.extended, "_cross_device_ops", None)


def host_cross_device_ops_of(strategy):
  """The CrossDeviceOps MultiWorkerMirroredStrategy uses for values on the host."""
  return strategy.extended._host_cross_device_ops  # pylint: disable=protected-access


def set_cross_device_ops(strategy, ops) -> None:
  """Makes `strategy` reduce with `ops` (before anything is traced)."""
  strategy.extended._cross_device_ops = ops  # pylint: disable=protected-access


def worker_index(strategy, default=0) -> int:
  """This worker's index in `strategy`'s cluster (`default` where it has none)."""
  return int(getattr(strategy.extended, "_id_in_cluster", default))


def num_workers(strategy) -> int:
  """How many workers (processes) `strategy` spans: 1 for one-host strategies."""
  return int(getattr(strategy.extended, "_num_workers", 1))


def fresh_mirrored_collective_keys(step: int = 10_000) -> None:
  """Moves TF's MirroredStrategy collective key base past the last strategy's: two
  stock MirroredStrategy objects in one process otherwise reuse group keys and fail
  ("Shape mismatch in the collective instance"); TF's own tests do this."""
  tf.distribute.MirroredStrategy._collective_key_base += step  # pylint: disable=protected-access


# --- cluster resolvers ----------------------------------------------------------------

def expand_tasks_per_node(text: str):
  """Slurm's SLURM_STEP_TASKS_PER_NODE ("2(x3),1") as a list of counts per node."""
  return _slurm.expand_tasks_per_node(text)
