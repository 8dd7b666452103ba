"""Strategies wired to the fused all-reduce path."""

from typing import List, Optional, Sequence

from absl import logging
import tensorflow as tf

from tf_fusion import collectives
from tf_fusion import no_communication
from tf_fusion._internal import tf as tf_internal
from tf_fusion.cross_device_ops import FusedAllReduce
from tf_fusion.cross_device_ops import MultiWorkerFusedAllReduce
from tf_fusion.options import FusionOptions
from tf_fusion.options import devices_per_worker_from_env


class _MirroredStrategy(tf.distribute.MirroredStrategy):
  """tf.distribute.MirroredStrategy whose extended avoids merge_call where it fails
  (Keras's gradient accumulation, reductions inside loops): there each replica
  launches its share of the fused all-reduce itself."""

  def __init__(self, devices=None, cross_device_ops=None):
    # MirroredStrategy.__init__ hard-codes TF's extended; build ours instead.
    tf_internal.init_strategy(self, tf_internal.MirroredExtended(
        self, devices=devices, cross_device_ops=cross_device_ops))


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
  if isinstance(devices, FusionOptions):
    raise TypeError("mirrored_strategy's first argument is the device list; pass the "
                    "options by name: mirrored_strategy(options=FusionOptions(...)).")
  ops = FusedAllReduce(options, cost_model=cost_model)
  return _MirroredStrategy(devices, cross_device_ops=ops)


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
    tf_internal.init_strategy(self, tf_internal.MultiWorkerExtended(
        self, cluster_resolver, communication_options, cpu_devices_per_worker))

  def reduce(self, reduce_op, value, axis=None):
    if isinstance(value, (tuple, list, dict)) and not isinstance(
        value, tf.distribute.DistributedValues):
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
  if isinstance(value, tf.distribute.DistributedValues):
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
  tf_ops = tf_internal.cross_device_ops_of(strategy)
  for ops in (tf_ops, tf_internal.host_cross_device_ops_of(strategy)):
    collectives.use_run_time_keys(ops)
  tf_internal.set_cross_device_ops(strategy, MultiWorkerFusedAllReduce(
      options, tf_ops, num_workers(strategy), cost_model=cost_model,
      worker_index=tf_internal.worker_index(strategy)))
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


def no_communication_strategy(devices: Optional[Sequence[str]] = None,
                              multi_worker: bool = False, cluster_resolver=None,
                              devices_per_worker: Optional[int] = None
                              ) -> tf.distribute.Strategy:
  """MEASUREMENT ONLY: the strategy of `mirrored_strategy(devices)` (or, with
  `multi_worker`, of `multi_worker_strategy`) with no cross-replica communication: each
  replica applies its own gradients (`tf_fusion.no_communication`). Its step time is the
  floor that scaling efficiency is measured against; it does not train a correct model.
  """
  logging.warning("tf_fusion.strategy.no_communication_strategy: %s",
                  no_communication.WARNING)
  if not multi_worker:
    return _MirroredStrategy(devices, cross_device_ops=no_communication.NoCommunication())
  strategy = _multi_worker(cluster_resolver, devices_per_worker)
  tf_internal.set_cross_device_ops(
      strategy, no_communication.NoCommunication(num_workers(strategy)))
  return strategy


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
  cannot change.

  Raises:
    ValueError: TensorFlow has already started with fewer than `n` CPU devices.
  """
  split_cpu(n)
  found = [d.name for d in tf.config.list_logical_devices("CPU")][:n]
  if len(found) < n:
    raise ValueError(
        f"logical_cpu_devices({n}): TensorFlow has already started with {len(found)} CPU "
        "device(s), and the split cannot change once it runs: call it first, before "
        "any TensorFlow op (or tf.config.set_logical_device_configuration).")
  return found


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
  return tf_internal.num_workers(strategy)


def fused_ops_of(strategy) -> Optional[FusedAllReduce]:
  """The FusedAllReduce `strategy` reduces with, or None if it has none."""
  ops = tf_internal.cross_device_ops_of(strategy)
  return ops if isinstance(ops, FusedAllReduce) else None


def tf_mirrored_strategy(devices=None, cross_device_ops=None
                         ) -> tf.distribute.MirroredStrategy:
  """TensorFlow's own MirroredStrategy (with `cross_device_ops`, e.g. one of TF's), as
  the baseline to compare with: one process may build many, each with collective keys
  of its own (two stock ones otherwise collide: "Shape mismatch in the collective
  instance")."""
  tf_internal.fresh_mirrored_collective_keys()
  return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
