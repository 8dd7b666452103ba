"""Strategies wired to the fused all-reduce path."""

import threading
from typing import List, Optional, Sequence

from absl import logging
import tensorflow as tf
from tensorflow.python.distribute import collective_all_reduce_strategy as tf_mwms
from tensorflow.python.distribute import distribute_lib
from tensorflow.python.distribute import mirrored_run
from tensorflow.python.distribute import mirrored_strategy as tf_mirrored
from tensorflow.python.distribute import values as values_lib

from tf_fusion import algorithms
from tf_fusion.cross_device_ops import FusedAllReduce
from tf_fusion.cross_device_ops import MultiWorkerFusedAllReduce
from tf_fusion.options import FusionOptions
from tf_fusion.options import devices_per_worker_from_env


def _merge_call_impossible():
  """True while a replica thread builds a graph other than its own: a branch of a
  `tf.cond` or a `tf.while_loop`, or a nested tf.function. TF's merge_call raises there
  ("merge_call called while defining a new graph"), so the step must go on without it.
  """
  thread = threading.current_thread()
  return (isinstance(thread, mirrored_run._MirroredReplicaThread)  # pylint: disable=protected-access
          and not thread.in_eager
          and tf.compat.v1.get_default_graph() is not thread.graph)


class _ReplicaLaunchWhereNeeded:
  """Mixin for a strategy's extended: no merge_call where merge_call cannot work.

  MirroredStrategy reduces and updates through merge_call, which cannot run inside a
  cond or a loop of the replica function: Keras's gradient accumulation updates the
  weights in an `ops.cond` and fails under every strategy (keras-team/keras#20582). TF
  already has a path without merge_call (each replica all-reduces with collectives and
  updates its own copy), but takes it only under XLA on GPUs, and then with its own
  CollectiveAllReduce instead of the strategy's cross-device ops. Here it is also taken
  wherever merge_call is impossible, and with tf_fusion's packs (FusedAllReduce's
  `_all_reduce`). Everywhere else nothing changes: the merge_call path keeps the
  per-pack algorithm choice.
  """

  def _use_merge_call(self):
    return super()._use_merge_call() and not _merge_call_impossible()  # pytype: disable=attribute-error

  def _get_cross_device_ops(self, value):
    if not self._use_merge_call():
      return self._cross_device_ops  # pytype: disable=attribute-error
    return super()._get_cross_device_ops(value)  # pytype: disable=attribute-error


class _MirroredExtended(_ReplicaLaunchWhereNeeded, tf_mirrored.MirroredExtended):
  pass


class _MirroredStrategy(tf.distribute.MirroredStrategy):
  """tf.distribute.MirroredStrategy whose extended avoids merge_call where it fails."""

  def __init__(self, devices=None, cross_device_ops=None):
    # MirroredStrategy.__init__ hard-codes TF's extended; build ours instead.
    distribute_lib.Strategy.__init__(  # pylint: disable=non-parent-init-called
        self, _MirroredExtended(self, devices=devices, cross_device_ops=cross_device_ops))


def mirrored_strategy(devices: Optional[Sequence[str]] = None,
                      options: Optional[FusionOptions] = None,
                      cost_model=None) -> tf.distribute.MirroredStrategy:
  """A MirroredStrategy over `devices` whose reductions go through FusedAllReduce.

  Unlike `tf.distribute.MirroredStrategy(devices, cross_device_ops=FusedAllReduce())`,
  it also trains where TF's MirroredStrategy cannot call merge_call: Keras's
  `gradient_accumulation_steps` (the update runs in a cond) and reductions inside loops.

  Example:
    >>> strategy = tf_fusion.mirrored_strategy(options=tf_fusion.FusionOptions())
    >>> with strategy.scope():
    ...   model = make_model()
  """
  ops = FusedAllReduce(options, cost_model=cost_model)
  return _MirroredStrategy(devices, cross_device_ops=ops)


class _Extended(_ReplicaLaunchWhereNeeded, tf_mwms.CollectiveAllReduceExtended):
  """TF's extended, except that a CPU-only worker may have several (logical) devices,
  and no merge_call where it cannot work (_ReplicaLaunchWhereNeeded).

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


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
  """MultiWorkerMirroredStrategy plus a shim for keras-team/keras#20585.

  Keras 3.15's `fit` under this strategy calls `strategy.reduce("MEAN", (x, y))` on a
  tuple (`_maybe_symbolic_build`) and `strategy.reduce("MEAN", scalar, axis=0)` on
  per-replica scalars (`reduce_per_replica`); TF rejects both. `reduce` here maps over
  nests and drops the axis of rank-0 values. It acts only on those inputs, which TF
  would reject anyway: once Keras stops sending them, it never acts.
  """

  _shim_logged = False

  def __init__(self, cluster_resolver, communication_options, cpu_devices_per_worker):
    # MultiWorkerMirroredStrategy.__init__ hard-codes TF's extended; build ours instead.
    distribute_lib.Strategy.__init__(  # pylint: disable=non-parent-init-called
        self, _Extended(self, cluster_resolver, communication_options,
                        cpu_devices_per_worker))

  def reduce(self, reduce_op, value, axis=None):
    if isinstance(value, (tuple, list, dict)) and not isinstance(
        value, values_lib.DistributedValues):
      self._log_shim("a nest of values")
      return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
    if axis is not None and _rank(value) == 0:
      self._log_shim("axis on a scalar")
      axis = None
    return super().reduce(reduce_op, value, axis)

  def _log_shim(self, what):
    if not _MultiWorkerStrategy._shim_logged:
      _MultiWorkerStrategy._shim_logged = True
      logging.info("tf_fusion: strategy.reduce got %s (keras-team/keras#20585); "
                   "reducing element by element.", what)


def _rank(value):
  if isinstance(value, values_lib.DistributedValues):
    value = value.values[0]
  shape = getattr(value, "shape", None)
  return None if shape is None else shape.rank


def multi_worker_strategy(options: Optional[FusionOptions] = None,
                          cluster_resolver=None,
                          cost_model=None,
                          devices_per_worker: Optional[int] = None,
                          ) -> tf.distribute.MultiWorkerMirroredStrategy:
  """A MultiWorkerMirroredStrategy whose gradient all-reduce is tf_fusion's.

  Every worker runs the same program with its own TF_CONFIG (or `cluster_resolver`):
  packs, FP16 wire and the per-pack algorithm (ring / hierarchical / auto) as in
  FusionOptions, across all devices of all workers. `options.timeout_seconds` also
  bounds TF's own collectives, so a dead peer becomes an error, not a hang.

  Example:
    >>> strategy = tf_fusion.multi_worker_strategy(
    ...     tf_fusion.FusionOptions(compression="fp16", algorithm="auto"))
    >>> with strategy.scope():
    ...   model = make_model(); model.compile(...)
    >>> model.fit(dataset)

  Args:
    options: a FusionOptions (default FusionOptions()).
    cluster_resolver: default: TFConfigClusterResolver (reads TF_CONFIG);
      `tf_fusion.cluster.resolver("slurm")` for srun, "auto" to pick.
    cost_model: skip calibration with a saved CostModel (same on every worker).
    devices_per_worker: on workers without GPUs, use this many (logical) CPU devices
      per worker instead of TF's one (default: TF_FUSION_DEVICES_PER_WORKER, which
      `python -m tf_fusion.launch --devices_per_worker K` sets); workers with GPUs use
      all their GPUs.
  """
  options = options or FusionOptions()
  strategy = _multi_worker(cluster_resolver, devices_per_worker,
                           timeout_seconds=options.timeout_seconds)
  extended = strategy.extended
  for tf_ops in (extended._cross_device_ops, extended._host_cross_device_ops):  # pylint: disable=protected-access
    algorithms.use_run_time_keys(tf_ops)
  extended._cross_device_ops = MultiWorkerFusedAllReduce(  # pylint: disable=protected-access
      options, extended._cross_device_ops, num_workers(strategy), cost_model=cost_model,  # pylint: disable=protected-access
      worker_index=extended._id_in_cluster)  # pylint: disable=protected-access
  return strategy


def tf_multi_worker_strategy(bytes_per_pack: int = 0,
                             timeout_seconds: Optional[float] = None,
                             cluster_resolver=None,
                             devices_per_worker: Optional[int] = None,
                             ) -> tf.distribute.MultiWorkerMirroredStrategy:
  """TensorFlow's own MultiWorkerMirroredStrategy reduction (CollectiveAllReduce,
  `bytes_per_pack` as TF documents it), on the devices `multi_worker_strategy` would
  use: the baseline to compare tf_fusion with, everything else equal.

  Only two things differ from a stock MultiWorkerMirroredStrategy, both needed to train
  at all in this comparison: a CPU-only worker may have several logical devices (TF
  gives it one), and Keras 3's `strategy.reduce` calls that TF rejects are mapped
  (keras-team/keras#20585). TF's cross-device ops and its collective launchers are
  left as they are.
  """
  return _multi_worker(cluster_resolver, devices_per_worker, bytes_per_pack=bytes_per_pack,
                       timeout_seconds=timeout_seconds)


def _multi_worker(cluster_resolver, devices_per_worker, **communication):
  """_MultiWorkerStrategy with `devices_per_worker` (default: from the environment)
  logical CPUs on a worker without GPUs, and TF's CommunicationOptions(**communication)."""
  if devices_per_worker is None:
    devices_per_worker = devices_per_worker_from_env()
  if devices_per_worker and devices_per_worker > 1 and not tf.config.list_physical_devices("GPU"):
    split_cpu(devices_per_worker)
  return _MultiWorkerStrategy(
      cluster_resolver, tf.distribute.experimental.CommunicationOptions(**communication),
      devices_per_worker)


def logical_cpu_devices(n: int) -> List[str]:
  """Splits the CPU into `n` logical devices (replicas without GPUs) and returns their
  names, "/job:localhost/replica:0/task:0/device:CPU:i" style as TF lists them.

  Must run before TensorFlow starts its runtime (the first op); afterwards the split
  cannot change, and this returns the CPU devices there are, which may be fewer (the
  strategies then say what is missing).
  """
  split_cpu(n)
  return [d.name for d in tf.config.list_logical_devices("CPU")][:n]


def split_cpu(n: int) -> None:
  """`logical_cpu_devices` without listing them, which would start the runtime: for
  code that must configure it first (MultiWorkerMirroredStrategy's collectives)."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  if len(tf.config.get_logical_device_configuration(cpu) or ()) >= n:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * n)
  except RuntimeError:
    pass


def num_workers(strategy) -> int:
  """How many workers (processes) `strategy` spans: 1 for one-host strategies."""
  return int(getattr(strategy.extended, "_num_workers", 1))


def fused_ops_of(strategy) -> Optional[FusedAllReduce]:
  """The FusedAllReduce `strategy` reduces with, or None if it has none."""
  ops = getattr(strategy.extended, "_cross_device_ops", None)
  return ops if isinstance(ops, FusedAllReduce) else None
