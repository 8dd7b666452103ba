"""FusedAllReduce: a tf.distribute.CrossDeviceOps that reduces gradients in a few packs.

This module is TensorFlow's contract only: which values are fused (floating
per-replica values reduced back where they live, dense or IndexedSlices) and which go
TF's own way (integer, other destinations), the devices of the replicas, the eager path, threads,
copies. The work is done by the layers below it: planner.Planner decides the plan,
pipeline.reduce_packs builds each pack's ops, algorithms and collectives launch them,
agreement checks that every worker does the same.

Keras 3 reaches us through `replica_context.all_reduce(SUM, grads)` ->
`batch_reduce_implementation`, once per trace of the train step, with no options; so the
settings live on this object (FusionOptions), not in per-call options.
"""

import copy
import functools
import threading
from typing import List, Optional, Sequence

import tensorflow as tf

from tf_fusion import compression
from tf_fusion import pipeline
from tf_fusion import plans
from tf_fusion import sparse
from tf_fusion._internal import tf as tf_internal
from tf_fusion.agreement import Agreement
from tf_fusion.collectives import Collectives
from tf_fusion.collectives import canonical_devices
from tf_fusion.collectives import explain_errors
from tf_fusion.collectives import run_as_graph
from tf_fusion.cost_model import CostModel
from tf_fusion.options import CallSettings
from tf_fusion.options import FusionOptions
from tf_fusion.planner import Planner

_FUSIBLE_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


class FusedAllReduce(tf_internal.CrossDeviceOpsHooks, tf.distribute.CrossDeviceOps):
  """Tensor-fused all-reduce for MirroredStrategy.

  Example:
    >>> ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(pack_bytes=4 << 20))
    >>> strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
    >>> model.fit(...)           # gradients now go through a few packs
    >>> ops.last_plan            # one entry per pack: dtype, count, bytes, algorithm

  Args:
    options: a FusionOptions (defaults: FusionOptions()).
    cost_model: a CostModel for algorithm="auto" or pack_bytes=None; measured on first
      use (calibration.calibrate) when not given.

  References:
    Jia et al., "Highly Scalable Deep Learning Training System with Mixed-Precision:
    Training ImageNet in Four Minutes", arXiv:1807.11205, 2018.
  """

  def __init__(self, options: Optional[FusionOptions] = None,
               cost_model: Optional[CostModel] = None, _topology=None):
    super().__init__()
    if options is None:
      options = FusionOptions()
    if not isinstance(options, FusionOptions):
      raise TypeError(f"options must be a tf_fusion.FusionOptions, got "
                      f"{type(options).__name__}.")
    self._options = options
    self._compressor = compression.Compression.get(options.compression)
    self._planner = Planner(options, _topology or plans.Topology.local(), cost_model)
    self._fallback = tf.distribute.ReductionToOneDevice()
    self._eager_fns = {}
    # One instance may be called from several threads: the plan, the eager functions
    # and last_plan are shared, and two eager launches on the same devices must not
    # interleave their collectives (each would wait for the other's: a deadlock).
    self._lock = threading.RLock()
    self.last_plan = ()

  @property
  def options(self) -> FusionOptions:
    return self._options

  @property
  def num_workers(self) -> int:
    """Workers this reduction spans (1 here)."""
    return self._planner.topology.num_workers

  def __deepcopy__(self, memo):
    # Strategies get deep-copied (distribute coordinator); the copy shares the
    # settings, the process-wide collective keys and the calibrated models, and starts
    # its own traces and plan.
    new = copy.copy(self)
    new._planner = self._planner.copy()
    new._eager_fns = {}
    new._lock = threading.RLock()
    new.last_plan = ()
    memo[id(self)] = new
    return new

  # --- planning ------------------------------------------------------------------------

  def cost_model(self, devices) -> CostModel:
    """The cost model for `devices`: given, or calibrated once and kept."""
    return self._planner.cost_model(devices)

  def make_plan(self, specs, devices, replica_launch=False, max_pack_bytes=None,
                timeout_seconds=None, agree=True, gathered=()) -> tuple:
    """Packs, algorithms and sizes for tensors of `specs` on `devices` (no ops built).

    `replica_launch`: for the no-merge-call path, where each replica launches its own
    collectives: every pack runs the ring. `max_pack_bytes`: a cap on the pack size
    (a call's bytes_per_pack). `timeout_seconds`: for the collectives planning runs
    across workers (a call's timeout). `agree`: across workers, check that every worker
    has the same tensors and plan (False only to trace a plan alone). `gathered`:
    (sparse.SparseSpec, reason) of the IndexedSlices to gather, after `specs`.
    """
    del timeout_seconds, agree   # one worker: nothing to agree on
    return self._planner.make_plan(specs, devices, reduce_fn=self._reduce_sum,
                                   replica_launch=replica_launch,
                                   max_pack_bytes=max_pack_bytes, gathered=gathered)

  def _reduce_sum(self, plan, devices, per_device):
    return self.reduce_per_device(per_device, devices, plan)

  # --- tf.distribute.CrossDeviceOps ------------------------------------------------------

  def reduce_implementation(self, reduce_op, per_replica_value, destinations, options):
    return self.batch_reduce_implementation(
        reduce_op, [(per_replica_value, destinations)], options)[0]

  def batch_reduce_implementation(self, reduce_op, value_destination_pairs, options):
    call = CallSettings.of(self._options, options)
    # TF's ops (the fallback) get the same per-call options, our timeout by default.
    options = tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=call.max_pack_bytes or 0, timeout_seconds=call.timeout_seconds,
        implementation=options.implementation if options is not None else
        tf.distribute.experimental.CommunicationImplementation.AUTO)
    reduce_op = tf.distribute.ReduceOp(reduce_op)
    results = [None] * len(value_destination_pairs)
    fused = []
    exact = not compression.may_compress(self._compressor)
    with self._lock:
      for i, (value, dest) in enumerate(value_destination_pairs):
        if not exact and self._fusible(value, dest):
          fused.append(i)
        else:
          results[i] = self._fallback.reduce_implementation(reduce_op, value, dest,
                                                            options)
      if fused:
        values = [value_destination_pairs[i][0] for i in fused]
        for i, mirrored in zip(fused, self._reduce_fused(reduce_op, values, fused, call)):
          results[i] = mirrored
    return results

  def gather_exact(self, per_replica_value, destinations, axis, options):
    """strategy.gather: TF's own, exact (no packs, no FP16 wire)."""
    return tf_internal.gather(self._fallback, per_replica_value, destinations, axis,
                              options)

  def _fusible(self, value, destinations):
    if not tf_internal.is_per_replica(value):
      return False
    if not (sparse.fusible(value.values) or all(_dense_fusible(v) for v in value.values)):
      return False
    # An all-reduce: results go back where the values are (Keras passes dest=value).
    return destinations is value or tf_internal.devices_match(value, destinations)

  def _devices_for(self, values):
    """The devices of the replicas, from the strategy when values do not say.

    Inside a tf.function, PerReplica arguments report device ''; a
    collective placed from that lands every replica's op on one device and hangs.
    """
    count = len(values[0].values)
    if any(len(v.values) != count for v in values):
      raise ValueError("all values of a batch reduction must have the same number "
                       f"of replicas, got {[len(v.values) for v in values]}.")
    worker_devices = ()
    if tf.distribute.has_strategy():
      worker_devices = tuple(tf.distribute.get_strategy().extended.worker_devices)
    if len(worker_devices) == count:
      return canonical_devices(worker_devices)
    devices = tuple(v.device for v in values[0].values)
    if all(devices):
      return canonical_devices(devices)
    raise ValueError(
        "cannot tell which device each replica's value lives on (devices "
        f"{devices!r}); call the reduction inside the strategy's scope.")

  def _reduce_fused(self, reduce_op, values, positions, call):
    devices = self._devices_for(values)
    per_device = [[v.values[d] for v in values] for d in range(len(devices))]
    arrangement, plan = self._arranged_plan(per_device, devices, call)
    # Users read positions in the list they reduced, not in the fused sub-list.
    self.last_plan = plans.renumbered(plan, [positions[p] for p in arrangement.positions])
    reduce_batch = arrangement.around(functools.partial(
        self._reduce_dense, reduce_op, devices, plan, call))
    if tf.executing_eagerly():
      # Collectives block until every device joins: launched one by one in eager
      # mode they would deadlock, so the eager path runs as one function.
      key = (reduce_op, devices, plan, call, arrangement)
      if key not in self._eager_fns:
        self._eager_fns[key] = tf.function(reduce_batch)
      with explain_errors(self.num_workers, call.timeout_seconds):
        outputs = run_as_graph(self._eager_fns[key], per_device)
      # A tf.function called eagerly names its call's device as every output's
      # `.device`, though each buffer stays where it was computed (`backing_device`);
      # an identity on the replica's own device re-homes it without a copy.
      outputs = [[_on_device(device, t) for t in out]
                 for device, out in zip(devices, outputs)]
    else:
      outputs = reduce_batch(per_device)
    return [tf_internal.mirrored(outputs[d][i] for d in range(len(devices)))
            for i in range(len(values))]

  def _arranged_plan(self, per_device, devices, call, replica_launch=False):
    """(sparse.Arrangement, plan) of one batch: IndexedSlices gathered or densified."""
    arrangement = self._planner.arrangement(per_device, devices, replica_launch)
    plan = self.make_plan(list(arrangement.specs), devices, replica_launch=replica_launch,
                          max_pack_bytes=call.max_pack_bytes,
                          timeout_seconds=call.timeout_seconds,
                          gathered=arrangement.gathered)
    return arrangement, arrangement.marked(plan)

  def reduce_per_device(self, per_device: Sequence[Sequence[tf.Tensor]], devices,
                        plan=None, reduce_op=tf.distribute.ReduceOp.SUM, options=None
                        ) -> List[List[tf.Tensor]]:
    """The fused reduction of plain tensors, one list per device of `devices` (the
    same dtypes and shapes on each), by `plan` (default: this object's plan for them)
    and a call's CommunicationOptions `options`: for tools and tracing."""
    call = CallSettings.of(self._options, options)
    devices = canonical_devices(devices)
    if plan is None:
      plan = self.make_plan([(t.dtype, t.shape) for t in per_device[0]], devices,
                            max_pack_bytes=call.max_pack_bytes, agree=False)
    return self._reduce_dense(tf.distribute.ReduceOp(reduce_op), devices, plan, call,
                              per_device)

  def _reduce_dense(self, reduce_op, devices, plan, call, per_device):
    collectives = self.collectives(devices, call)
    codec = compression.PackCodec(self._compressor, reduce_op, collectives.group_size)
    return pipeline.reduce_packs(plan, per_device, codec,
                                 pipeline.AllDevicesLaunch(collectives))

  def collectives(self, devices, call=None) -> Collectives:
    """The launchers of `devices` for a call (default: none): its timeout, NCCL or ring."""
    call = call or CallSettings.of(self._options)
    implementation, gpus = call.implementation, all("GPU" in d.upper() for d in devices)
    if implementation == "nccl" and not gpus:
      self._planner.warn_once("tf_fusion: NCCL was asked for, but the devices are not "
                              "GPUs: the collectives run the ring, as TensorFlow's do")
      implementation = "auto"
    return Collectives.get(devices, self._planner.topology.group_size(devices),
                           call.timeout_seconds, implementation)

  # --- the no-merge-call path ----------------------------------------------------------

  def local_devices(self):
    """This worker's replica devices, from the strategy in scope."""
    if not tf.distribute.has_strategy():
      raise ValueError("tf_fusion: a replica-context all-reduce without merge_call must "
                       "run inside the strategy's scope.")
    return canonical_devices(tf.distribute.get_strategy().extended.worker_devices)

  def all_reduce_in_replica(self, reduce_op, value, replica_id, options):
    """One replica's share of an all-reduce launched without merge_call.

    TF takes this path where merge_call is impossible: in a branch of a `tf.cond` or
    `tf.while_loop` inside the replica function (Keras's gradient accumulation updates
    in a cond) and, on GPUs, under XLA. Every replica packs its own tensors by the same
    plan and launches one collective per pack from its own thread, so every pack runs
    the ring (TF's collective; NCCL on GPUs): reduce_to_one and hierarchical need all
    of a worker's buffers in one place, which no single replica has. The plan's note
    says so.

    Args:
      reduce_op: SUM or MEAN.
      value: a nest of this replica's tensors (dense or IndexedSlices).
      replica_id: this replica's index on this worker.
      options: a CommunicationOptions for this call, or None.

    Returns:
      The reduced nest, in the structure of `value`.
    """
    reduce_op = tf.distribute.ReduceOp(reduce_op)
    call = CallSettings.of(self._options, options)
    flat = tf.nest.flatten(value)
    devices = self.local_devices()
    collectives = self.collectives(devices, call)
    exact = not compression.may_compress(self._compressor)
    fused = [i for i, t in enumerate(flat)
             if not exact and (sparse.fusible([t]) or _dense_fusible(t))]
    outputs = [t if i in fused else pipeline.reduce_unpacked(
        collectives.launcher(replica_id), t, reduce_op, collectives.group_size)
               for i, t in enumerate(flat)]
    if not fused:
      return tf.nest.pack_sequence_as(value, outputs)
    tensors = [flat[i] for i in fused]
    with self._lock:
      arrangement, plan = self._arranged_plan([tensors], devices, call, replica_launch=True)
    self.last_plan = plans.renumbered(plan, [fused[p] for p in arrangement.positions])
    codec = compression.PackCodec(self._compressor, reduce_op, collectives.group_size)
    launch = pipeline.ReplicaLaunch(collectives, replica_id)
    (reduced,) = arrangement.around(
        lambda arranged: pipeline.reduce_packs(plan, arranged, codec, launch))([tensors])
    for i, part in zip(fused, reduced):
      outputs[i] = part
    return tf.nest.pack_sequence_as(value, outputs)


def _dense_fusible(t):
  return not isinstance(t, tf.IndexedSlices) and t.dtype in _FUSIBLE_DTYPES


def _on_device(device, tensor):
  with tf.device(device):
    return tf.identity(tensor)


class MultiWorkerFusedAllReduce(FusedAllReduce):
  """FusedAllReduce across the workers of a MultiWorkerMirroredStrategy.

  Packs as FusedAllReduce does; each pack is reduced by `ring` (TF's collective over all
  devices of all workers) or `hierarchical` (reduce in the worker, all-reduce among one
  device per worker, broadcast in the worker), or per pack by the cost model under
  `auto`. Everything it cannot fuse (sparse, integer, other destinations, values that
  are not per-replica) goes to TF's own CollectiveAllReduce of the strategy, which also
  crosses workers: no reduction stays local. Before a new gradient list or plan is
  used, every worker checks that the others have the same (agreement.Agreement).

  Built by `tf_fusion.multi_worker_strategy`; not meant to be constructed directly.

  Args:
    options: a FusionOptions.
    tf_ops: the strategy's own CollectiveAllReduce (fallback, gather, no-merge-call).
    num_workers: workers in the cluster (each with the same number of devices).
    cost_model: as for FusedAllReduce; calibrated across workers when not given.
    worker_index: this worker's place in the cluster, 0..num_workers-1 (the strategy's
      id in cluster), to name the workers whose plan differs.
  """

  def __init__(self, options, tf_ops, num_workers, cost_model=None, worker_index=None):
    super().__init__(options, cost_model=cost_model,
                     _topology=plans.Topology.across(num_workers))
    if not tf_internal.is_collective_all_reduce(tf_ops):
      raise TypeError(f"tf_ops must be TF's CollectiveAllReduce, got {type(tf_ops)}.")
    self._tf_ops = tf_ops
    self._fallback = tf_ops
    self._agreement = Agreement(num_workers, worker_index)

  @classmethod
  def on_devices(cls, options, devices, num_workers, cost_model=None, worker_index=0):
    """One worker's ops over local `devices` of a `num_workers` cluster, with TF's
    CollectiveAllReduce built here: to trace its graphs without a cluster."""
    tf_ops = tf_internal.collective_all_reduce(devices, num_workers * len(devices))
    return cls(options, tf_ops, num_workers, cost_model=cost_model,
               worker_index=worker_index)

  @property
  def worker_index(self) -> int:
    return self._agreement.rank()

  @property
  def tf_ops(self):
    """TF's CollectiveAllReduce of the strategy: its groups and communication options,
    and the reduction of values tf_fusion does not pack."""
    return self._tf_ops

  def local_devices(self):
    # The strategy's local devices, known at construction: also right outside the
    # strategy's scope (strategy.reduce), where value.device can name other devices.
    return canonical_devices(tf_internal.local_devices_of(self._tf_ops))

  def _devices_for(self, values):
    devices = self.local_devices()
    if all(len(v.values) == len(devices) for v in values):
      return devices
    return super()._devices_for(values)

  def make_plan(self, specs, devices, replica_launch=False, max_pack_bytes=None,
                timeout_seconds=None, agree=True, gathered=()) -> tuple:
    timeout_seconds = timeout_seconds or self._options.timeout_seconds
    collectives = Collectives.get(devices, self._planner.topology.group_size(devices),
                                  timeout_seconds)
    if agree:
      with explain_errors(self.num_workers, timeout_seconds):
        self._agreement.check_gradients(
            list(specs) + [(s.dtype, s.values_shape) for s, _ in gathered], collectives)
    plan = super().make_plan(specs, devices, replica_launch=replica_launch,
                             max_pack_bytes=max_pack_bytes, gathered=gathered)
    if agree:
      with explain_errors(self.num_workers, timeout_seconds):
        self._agreement.check_plan(plan, collectives)
    return plan

  def gather_exact(self, per_replica_value, destinations, axis, options):
    return tf_internal.gather(self._tf_ops, per_replica_value, destinations, axis, options)
