"""Calibration: the cost model's constants measured on the devices in use.

`calibrate` times each algorithm on buffers of 4 KiB to 64 MiB and fits
alpha + beta * S per algorithm, keeping the measured points; with several workers the
constants are averaged across workers (`average_across_workers`), so that every worker
plans the same packs. `time_calls` and `wait_for` are the timing primitives the
calibration, the measured autotuner and the benchmarks share.
"""

import dataclasses
import time
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tf_fusion import packing
from tf_fusion.algorithms import LOCAL_ALGORITHMS
from tf_fusion.algorithms import run
from tf_fusion.collectives import Collectives
from tf_fusion.collectives import run_as_graph
from tf_fusion.cost_model import CostModel


def time_calls(fn, repeats, warmup=2):
  """Calls `fn` `warmup` times (the first traces), then `repeats` timed times.

  Each call is timed until the devices are done with it (`wait_for`): GPUs run
  asynchronously, and a call that returns without its results fetched would time the
  enqueue, not the work.

  Returns:
    (seconds of the first call, list of the timed calls' seconds).
  """
  def call():
    wait_for(fn())

  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return first, times


_SYNC = {"devices": True}


def wait_for(result):
  """Blocks until the devices have computed `result` (a nest of tensors).

  TensorFlow's `sync_devices` waits for every device; with remote workers in the
  context it raises, and then each GPU-resident result is fetched instead (CPU results
  are complete when the call returns).
  """
  if _SYNC["devices"]:
    try:
      tf.test.experimental.sync_devices()
      return
    except (tf.errors.InternalError, RuntimeError):
      _SYNC["devices"] = False
  for t in tf.nest.flatten(result):
    if "GPU" in getattr(t, "backing_device", "").upper():
      t.numpy()


def _median_seconds(fn, repeats):
  return float(np.median(time_calls(fn, repeats)[1]))


def _filled(devices, num_elements, value):
  out = []
  for i, device in enumerate(devices):
    with tf.device(device):
      out.append(tf.fill([max(1, num_elements)], float(value + i)))
  return out


def _per_unit_seconds(unit, inputs, low, repeats):
  """(T(3 low) - T(low)) / (2 low) for `unit` applied to independent inputs.

  Timing k and 3k independent units in one tf.function and taking the difference
  cancels the cost of calling the function; distinct inputs keep Grappler from
  merging identical ops.
  """
  def timed(k):
    fn = tf.function(lambda: [unit(x) for x in inputs[:k]])
    return _median_seconds(lambda: run_as_graph(fn), repeats)
  return max(timed(3 * low) - timed(low), 0.0) / (2 * low)


def _fit_line(sizes, seconds):
  """Least-squares alpha + beta * size with both constants kept >= 0."""
  a = np.stack([np.ones(len(sizes)), np.asarray(sizes, np.float64)], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(a, np.asarray(seconds), rcond=None)
  if beta < 0:
    alpha, beta = float(np.mean(seconds)), 0.0
  if alpha < 0:
    beta = float(np.dot(sizes, seconds) / np.dot(sizes, sizes))
    alpha = 0.0
  return float(alpha), float(beta)


def calibrate(devices: Sequence[str],
              algorithms: Sequence[str] = LOCAL_ALGORITHMS,
              sizes: Sequence[int] = (4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20,
                                      16 << 20, 64 << 20),
              repeats: int = 5,
              timeout_seconds: Optional[float] = None,
              group_size: Optional[int] = None) -> CostModel:
  """Measures alpha, beta per algorithm and the packing copy cost on `devices`.

  Each point is the per-collective time of independent float32 all-reduces of one
  size (see `_per_unit_seconds`). Runs eagerly, lifted out of any graph being traced,
  in a few seconds.

  Args:
    devices: the local devices the model is for.
    algorithms: which algorithms to measure.
    sizes: buffer sizes in bytes per device.
    repeats: timed calls per point (the median is used).
    timeout_seconds: collective timeout while measuring.
    group_size: devices of all workers (default: these devices alone). With several
      workers, every worker must call this at the same point of the program: the
      measurements run collectives across workers, and the constants are averaged
      across workers so that every worker plans the same packs and algorithms.

  Returns:
    A CostModel fitted to the measurements.
  """
  collectives = Collectives.get(devices, group_size, timeout_seconds=timeout_seconds)
  devices = collectives.devices
  start = time.perf_counter()
  alpha, beta, points = {}, {}, {}
  with tf.init_scope():
    for algorithm in algorithms:
      per_size = []
      for nbytes in sizes:
        low = 4 if nbytes <= (1 << 20) else 1
        inputs = [_filled(devices, nbytes // 4, j) for j in range(3 * low)]
        # One element of every shard on every device: all the work is needed, little
        # is returned.
        unit = lambda bufs, a=algorithm: [
            shard[0] for o in run(a, bufs, collectives, sharded=True) for shard in o]
        per_size.append(_per_unit_seconds(unit, inputs, low, repeats))
      alpha[algorithm], beta[algorithm] = _fit_line(list(sizes), per_size)
      points[algorithm] = list(zip(sizes, per_size))
    copy_beta = _measure_copy_beta(devices, min(max(sizes), 16 << 20), repeats)
    model = CostModel(alpha, beta, copy_beta, points=points)
    if collectives.num_workers > 1:
      model = average_across_workers(collectives, model)
  elapsed = time.perf_counter() - start
  model = dataclasses.replace(
      model, description=f"calibrated on {collectives.num_workers} worker(s) x "
      f"{len(devices)} devices ({devices[0]} ...) in {elapsed:.1f}s")
  logging.debug("tf_fusion cost model: %s", model.to_json())
  return model


def average_across_workers(collectives, model: CostModel) -> CostModel:
  """The constants' means over workers: bit-identical on every worker afterwards.

  Timings differ from worker to worker; plans built from different models would
  launch different collectives and hang.
  """
  names = sorted(model.alpha)
  with_points = sorted(model.points)
  vector = ([model.alpha[n] for n in names] + [model.beta[n] for n in names]
            + [model.copy_beta] + [t for n in with_points for _, t in model.points[n]])
  summed = list(map(float, collectives.sum_across_workers(vector) / collectives.num_workers))
  k = len(names)
  times = iter(summed[2 * k + 1:])
  return dataclasses.replace(
      model, alpha=dict(zip(names, summed[:k])), beta=dict(zip(names, summed[k:2 * k])),
      copy_beta=summed[2 * k],
      points={n: [(size, next(times)) for size, _ in model.points[n]] for n in with_points})


def _measure_copy_beta(devices, nbytes, repeats, pieces=8):
  """Seconds per byte (per device) to pack `pieces` tensors into a buffer and split it."""
  per_piece = max(1, nbytes // 4 // pieces)
  inputs = [[_filled(devices, per_piece, j * pieces + p) for p in range(pieces)]
            for j in range(3)]

  def unit(sets):
    out = []
    for i, device in enumerate(devices):
      with tf.device(device):
        parts = [s[i] for s in sets]
        out.extend(p[0] for p in packing.unpack(packing.pack(parts), parts))
    return out

  return _per_unit_seconds(unit, inputs, 1, repeats) / (per_piece * pieces * 4)
