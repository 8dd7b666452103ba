"""Planning one batch reduction: thresholds, cost model and plan, decided once per trace.

A Planner holds what planning needs across calls of one FusedAllReduce: its options,
its topology (one worker or several), the cost model (given, or calibrated once per
process and devices and shared by every FusedAllReduce: calibration runs seconds of
collectives, and notebooks, sweeps and test suites build many strategies over the same
devices), and the thresholds the measured autotuner has settled on. `make_plan` turns a
gradient list into a plan (plans.build_plan); it builds no op of the reduction itself.
"""

import copy
import dataclasses
import functools
import threading
from typing import Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from tf_fusion import autotune
from tf_fusion import calibration
from tf_fusion import cost_model as cost_model_lib
from tf_fusion import packing
from tf_fusion import plans
from tf_fusion import sparse
from tf_fusion import stats
from tf_fusion._internal import tf as tf_internal
from tf_fusion.collectives import Collectives
from tf_fusion.collectives import canonical_devices
from tf_fusion.collectives import explain_errors
from tf_fusion.collectives import run_as_graph
from tf_fusion.compression import Compression
from tf_fusion.cost_model import CostModel
from tf_fusion.options import FusionOptions

# Cost models of this process, by what the timings depend on (devices, group,
# algorithms) and the file they are kept in.
_COST_MODELS = {}
_COST_MODELS_LOCK = threading.RLock()


class Planner:
  """The planning state of one FusedAllReduce.

  Args:
    options: the FusionOptions.
    topology: a plans.Topology.
    cost_model: a CostModel to use instead of calibrating (autotune="measure" adds its
      choices to a copy, which `cost_model()` then returns).
  """

  def __init__(self, options: FusionOptions, topology: plans.Topology,
               cost_model: Optional[CostModel] = None):
    self.options = options
    self.topology = topology
    self.wire_dtype = Compression.get(options.compression).wire_dtype
    self.given_cost_model = cost_model
    self._tuned_given = None      # the given model with the measured thresholds added
    self.cost_models = _COST_MODELS
    self._agreed = set()   # autotune keys every worker has agreed on in this process
    self._logged = set()   # messages logged once

  def copy(self) -> "Planner":
    """A planner sharing the settings, cost models and agreed thresholds, with its own
    once-only log (for a deep-copied strategy)."""
    new = copy.copy(self)
    new._logged = set()
    return new

  def warn_once(self, message: str) -> None:
    if message not in self._logged:
      self._logged.add(message)
      logging.warning("%s.", message)

  def cost_model(self, devices) -> CostModel:
    """The cost model for `devices`: given, or calibrated once and kept; under op
    determinism (`tf.config.experimental.enable_op_determinism()`) the nominal one,
    with no timing and no file read, so that every run makes the same plan."""
    if self.given_cost_model is not None:
      return self._tuned_given or self.given_cost_model
    key = self._cost_model_key(devices)
    if tf_internal.op_determinism():
      self.warn_once(
          "tf_fusion: op determinism is on: plans come from the nominal cost model "
          "(no calibration, no cost_model_file, autotune='measure' predicts instead), "
          "the same in every run; see docs/autotune.md")
      return cost_model_lib.nominal(self.topology.algorithms, len(key[0]),
                                    self.topology.num_workers)
    with _COST_MODELS_LOCK:
      if key not in self.cost_models:
        devices, group_size = key[0], key[1]
        opts = self.options
        logging.info("tf_fusion: all-reduce cost model for %d worker(s) x %d devices: "
                     "%s (once per process; cost_model_file= keeps it across runs).",
                     group_size // len(devices), len(devices),
                     f"from {opts.cost_model_file} or measured"
                     if opts.cost_model_file else "measuring")
        model = autotune.load_or_calibrate(
            opts.cost_model_file, devices, self.topology.algorithms,
            timeout_seconds=opts.timeout_seconds, group_size=group_size)
        logging.info("tf_fusion: cost model: %s.", model.summary())
        self.cost_models[key] = model
      return self.cost_models[key]

  def _cost_model_key(self, devices):
    devices = canonical_devices(devices)
    return (devices, self.topology.group_size(devices), self.topology.algorithms,
            self.options.cost_model_file)

  def sparse_model(self, devices) -> Optional[CostModel]:
    """The cost model FusionOptions.sparse="auto" decides with: the one planning uses
    anyway (algorithm "auto" or pack_bytes=None: calibrated), else the given one, else
    None (the bytes decide)."""
    algorithm, _ = self.topology.resolve(self.options.algorithm)
    if algorithm == "auto" or self.options.pack_bytes is None:
      return self.cost_model(devices)
    return self.given_cost_model

  def arrangement(self, per_device, devices, replica_launch=False
                  ) -> "sparse.Arrangement":
    """Which IndexedSlices of a batch (`per_device`: one list per local device) are
    gathered and which densified, under FusionOptions.sparse."""
    return sparse.Arrangement.of(
        per_device, self.options.sparse, self.topology.group_size(devices),
        self.wire_dtype, lambda: self.sparse_model(devices),
        self._gathers(replica_launch))

  def _gathers(self, replica_launch):
    """The ways a gather may run: the ring all-gather, and on one worker with one launch
    for every device also to one device and back; as the algorithm option says (ring,
    reduce_to_one), or both for "auto" to choose from by the cost model."""
    algorithm, _ = self.topology.resolve(self.options.algorithm)
    if self.topology.multi_worker or replica_launch or algorithm == "ring":
      return (sparse.GATHER,)
    if algorithm == "reduce_to_one":
      return (sparse.GATHER_TO_ONE,)
    return (sparse.GATHER, sparse.GATHER_TO_ONE)

  def make_plan(self, specs, devices, reduce_fn: Optional[Callable] = None,
                replica_launch: bool = False, max_pack_bytes: Optional[int] = None,
                gathered=()) -> tuple:
    """The plan for tensors of `specs` on `devices`.

    Args:
      specs: (dtype, shape) of each tensor, forward order.
      devices: this worker's devices.
      reduce_fn: reduce_fn(plan, devices, per_device) builds the reduction of a plan,
        for the measured autotuner to time (autotune="measure" with pack_bytes=None).
      replica_launch: each replica launches its own collectives (no merge_call):
        every pack runs the ring.
      max_pack_bytes: a cap on the pack size (a call's bytes_per_pack).
      gathered: (sparse.SparseSpec, reason) of IndexedSlices to gather, at positions
        len(specs), len(specs) + 1, ...: their packs go after the dense ones.
    """
    opts = self.options
    algorithm, note = self.topology.resolve(opts.algorithm)
    if replica_launch:
      algorithm, note = "ring", plans.REPLICA_LAUNCH_NOTE
    if note:
      self.warn_once(f"tf_fusion: {note}")
    needs_model = algorithm == "auto" or opts.pack_bytes is None
    model = self.cost_model(devices) if needs_model else self.given_cost_model
    pack_bytes, first_pack_bytes = opts.pack_bytes, opts.first_pack_bytes
    if pack_bytes is None:
      pack_bytes, first_pack_bytes = self._thresholds(
          specs, devices, model, algorithm, note,
          reduce_fn=None if replica_launch else reduce_fn)
      self._log_once(f"tf_fusion autotune ({opts.autotune}): pack_bytes={pack_bytes}, "
                     f"first_pack_bytes={first_pack_bytes} ({model.description})")
    if max_pack_bytes:
      pack_bytes = min(pack_bytes or max_pack_bytes, max_pack_bytes)
      first_pack_bytes = min(first_pack_bytes, max_pack_bytes)
    plan = self._build(specs, pack_bytes, first_pack_bytes, model, algorithm, note,
                       "ring" if replica_launch else None)
    if gathered:
      plan += sparse.gather_plan([s for s, _ in gathered], len(specs), len(plan),
                                 [r for _, r in gathered], model,
                                 self.topology.group_size(devices),
                                 self._gathers(replica_launch))
    if not tf.executing_eagerly():
      logging.info("tf_fusion plan:\n%s", stats.summarize(plan))
    return plan

  def _log_once(self, message):
    if message not in self._logged:
      self._logged.add(message)
      logging.info("%s", message)

  def _build(self, specs, pack_bytes, first_pack_bytes, model, algorithm, note,
             unknown_size_algorithm=None):
    return plans.build_plan(
        specs, pack_bytes, first_pack_bytes, self.wire_dtype, algorithm, model, note,
        unknown_size_algorithm=(unknown_size_algorithm
                                or self.topology.unknown_size_algorithm))

  def _thresholds(self, specs, devices, model, algorithm, note, reduce_fn=None):
    """(pack_bytes, first_pack_bytes) for pack_bytes=None: predicted by the cost model,
    or, under autotune="measure", the fastest of the candidates timed on this very
    gradient list (once; kept in the cost model and its file)."""
    opts = self.options
    unknown = self.topology.unknown_size_algorithm
    if reduce_fn is None or opts.autotune == "model" or tf_internal.op_determinism() or any(
        packing.tensor_nbytes(*spec) is None for spec in specs):
      return autotune.choose(specs, self.wire_dtype, model, algorithm,
                             opts.backward_seconds, unknown_size_algorithm=unknown)[:2]
    key = autotune.list_key(specs, algorithm, opts.compression)
    collectives = Collectives.get(devices, self.topology.group_size(devices),
                                  opts.timeout_seconds)
    if key in self._agreed:   # decided in this process: no collective on a retrace
      return tuple(model.tuned[key][:2])
    known = key in model.tuned
    if collectives.num_workers > 1:   # all workers must measure, or none
      known = collectives.sum_across_workers([float(known)])[0] == collectives.num_workers
    if not known:
      model = self._measure(key, specs, collectives, model, algorithm, note, reduce_fn)
    self._agreed.add(key)
    return tuple(model.tuned[key][:2])

  def _measure(self, key, specs, collectives, model, algorithm, note, reduce_fn):
    """Times every candidate threshold on zeros of `specs`; returns the cost model with
    the fastest one recorded under `key` (and keeps it: cache, file, or given)."""
    opts = self.options
    candidates = autotune.candidates(specs, self.wire_dtype, model, algorithm,
                                     opts.backward_seconds,
                                     self.topology.unknown_size_algorithm)
    with tf.init_scope():
      buffers = []
      for device in collectives.devices:
        with tf.device(device):
          buffers.append([tf.zeros(shape, dtype) for dtype, shape in specs])

      def time_plan(pack_bytes, first_pack_bytes):
        plan = self._build(specs, pack_bytes, first_pack_bytes, model, algorithm, note)
        fn = tf.function(functools.partial(reduce_fn, plan, collectives.devices))
        with explain_errors(collectives.num_workers, opts.timeout_seconds):
          return float(np.median(calibration.time_calls(
              lambda: run_as_graph(fn, buffers), repeats=3, warmup=2)[1]))

      across = None
      if collectives.num_workers > 1:   # the same choice everywhere
        across = lambda s: collectives.sum_across_workers(s) / collectives.num_workers
      best, seconds = autotune.measure(candidates, time_plan, across)
    logging.info("tf_fusion autotune measured %s: %s", key, ", ".join(
        f"{p}/{f}: {1e3 * t:.1f} ms" for (p, f), t in zip(candidates, seconds)))
    model = dataclasses.replace(model, tuned={**model.tuned, key: [
        candidates[best][0], candidates[best][1], seconds[best]]})
    if self.given_cost_model is None:
      self.cost_models[self._cost_model_key(collectives.devices)] = model
      if opts.cost_model_file:
        cost_model_lib.write(model, opts.cost_model_file)
    else:
      self._tuned_given = model
    return model
