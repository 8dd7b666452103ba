"""FusedAllReduce: a tf.distribute.CrossDeviceOps that reduces gradients in a few packs.

Data flow of one batch reduction: split sparse and integer values off (they
go TF's unfused ReductionToOneDevice way) -> plan packs per dtype in back-propagation
order -> compress -> concat -> reduce each pack with its algorithm -> decompress -> MEAN
divides once, in at least FP32 -> split, reshape -> original order.

Keras 3 reaches us through `replica_context.all_reduce(SUM, grads)` ->
`batch_reduce_implementation`, once per trace of the train step, with no options; so the
settings live on this object (FusionOptions), not in per-call options.
"""

import contextlib
import copy
import dataclasses
import functools
import threading
import zlib
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.distribute import collective_util
from tensorflow.python.distribute import cross_device_ops as tf_cross_device_ops
from tensorflow.python.distribute import distribute_utils
from tensorflow.python.distribute import values as values_lib

from tf_fusion import algorithms
from tf_fusion import cost_model as cost_lib
from tf_fusion import autotune
from tf_fusion import compression as compression_lib
from tf_fusion import packing
from tf_fusion import stats
from tf_fusion.options import FusionOptions

_FUSIBLE_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

# Cost models of this process, shared by every FusedAllReduce: calibration runs seconds
# of collectives, and notebooks, sweeps and test suites build many strategies over the
# same devices. Keyed by what the timings depend on (devices, group, algorithms) and
# the file they are kept in.
_COST_MODELS = {}
_COST_MODELS_LOCK = threading.RLock()


class FusedAllReduce(tf.distribute.CrossDeviceOps):
  """Tensor-fused all-reduce for MirroredStrategy.

  Example:
    >>> ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(pack_bytes=4 << 20))
    >>> strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
    >>> model.fit(...)           # gradients now go through a few packs
    >>> ops.last_plan            # one entry per pack: dtype, count, bytes, algorithm

  Args:
    options: a FusionOptions (defaults: FusionOptions()).
    cost_model: a cost_lib.CostModel for algorithm="auto" or pack_bytes=None;
      measured on first use (cost_lib.calibrate) when not given.

  References:
    Jia et al., "Highly Scalable Deep Learning Training System with Mixed-Precision:
    Training ImageNet in Four Minutes", arXiv:1807.11205, 2018.
  """

  def __init__(self, options: Optional[FusionOptions] = None,
               cost_model: Optional[cost_lib.CostModel] = None):
    super().__init__()
    if options is None:
      options = FusionOptions()
    if not isinstance(options, FusionOptions):
      raise TypeError(f"options must be a tf_fusion.FusionOptions, got "
                      f"{type(options).__name__}.")
    self._options = options
    self._compressor = compression_lib.Compression.get(options.compression)
    self._cost_models = _COST_MODELS
    self._given_cost_model = cost_model
    self._fallback = tf.distribute.ReductionToOneDevice()
    self._eager_fns = {}
    self._warned = set()
    self._agreed = set()   # autotune keys every worker has agreed on in this process
    # One instance may be called from several threads: the plan, the eager functions
    # and last_plan are shared, and two eager launches on the same devices must not
    # interleave their collectives (each would wait for the other's: a deadlock).
    self._lock = threading.RLock()
    self.last_plan = ()

  @property
  def options(self) -> FusionOptions:
    return self._options

  def __deepcopy__(self, memo):
    # Strategies get deep-copied (distribute coordinator); the copy shares the
    # settings, the process-wide collective keys and the calibrated models, and starts
    # its own traces and plan.
    new = copy.copy(self)
    new._eager_fns = {}  # pylint: disable=protected-access
    new._warned = set()  # pylint: disable=protected-access
    new._lock = threading.RLock()  # pylint: disable=protected-access
    new.last_plan = ()
    memo[id(self)] = new
    return new

  # --- tf.distribute.CrossDeviceOps --------------------------------------------------

  def reduce_implementation(self, reduce_op, per_replica_value, destinations,
                            options):
    return self.batch_reduce_implementation(
        reduce_op, [(per_replica_value, destinations)], options)[0]

  def batch_reduce_implementation(self, reduce_op, value_destination_pairs,
                                  options):
    call = self._call_settings(options)
    # TF's ops (the fallback) get the same per-call options, our timeout by default.
    options = collective_util.Options(
        bytes_per_pack=call.max_pack_bytes or 0, timeout_seconds=call.timeout_seconds,
        implementation=options.implementation if options is not None else
        collective_util.CommunicationImplementation.AUTO)
    reduce_op = tf.distribute.ReduceOp(reduce_op)
    results = [None] * len(value_destination_pairs)
    fused = []
    with self._lock:
      for i, (value, dest) in enumerate(value_destination_pairs):
        if self._fusible(value, dest):
          fused.append(i)
        else:
          results[i] = self._fallback.reduce_implementation(reduce_op, value, dest,
                                                            options)
      if fused:
        values = [value_destination_pairs[i][0] for i in fused]
        for i, mirrored in zip(fused, self._reduce_fused(reduce_op, values, fused, call)):
          results[i] = mirrored
    return results

  def _call_settings(self, options) -> "_Call":
    """What one call's CommunicationOptions change, over FusionOptions.

    timeout_seconds bounds this call's collectives; bytes_per_pack > 0 caps the pack
    size (as TF documents it); implementation picks the collective (NCCL or ring) on
    GPUs (over FusionOptions.implementation), and on other devices does what TF does:
    NCCL is not there, so ring.
    """
    timeout = self._options.timeout_seconds
    max_pack_bytes, implementation = None, self._options.implementation
    if options is not None:
      timeout = options.timeout_seconds or timeout
      max_pack_bytes = options.bytes_per_pack or None
      if options.implementation.value.lower() != "auto":
        implementation = options.implementation.value.lower()
    return _Call(timeout, max_pack_bytes, implementation)

  def _gather_implementation(self, per_replica_value, destinations, axis, options):
    # strategy.gather: TF's own, exact (no packs, no FP16 wire); CrossDeviceOps has none.
    return self._fallback._gather_implementation(  # pylint: disable=protected-access
        per_replica_value, destinations, axis, options)

  # --- the fused path ----------------------------------------------------------------

  def _fusible(self, value, destinations):
    if not isinstance(value, values_lib.PerReplica):
      return False
    if any(isinstance(v, tf.IndexedSlices) or v.dtype not in _FUSIBLE_DTYPES
           for v in value.values):
      return False
    # An all-reduce: results go back where the values are (Keras passes dest=value).
    return destinations is value or tf_cross_device_ops._devices_match(  # pylint: disable=protected-access
        value, destinations)

  def _devices_for(self, values: Sequence[values_lib.PerReplica]):
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
      return algorithms.canonical_devices(worker_devices)
    devices = tuple(v.device for v in values[0].values)
    if all(devices):
      return algorithms.canonical_devices(devices)
    raise ValueError(
        "cannot tell which device each replica's value lives on (devices "
        f"{devices!r}); call the reduction inside the strategy's scope.")

  def _reduce_fused(self, reduce_op, values, positions, call):
    devices = self._devices_for(values)
    per_device = [[v.values[d] for v in values] for d in range(len(devices))]
    specs = [(t.dtype, t.shape) for t in per_device[0]]
    plan = self.make_plan(specs, devices, max_pack_bytes=call.max_pack_bytes,
                          timeout_seconds=call.timeout_seconds)
    # Users read positions in the list they reduced, not in the fused sub-list.
    self.last_plan = tuple(
        dataclasses.replace(e, tensor_indices=tuple(positions[i] for i in e.tensor_indices))
        for e in plan)
    if tf.executing_eagerly():
      # Collectives block until every device joins: launched one by one in eager
      # mode they would deadlock, so the eager path runs as one function.
      key = (reduce_op, devices, plan, call)
      if key not in self._eager_fns:
        self._eager_fns[key] = tf.function(
            functools.partial(self._reduce_dense, reduce_op, devices, plan, call=call))
      with _explain_collective_errors(self, call.timeout_seconds):
        outputs = self._eager_fns[key](per_device)
      # A tf.function called eagerly names its call's device as every output's
      # `.device`, though each buffer stays where it was computed (`backing_device`);
      # an identity on the replica's own device re-homes it without a copy.
      outputs = [[_on_device(device, t) for t in out]
                 for device, out in zip(devices, outputs)]
    else:
      outputs = self._reduce_dense(reduce_op, devices, plan, per_device, call=call)
    return [distribute_utils.regroup(tuple(outputs[d][i] for d in range(len(devices))),
                                     wrap_class=values_lib.Mirrored)
            for i in range(len(values))]

  def _group_size(self, devices):
    return len(devices)

  def _collectives(self, devices, call):
    """The launchers of `devices` for one call: its timeout and collective."""
    implementation = call.implementation
    gpus = all("GPU" in d.upper() for d in devices)
    if implementation == "nccl" and not gpus:
      self._warn_once("tf_fusion: NCCL was asked for, but the devices are not GPUs: "
                      "the collectives run the ring, as TensorFlow's do")
      implementation = "auto"
    return algorithms.Collectives.get(devices, self._group_size(devices),
                                      call.timeout_seconds, implementation)

  def _warn_once(self, message):
    if message not in self._warned:
      self._warned.add(message)
      logging.warning("%s.", message)

  # --- the no-merge-call path --------------------------------------------------------

  def _local_devices(self):
    """This worker's replica devices, from the strategy in scope."""
    if not tf.distribute.has_strategy():
      raise ValueError("tf_fusion: a replica-context all-reduce without merge_call must "
                       "run inside the strategy's scope.")
    return algorithms.canonical_devices(tf.distribute.get_strategy().extended.worker_devices)

  def _all_reduce(self, reduce_op, value, replica_id, options):
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
    call = self._call_settings(options)
    flat = tf.nest.flatten(value)
    devices = self._local_devices()
    collectives = self._collectives(devices, call)
    outputs = list(flat)
    fused = []
    for i, t in enumerate(flat):
      if isinstance(t, tf.IndexedSlices) or t.dtype not in _FUSIBLE_DTYPES:
        outputs[i] = _reduce_unfused(collectives.launcher(replica_id), t, reduce_op,
                                     collectives.group_size)
      else:
        fused.append(i)
    if not fused:
      return tf.nest.pack_sequence_as(value, outputs)
    tensors = [flat[i] for i in fused]
    with self._lock:
      plan = self.make_plan([(t.dtype, t.shape) for t in tensors], devices,
                            replica_launch=True, max_pack_bytes=call.max_pack_bytes,
                            timeout_seconds=call.timeout_seconds)
    self.last_plan = tuple(
        dataclasses.replace(e, tensor_indices=tuple(fused[i] for i in e.tensor_indices))
        for e in plan)
    watched = max((e.index for e in plan if e.algorithm != "none"), default=None)
    for entry in plan:
      with tf.name_scope(stats.pack_scope(entry)):
        like = [tensors[i] for i in entry.tensor_indices]
        scales = None
        if self._range_scaled(entry):
          with tf.name_scope("range"):
            scales = compression_lib.range_scales(collectives.launch(
                replica_id, compression_lib.local_bounds(like)))
        buffer, ctx = self._compress_pack(like, scales)
        if entry.algorithm != "none":
          buffer = collectives.launch(replica_id, buffer, watched=entry.index == watched)
        buffer = self._finisher(reduce_op, collectives.group_size, ctx, like,
                                scaled=scales is not None)(buffer)
        unpacked = _unscaled(packing.unpack(buffer, like), scales, like,
                             _divisor(reduce_op, collectives.group_size))
        for i, part in zip(entry.tensor_indices, unpacked):
          outputs[fused[i]] = part
    return tf.nest.pack_sequence_as(value, outputs)

  def _reduce_dense(self, reduce_op, devices, plan, per_device, call=None
                    ) -> List[List[tf.Tensor]]:
    call = call or self._call_settings(None)
    collectives = self._collectives(devices, call)
    group_size = collectives.group_size
    order = algorithms.DeviceOrder() if collectives.uses_nccl else None
    outputs = [[None] * len(per_device[0]) for _ in devices]
    # The timeout rides on the last pack that runs a collective (see
    # Collectives.all_reduce): launched last, it cannot finish while a peer is gone.
    watched = max((e.index for e in plan if e.algorithm in ("ring", "hierarchical")),
                  default=None)
    for entry in plan:
      with tf.name_scope(stats.pack_scope(entry)):
        parts = [[tensors[i] for i in entry.tensor_indices] for tensors in per_device]
        scales = [None] * len(devices)
        if self._range_scaled(entry):
          bounds = []
          for device, p in zip(collectives.devices, parts):
            with tf.device(device):
              bounds.append(compression_lib.local_bounds(p))
          with tf.name_scope("range"):
            bounds = self._run(entry, bounds, collectives, None, order=order)
          scales = []
          for device, b in zip(collectives.devices, bounds):
            with tf.device(device):
              scales.append(compression_lib.range_scales(b))
        buffers, ctx = [], None
        for device, p, sc in zip(collectives.devices, parts, scales):
          with tf.device(device):
            buffer, ctx = self._compress_pack(p, sc)
            buffers.append(buffer)
        finish = self._finisher(reduce_op, group_size, ctx, parts[0],
                                scaled=scales[0] is not None)
        reduced = self._run(entry, buffers, collectives, finish,
                            watched=entry.index == watched, order=order, sharded=True)
        for d, device in enumerate(collectives.devices):
          with tf.device(device):
            unpacked = _unscaled(packing.unpack(reduced[d], parts[d]), scales[d], parts[d],
                                 _divisor(reduce_op, group_size))
            for i, part in zip(entry.tensor_indices, unpacked):
              outputs[d][i] = part
    return outputs

  def _range_scaled(self, entry):
    """Whether pack `entry` is range-scaled: compression "fp16" (its module doc), also
    for float16 tensors; compression "none" leaves every bit as it is."""
    return (entry.algorithm != "none" and self._compressor.name == "fp16"
            and compression_lib.needs_range_scaling(entry.wire_dtype))

  def _compress_pack(self, tensors, scales=None):
    """(wire buffer, ctx) of one device's tensors of a pack, range-scaled by `scales`."""
    if scales is not None:
      wire = self._compressor.wire_dtype(tensors[0].dtype)
      return packing.pack(compression_lib.scale_to_wire(tensors, scales, wire)), None
    compressed = [self._compressor.compress(t) for t in tensors]
    return packing.pack([c for c, _ in compressed]), compressed[0][1]

  def _finisher(self, reduce_op, group_size, ctx, like, scaled=False):
    """What runs on a reduced pack: back from the wire dtype, MEAN's division (in at
    least float32), back to the tensors' dtype. A range-scaled pack stays on the wire
    dtype: its scales and MEAN's division are applied tensor by tensor after the split,
    in the same pass as the cast back (`_unscaled`)."""
    dtype = like[0].dtype

    def finish(reduced):
      if scaled:
        return reduced
      reduced = self._compressor.decompress(reduced, ctx)
      if reduce_op == tf.distribute.ReduceOp.MEAN:
        reduced = _divide(reduced, group_size)
      return tf.cast(reduced, dtype)
    return finish

  def _run(self, entry, buffers, collectives, finish, watched=False, order=None,
           sharded=False):
    return algorithms.run(entry.algorithm, buffers, collectives, finish=finish,
                          root=entry.index, watched=watched, order=order, sharded=sharded)

  # --- planning ----------------------------------------------------------------------

  # What this topology runs: the algorithms "auto" chooses from, the requested names
  # that mean another algorithm here (with the note logged and put in the plan), and
  # the algorithm for packs of unknown size (no size agreement needed).
  _algorithms = algorithms.LOCAL_ALGORITHMS
  _same_as = {"hierarchical": ("reduce_to_one", (
      "hierarchical on one worker is reduce_to_one: reduce in the worker, nothing to "
      "cross, broadcast in the worker"))}
  _unknown_size_algorithm = "reduce_to_one"

  def _local_algorithm(self):
    """The algorithm to run here, with the reason if it differs from the request."""
    algorithm = self._options.algorithm
    return self._same_as.get(algorithm, (algorithm, ""))

  def cost_model(self, devices) -> cost_lib.CostModel:
    """The cost model for `devices`: given, or calibrated once and kept."""
    if self._given_cost_model is not None:
      return self._given_cost_model
    key = self._cost_model_key(devices)
    with _COST_MODELS_LOCK:
      if key not in self._cost_models:
        devices = key[0]
        logging.info("tf_fusion: all-reduce cost model for %d worker(s) x %d devices: "
                     "%s (once per process; cost_model_file= keeps it across runs).",
                     self._group_size(devices) // len(devices), len(devices),
                     f"from {self._options.cost_model_file} or measured"
                     if self._options.cost_model_file else "measuring")
        model = autotune.load_or_calibrate(
            self._options.cost_model_file, devices, self._algorithms,
            timeout_seconds=self._options.timeout_seconds,
            group_size=self._group_size(devices))
        logging.info("tf_fusion: cost model: %s.", model.summary())
        self._cost_models[key] = model
      return self._cost_models[key]

  def _cost_model_key(self, devices):
    devices = algorithms.canonical_devices(devices)
    return (devices, self._group_size(devices), self._algorithms,
            self._options.cost_model_file)

  def make_plan(self, specs, devices, replica_launch=False, max_pack_bytes=None,
                timeout_seconds=None) -> tuple:
    """Packs, algorithms and sizes for tensors of `specs` on `devices` (no ops built).

    `replica_launch`: for the no-merge-call path, where each replica launches its own
    collectives: every pack runs the ring. `max_pack_bytes`: a cap on the pack size
    (a call's bytes_per_pack). `timeout_seconds`: for the collectives planning runs
    across workers (a call's timeout).
    """
    del timeout_seconds   # one worker: planning runs no collective of its own
    opts = self._options
    algorithm, note = self._local_algorithm()
    if replica_launch:
      algorithm, note = "ring", _REPLICA_LAUNCH_NOTE
    if note:
      self._warn_once(f"tf_fusion: {note}")
    needs_model = algorithm == "auto" or opts.pack_bytes is None
    model = self.cost_model(devices) if needs_model else self._given_cost_model
    pack_bytes, first_pack_bytes = opts.pack_bytes, opts.first_pack_bytes
    if pack_bytes is None:
      pack_bytes, first_pack_bytes = self._autotune(specs, devices, model, algorithm,
                                                    note, measure=not replica_launch)
      if (pack_bytes, first_pack_bytes) not in self._warned:
        self._warned.add((pack_bytes, first_pack_bytes))
        logging.info("tf_fusion autotune (%s): pack_bytes=%d, first_pack_bytes=%d (%s)",
                     opts.autotune, pack_bytes, first_pack_bytes, model.description)
    if max_pack_bytes:
      pack_bytes = min(pack_bytes or max_pack_bytes, max_pack_bytes)
      first_pack_bytes = min(first_pack_bytes, max_pack_bytes)
    plan = self._plan(specs, pack_bytes, first_pack_bytes, model, algorithm, note,
                      unknown_size_algorithm="ring" if replica_launch else None)
    if not tf.executing_eagerly():
      logging.info("tf_fusion plan:\n%s", stats.summarize(plan))
    return plan

  def _plan(self, specs, pack_bytes, first_pack_bytes, model, algorithm, note,
            unknown_size_algorithm=None) -> tuple:
    wire = self._compressor.wire_dtype
    packs = packing.plan_packs(specs, pack_bytes, first_pack_bytes)
    plan = []
    for index, (p, alg, seconds) in enumerate(
        algorithms.assign(packs, specs, wire, algorithm, model,
                          unknown_size_algorithm=(unknown_size_algorithm
                                                  or self._unknown_size_algorithm))):
      plan.append(stats.PackPlan(
          index=index, dtype=p.dtype, tensor_count=len(p.indices), bytes=p.nbytes,
          algorithm=alg, wire_dtype=wire(p.dtype),
          wire_bytes=algorithms.wire_nbytes(p, specs, wire),
          tensor_indices=p.indices, predicted_seconds=seconds, note=note))
    return tuple(plan)

  def _autotune(self, specs, devices, model, algorithm, note, measure=True):
    """(pack_bytes, first_pack_bytes) for pack_bytes=None: predicted by the cost model,
    or, under autotune="measure", the fastest of the candidates timed on this very
    gradient list (once; kept in the cost model and its file)."""
    wire, unknown = self._compressor.wire_dtype, self._unknown_size_algorithm
    opts = self._options
    if not measure or opts.autotune == "model" or any(
        packing.tensor_nbytes(*spec) is None for spec in specs):
      return autotune.choose(specs, wire, model, algorithm, opts.backward_seconds,
                             unknown_size_algorithm=unknown)[:2]
    key = autotune.list_key(specs, algorithm, opts.compression)
    collectives = algorithms.Collectives.get(devices, self._group_size(devices),
                                             opts.timeout_seconds)
    if key in self._agreed:   # decided in this process: no collective on a retrace
      return tuple(model.tuned[key][:2])
    known = key in model.tuned
    if collectives.num_workers > 1:   # all workers must measure, or none
      known = collectives.sum_across_workers([float(known)])[0] == collectives.num_workers
    if known:
      self._agreed.add(key)
      return tuple(model.tuned[key][:2])
    candidates = autotune.candidates(specs, wire, model, algorithm, opts.backward_seconds,
                                     unknown)
    with tf.init_scope():
      buffers = []
      for device in collectives.devices:
        with tf.device(device):
          buffers.append([tf.zeros(shape, dtype) for dtype, shape in specs])

      def time_plan(pack_bytes, first_pack_bytes):
        plan = self._plan(specs, pack_bytes, first_pack_bytes, model, algorithm, note)
        fn = tf.function(functools.partial(self._reduce_dense, tf.distribute.ReduceOp.SUM,
                                           collectives.devices, plan))
        with _explain_collective_errors(self):
          return float(np.median(cost_lib.time_calls(
              lambda: fn(buffers), repeats=3, warmup=2)[1]))

      across = None
      if collectives.num_workers > 1:   # the same choice everywhere
        across = lambda s: collectives.sum_across_workers(s) / collectives.num_workers
      best, seconds = autotune.measure(candidates, time_plan, across)
    logging.info("tf_fusion autotune measured %s: %s", key, ", ".join(
        f"{p}/{f}: {1e3 * t:.1f} ms" for (p, f), t in zip(candidates, seconds)))
    model = dataclasses.replace(model, tuned={**model.tuned, key: [
        candidates[best][0], candidates[best][1], seconds[best]]})
    self._agreed.add(key)
    if self._given_cost_model is None:
      self._cost_models[self._cost_model_key(devices)] = model
      if opts.cost_model_file:
        autotune.save(model, opts.cost_model_file)
    else:
      self._given_cost_model = model
    return candidates[best]


_REPLICA_LAUNCH_NOTE = ("no merge_call here (a cond or loop in the replica function, or "
                        "XLA): each replica launches its own collectives, so every pack "
                        "runs the ring")


def _reduce_unfused(launcher, value, reduce_op, group_size):
  """One replica's all-reduce of a value that is not packed (sparse or integer)."""
  if isinstance(value, tf.IndexedSlices):
    reduced = launcher.all_reduce_indexed_slices(value)
    if reduce_op == tf.distribute.ReduceOp.MEAN:
      reduced = tf.IndexedSlices(_divide(reduced.values, group_size), reduced.indices,
                                 reduced.dense_shape)
    return reduced
  reduced = launcher.all_reduce(value)
  if reduce_op == tf.distribute.ReduceOp.MEAN:
    reduced = _divide(reduced, group_size)
  return reduced


def _unscaled(parts, scales, like, divisor=1):
  """Each reduced tensor divided by its range scale (exact: a power of two) and by
  `divisor` (MEAN's group size), back in its own dtype; `parts` unchanged when the pack
  was not range-scaled."""
  if scales is None:
    return parts
  return compression_lib.scale_from_wire(parts, 1.0 / (scales * float(divisor)), like)


def _divisor(reduce_op, group_size):
  """What a reduced sum is divided by: the group size for MEAN, else 1."""
  return group_size if reduce_op == tf.distribute.ReduceOp.MEAN else 1


def _divide(tensor, n):
  """tensor / n in at least FP32, returned in tensor's dtype."""
  if tensor.dtype.is_integer:
    return tensor // tf.cast(n, tensor.dtype)
  if tensor.dtype.size < 4:
    return tf.cast(tf.cast(tensor, tf.float32) / n, tensor.dtype)
  return tensor / tf.cast(n, tensor.dtype)


class MultiWorkerFusedAllReduce(FusedAllReduce):
  """FusedAllReduce across the workers of a MultiWorkerMirroredStrategy.

  Packs as FusedAllReduce does; each pack is reduced by `ring` (TF's collective over all
  devices of all workers) or `hierarchical` (reduce in the worker, all-reduce among one
  device per worker, broadcast in the worker), or per pack by the cost model under
  `auto`. Everything it cannot fuse (sparse, integer, other destinations, values that
  are not per-replica) goes to TF's own CollectiveAllReduce of the strategy, which also
  crosses workers: no reduction stays local.

  Built by `tf_fusion.multi_worker_strategy`; not meant to be constructed directly.

  Args:
    options: a FusionOptions.
    tf_ops: the strategy's own CollectiveAllReduce (fallback, gather, no-merge-call).
    num_workers: workers in the cluster (each with the same number of devices).
    cost_model: as for FusedAllReduce; calibrated across workers when not given.
    worker_index: this worker's place in the cluster, 0..num_workers-1 (the strategy's
      id in cluster), to name the workers whose plan differs.
  """

  _algorithms = algorithms.MULTI_WORKER_ALGORITHMS
  _same_as = {"reduce_to_one": ("hierarchical", (
      "reduce_to_one across workers is hierarchical: reduce to one device per worker, "
      "all-reduce those, broadcast"))}
  _unknown_size_algorithm = "hierarchical"

  def __init__(self, options, tf_ops, num_workers, cost_model=None, worker_index=None):
    super().__init__(options, cost_model=cost_model)
    self._worker_index = worker_index
    if not isinstance(tf_ops, tf_cross_device_ops.CollectiveAllReduce):
      raise TypeError(f"tf_ops must be TF's CollectiveAllReduce, got {type(tf_ops)}.")
    self._tf_ops = tf_ops
    self._fallback = tf_ops
    self._num_workers = int(num_workers)
    self._checked = set()
    self._checked_plans = set()

  @property
  def num_workers(self):
    return self._num_workers

  @property
  def tf_ops(self):
    """TF's CollectiveAllReduce of the strategy: its groups and communication options,
    and the reduction of values tf_fusion does not pack."""
    return self._tf_ops

  @property
  def _num_between_graph_workers(self):
    # > 1 keeps CrossDeviceOps.reduce/batch_reduce from skipping the reduction when a
    # worker has a single device.
    return self._num_workers

  def _group_size(self, devices):
    return len(devices) * self._num_workers

  def _local_devices(self):
    # The strategy's local devices, known at construction: also right outside the
    # strategy's scope (strategy.reduce), where value.device can name other devices.
    return algorithms.canonical_devices(self._tf_ops._devices)  # pylint: disable=protected-access

  def _devices_for(self, values):
    devices = self._local_devices()
    if all(len(v.values) == len(devices) for v in values):
      return devices
    return super()._devices_for(values)

  def make_plan(self, specs, devices, replica_launch=False, max_pack_bytes=None,
                timeout_seconds=None) -> tuple:
    self._check_same_gradients(specs, devices, timeout_seconds)
    plan = super().make_plan(specs, devices, replica_launch=replica_launch,
                             max_pack_bytes=max_pack_bytes)
    self._check_same_plan(plan, devices, timeout_seconds)
    return plan

  def _check_same_plan(self, plan, devices, timeout_seconds=None):
    """Raises on every worker, naming what differs and where, if the workers' plans
    differ: packs, their order, algorithms, wire dtypes or group sizes.

    Different plans launch mismatched collectives: a hang with no name, or, when the
    sizes happen to match, silently wrong sums. Options, an environment variable or a
    cost model file that differ between workers all end here. Each worker writes the
    hashes of its plan's parts in its own row of a table that one sum across workers
    hands to everyone; once per distinct plan, while tracing.
    """
    parts = _plan_parts(plan, self._group_size(devices), len(devices))
    key = tuple(parts.values())
    if key in self._checked_plans:
      return
    rank = self._rank()
    timeout_seconds = timeout_seconds or self._options.timeout_seconds
    collectives = algorithms.Collectives.get(devices, self._group_size(devices),
                                             timeout_seconds)
    with _explain_collective_errors(self, timeout_seconds):
      differences = collectives.differences_across_workers(parts, rank)
    if differences:
      raise ValueError(
          f"tf_fusion: the workers would run different all-reduce plans: "
          f"{'; '.join(differences)}. This is worker {rank}, whose plan is:\n"
          f"{stats.summarize(plan)}\nGive every worker the same FusionOptions, "
          "TF_FUSION_* environment variables and cost model file.")
    self._checked_plans.add(key)

  def _rank(self):
    if self._worker_index is not None:
      return self._worker_index
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    if resolver is None or resolver.task_id is None:
      raise ValueError("tf_fusion: cannot tell this worker's index; pass worker_index.")
    return resolver.task_id

  def _check_same_gradients(self, specs, devices, timeout_seconds=None):
    """Raises on every worker if the workers' tensor lists differ (count, shape, dtype).

    Mismatched lists would launch mismatched collectives: a hang or a shape error deep in
    TF. The signature (count and two hashes of the dtypes and shapes) is summed across
    workers once per distinct list, eagerly, while the step is being traced: it costs no
    time per step. Equal lists give exactly num_workers times one's own signature.
    """
    key = tuple((dtype.name, tuple(tf.TensorShape(shape).as_list())) for dtype, shape in specs)
    if key in self._checked:
      return
    text = repr(key).encode()
    mine = np.array([len(key), zlib.crc32(text), zlib.adler32(text)], np.float64)
    timeout_seconds = timeout_seconds or self._options.timeout_seconds
    collectives = algorithms.Collectives.get(
        devices, self._group_size(devices), timeout_seconds)
    with _explain_collective_errors(self, timeout_seconds):
      total = collectives.sum_across_workers(mine)
    if total[0] != mine[0] * self._num_workers:
      raise ValueError(
          f"tf_fusion: the workers all-reduce different numbers of tensors (this worker "
          f"{len(key)}, mean over {self._num_workers} workers {total[0] / self._num_workers:g})."
          " Every worker must build the same model and optimizer.")
    if np.any(total[1:] != mine[1:] * self._num_workers):
      raise ValueError(
          f"tf_fusion: the workers all-reduce {len(key)} tensors each, but their shapes or "
          f"dtypes differ (this worker: {_describe(key)}). Every worker must build the same "
          "model and optimizer.")
    self._checked.add(key)

  def _gather(self, per_replica_value, destinations, axis, options=None):
    return self._tf_ops._gather(per_replica_value, destinations, axis, options)  # pylint: disable=protected-access


def _plan_parts(plan, group_size, local_devices):
  """Hashes of the parts of a plan that every worker must share (float64-exact)."""
  def crc(value):
    return float(zlib.crc32(repr(value).encode()))
  return {
      "number of packs": float(len(plan)),
      "tensors in each pack and their order": crc([e.tensor_indices for e in plan]),
      "algorithms": crc([e.algorithm for e in plan]),
      "wire dtypes": crc([e.wire_dtype.name if e.wire_dtype else None for e in plan]),
      "pack sizes": crc([e.wire_bytes for e in plan]),
      "group sizes": crc((group_size, local_devices)),
  }


def _describe(key, limit=6):
  shown = ", ".join(f"{d}{list(s)}" for d, s in key[:limit])
  return shown + (f", ... ({len(key) - limit} more)" if len(key) > limit else "")


class _Call(NamedTuple):
  """One call's settings (from its CommunicationOptions over FusionOptions)."""
  timeout_seconds: Optional[float]
  max_pack_bytes: Optional[int]
  implementation: str   # "auto", "ring" or "nccl"


def _on_device(device, tensor):
  with tf.device(device):
    return tf.identity(tensor)


@contextlib.contextmanager
def _explain_collective_errors(ops, timeout_seconds=None):
  """Re-raises a collective's timeout or abort with what it most likely means.

  TF reports either the dead task (when its heartbeats stop first) or only "Collective
  has timed out" (when timeout_seconds runs out first); the second names nothing.
  """
  try:
    yield
  except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
          tf.errors.AbortedError) as e:
    workers = ops._num_between_graph_workers  # pylint: disable=protected-access
    raise type(e)(e.node_def, e.op, (
        f"tf_fusion: an all-reduce across {workers} worker(s) did not complete "
        f"(timeout_seconds={timeout_seconds or ops.options.timeout_seconds}): a peer "
        "worker died, hangs, "
        f"or runs a different program. TensorFlow said: {e.message}")) from None
