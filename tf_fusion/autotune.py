"""Autotuning: the fusion thresholds from the calibrated cost model, and a cost model
the user can keep in a file.

With `FusionOptions(pack_bytes=None)` nobody guesses a threshold. `choose` tries every
(pack_bytes, first_pack_bytes) pair of a grid, gives each pack its algorithm as the
hybrid assignment does, and keeps the pair with the lowest predicted *exposed*
communication time:

- without `backward_seconds`, communication is assumed to start when
  back-propagation ends, and the exposed time is the sum of the packs' times;
- with `backward_seconds` (the backward pass of one step, e.g. read from a profile,
  tools/profile_step.py), gradients are assumed to appear at a uniform rate in bytes
  over the backward pass, in back-propagation order. Packs are reduced one after the
  other (our launcher orders the collectives), each when its last tensor exists and
  the previous pack is done; the exposed time is what runs past the backward pass.
  This is the timing model Jia et al. 2018 used to split layers into fused segments.

`load_or_calibrate` keeps the measured constants in `FusionOptions.cost_model_file`:
the first run calibrates (a few seconds) and writes the file; later runs on the same
topology read it. With several workers, they first agree (one small collective)
whether every one of them has a usable file; if any has none, all calibrate together,
and in either case the constants are averaged across workers, so every worker plans
the same packs (different plans would hang).

References:
  Jia et al. 2018, arXiv:1807.11205, section 4 (tensor fusion from a timing model).
"""

import dataclasses
import zlib
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_fusion import calibration
from tf_fusion import collectives as collectives_lib
from tf_fusion import cost_model
from tf_fusion import packing
from tf_fusion import plans

PACK_BYTES_GRID = (0,) + tuple(1 << s for s in range(16, 29))   # 0, 64 KiB ... 256 MiB
FIRST_PACK_BYTES_GRID = (0, 256 << 10, 1 << 20, 4 << 20)


def exposed_seconds(entries, specs, backward_seconds: Optional[float] = None) -> float:
  """Predicted communication time not hidden behind back-propagation.

  Args:
    entries: (pack, algorithm, predicted seconds) in launch order, from
      plans.assign.
    specs: the (dtype, shape) list the packs index into, in forward order.
    backward_seconds: the backward pass's duration; None or 0: no overlap.
  """
  if not backward_seconds:
    return sum(s or 0.0 for _, _, s in entries)
  sizes = [packing.tensor_nbytes(*spec) or 0 for spec in specs]
  total = float(sum(sizes)) or 1.0
  # Bytes produced before tensor i is done, in back-propagation order (last first).
  done_at, produced = [0.0] * len(specs), 0.0
  for i in reversed(range(len(specs))):
    produced += sizes[i]
    done_at[i] = produced / total
  clock = 0.0
  for pack, _, seconds in entries:
    ready = backward_seconds * max(done_at[i] for i in pack.indices)
    clock = max(clock, ready) + (seconds or 0.0)
  return max(clock - backward_seconds, 0.0)


def choose(specs, wire_dtype: Callable, model: cost_model.CostModel, algorithm: str,
           backward_seconds: Optional[float] = None,
           unknown_size_algorithm: str = "reduce_to_one",
           pack_grid: Sequence[int] = PACK_BYTES_GRID,
           first_grid: Sequence[int] = FIRST_PACK_BYTES_GRID) -> Tuple[int, int, float]:
  """The (pack_bytes, first_pack_bytes) of the grids with the least exposed time.

  Near-ties (within cost_model.MARGIN of the least, or within a microsecond: nothing
  exposed either way) go to the largest thresholds: fewer launches when the model
  cannot tell, and a choice that timing noise cannot move.

  Returns:
    (pack_bytes, first_pack_bytes, predicted exposed seconds).
  """
  tried = []
  for pack_bytes in pack_grid:
    for first in first_grid:
      if first and pack_bytes and first >= pack_bytes:
        continue   # the same plan as first=0
      packs = packing.plan_packs(specs, pack_bytes, first)
      entries = plans.assign(packs, specs, wire_dtype, algorithm, model,
                             unknown_size_algorithm=unknown_size_algorithm)
      tried.append((exposed_seconds(entries, specs, backward_seconds), pack_bytes, first))
  least = min(seconds for seconds, _, _ in tried)
  close = [t for t in tried
           if t[0] <= least + 1e-6 or not cost_model.clearly_faster(least, t[0])]
  seconds, pack_bytes, first = max(close, key=lambda t: (_as_size(t[1]), _as_size(t[2])))
  return pack_bytes, first, seconds


MEASURED_PACK_BYTES = (0,) + tuple(1 << s for s in range(16, 29, 2))  # 0, 64 KiB x 4^k


def candidates(specs, wire_dtype, model, algorithm, backward_seconds=None,
               unknown_size_algorithm="reduce_to_one"):
  """The thresholds the "measure" autotuner times: (pack_bytes, 0) for 0 and 64 KiB ...
  256 MiB by 4x, and the model's own pick; one per distinct plan, in that order."""
  pairs = [choose(specs, wire_dtype, model, algorithm, backward_seconds,
                  unknown_size_algorithm)[:2]]
  pairs += [(p, 0) for p in MEASURED_PACK_BYTES]
  out, seen = [], set()
  for pack_bytes, first in pairs:
    plan = tuple((p.indices, alg) for p, alg, _ in plans.assign(
        packing.plan_packs(specs, pack_bytes, first), specs, wire_dtype, algorithm, model,
        unknown_size_algorithm=unknown_size_algorithm))
    if plan not in seen:
      seen.add(plan)
      out.append((pack_bytes, first))
  return out


def measure(candidates, time_plan: Callable[[int, int], float],
            across: Optional[Callable] = None):
  """(index of the one kept, seconds of each): every (pack_bytes, first_pack_bytes)
  candidate timed once by `time_plan`, which builds that plan and times it on the real
  gradient list. The first candidate (the model's pick) is kept unless the fastest
  beats it by cost_model.MARGIN, so that noise between near-equal plans does not
  decide. With several workers, `across` averages the times over them so that every
  worker keeps the same candidate (else their plans, and collectives, differ)."""
  seconds = [float(time_plan(pack_bytes, first)) for pack_bytes, first in candidates]
  if across is not None:
    seconds = [float(s) for s in across(np.array(seconds, np.float64))]
  fastest = int(np.argmin(seconds))
  return (fastest if cost_model.clearly_faster(seconds[fastest], seconds[0]) else 0), seconds


def list_key(specs, algorithm, compression) -> str:
  """A readable key of a gradient list and what it is reduced with."""
  text = repr([(tf.as_dtype(d).name, tuple(tf.TensorShape(s).as_list())) for d, s in specs])
  nbytes = sum(packing.tensor_nbytes(*spec) or 0 for spec in specs)
  return (f"{len(specs)} tensors, {nbytes} B, {algorithm}, {compression}, "
          f"crc {zlib.crc32(text.encode()):08x}")


def _as_size(threshold):
  return float("inf") if threshold == 0 else threshold


def topology(devices: Sequence[str], num_workers: int, algorithm_names) -> str:
  """What a cost model is valid for: worker count, local devices, algorithms, and the
  TensorFlow version (its collectives and kernels make the timings)."""
  kinds = sorted({d.split("/device:")[-1].rsplit(":", 1)[0] for d in devices})
  return (f"{num_workers} worker(s) x {len(devices)} {'+'.join(kinds)} device(s); "
          f"algorithms {','.join(sorted(algorithm_names))}; TensorFlow {tf.__version__}")


def load_or_calibrate(path: Optional[str], devices: Sequence[str], algorithm_names,
                      timeout_seconds=None, group_size=None) -> cost_model.CostModel:
  """The cost model from `path` if it fits this topology, else calibrated (and saved).

  Every worker must call this at the same point of the program (see the module doc).
  """
  collectives = collectives_lib.Collectives.get(devices, group_size, timeout_seconds)
  devices = collectives.devices
  want = topology(devices, collectives.num_workers, algorithm_names)
  model = cost_model.read(path, want) if path else None
  if collectives.num_workers > 1:
    have = collectives.sum_across_workers([1.0 if model else 0.0])[0]
    if have < collectives.num_workers:
      model = None
    elif model is not None:
      model = calibration.average_across_workers(collectives, model)
  if model is None:
    model = calibration.calibrate(devices, algorithm_names, timeout_seconds=timeout_seconds,
                                  group_size=group_size)
    model = dataclasses.replace(model, topology=want)
    if path:
      cost_model.write(model, path)
  return model
