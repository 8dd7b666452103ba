"""The cost model of one pack's all-reduce, as data: predict, save, load.

alpha + beta * S per algorithm for a pack of S bytes (the alpha-beta model of Thakur et
al. 2005), with the measured points that `CostModel.seconds` interpolates; packing a
pack of several tensors costs copy_beta * S more. The constants are measured by
calibration.calibrate on the devices in use, never guessed (`read` and `write` keep
them in a file), except in `nominal`: the
model of a run that must not depend on any timing (op determinism), whose constants are
round textbook figures. This module depends on no other part of tf_fusion.

Repeatable decisions: a choice made from two predictions within MARGIN of each other
(launch-bound tensors cost the same whichever way they go, and two measurements of the
same cost differ by noise) is not left to the timing: it goes to a fixed rule, stated
where each choice is made (here: the algorithm earlier in PREFERENCE).
"""

import dataclasses
import json
import os
import tempfile
from typing import Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

# One prediction must beat another by this fraction for the timing to decide.
MARGIN = 0.15
# Near-ties between algorithms: the bandwidth-optimal ring first.
PREFERENCE = ("ring", "hierarchical", "reduce_to_one")


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Predicted seconds for one pack: alpha[alg] + beta[alg] * bytes (+ packing copies).

  Attributes:
    alpha: seconds per collective launch, per algorithm.
    beta: seconds per byte (per device's buffer), per algorithm.
    copy_beta: seconds per byte to pack (concat) and unpack (split) a buffer on
      every device.
    description: where the constants come from (devices, date).
    topology: what the constants are valid for (autotune.topology); a cost model file
      of another topology is not used.
    points: the measured (bytes, seconds) per algorithm that alpha and beta summarise.
      When present, `seconds` interpolates them (made non-decreasing) instead of the
      line: on CPUs and GPUs alike the per-byte cost of very large buffers rises
      (caches, memory bandwidth), which a straight line cannot show and which decides
      whether a 16 MiB or a 100 MiB pack is faster. Past the largest point the last
      segment's slope is extended.
    tuned: thresholds the "measure" autotuner chose, by gradient-list key
      (autotune.list_key): [pack_bytes, first_pack_bytes, seconds].

  Example:
    >>> m = CostModel({"ring": 1e-4, "reduce_to_one": 2e-5},
    ...               {"ring": 1e-9, "reduce_to_one": 4e-10}, copy_beta=3e-10)
    >>> m.best(1 << 20)
    'reduce_to_one'
    >>> m.best(0)      # 100 us against 20 us
    'reduce_to_one'
    >>> m.best(80_000, ["ring", "reduce_to_one"])   # 180 us against 52 us
    'reduce_to_one'
  """

  alpha: Mapping[str, float]
  beta: Mapping[str, float]
  copy_beta: float = 0.0
  description: str = ""
  topology: str = ""
  points: Mapping[str, Sequence[Tuple[int, float]]] = dataclasses.field(
      default_factory=dict)
  tuned: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if set(self.alpha) != set(self.beta) or not self.alpha:
      raise ValueError(f"alpha and beta must name the same algorithms, got "
                       f"{sorted(self.alpha)} and {sorted(self.beta)}.")
    for name, table in (("alpha", self.alpha), ("beta", self.beta)):
      for alg, value in table.items():
        if not np.isfinite(value) or value < 0:
          raise ValueError(f"{name}[{alg!r}]={value} must be finite and >= 0.")
    object.__setattr__(self, "alpha", dict(self.alpha))
    object.__setattr__(self, "beta", dict(self.beta))
    points = {}
    for alg, pts in dict(self.points).items():
      pts = tuple(sorted((int(n), float(t)) for n, t in pts))
      if alg not in self.alpha or not pts or any(
          n < 0 or not np.isfinite(t) or t < 0 for n, t in pts):
        raise ValueError(f"points[{alg!r}]={pts!r}: need an algorithm of alpha and "
                         "(bytes >= 0, finite seconds >= 0) pairs.")
      points[alg] = pts
    object.__setattr__(self, "points", points)
    object.__setattr__(self, "tuned", {k: [int(v[0]), int(v[1]), float(v[2])]
                                       for k, v in dict(self.tuned).items()})

  @property
  def algorithms(self) -> Tuple[str, ...]:
    return tuple(sorted(self.alpha))

  def seconds(self, algorithm: str, nbytes: int, num_tensors: int = 1) -> float:
    """Predicted time of one pack of `nbytes` holding `num_tensors` tensors."""
    copy = self.copy_beta * nbytes if num_tensors > 1 else 0.0
    points = self.points.get(algorithm)
    if not points:
      return self.alpha[algorithm] + self.beta[algorithm] * nbytes + copy
    return _interpolate(points, nbytes) + copy

  def best(self, nbytes: int, algorithms: Optional[Sequence[str]] = None,
           num_tensors: int = 1) -> str:
    """The algorithm with the lowest predicted time; of those within MARGIN of it, the
    one earliest in PREFERENCE (then alphabetical)."""
    preferred = sorted(algorithms or self.algorithms, key=_preference)
    return first_close([(self.seconds(a, nbytes, num_tensors), a) for a in preferred])[1]

  def summary(self) -> str:
    """One line: the launch cost and bandwidth of each algorithm, and the source."""
    parts = [f"{a} {1e6 * self.alpha[a]:.0f} us + {1e-9 / self.beta[a] if self.beta[a] else float('inf'):.2f} GB/s"
             for a in self.algorithms]
    return "; ".join(parts) + (f" ({self.description})" if self.description else "")

  def to_json(self) -> str:
    """The model as JSON text (every field)."""
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "CostModel":
    """A model from `to_json`'s text (validated as at construction)."""
    return cls(**json.loads(text))

  def save(self, path: str) -> None:
    """Writes `to_json` to `path` (any tf.io.gfile path)."""
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(self.to_json())

  @classmethod
  def load(cls, path: str) -> "CostModel":
    """A model read from `path` (see save)."""
    with tf.io.gfile.GFile(path, "r") as f:
      return cls.from_json(f.read())


def clearly_faster(seconds: float, other: float) -> bool:
  """Whether a prediction of `seconds` beats `other` by more than MARGIN."""
  return seconds * (1.0 + MARGIN) < other


def first_close(options):
  """Of (seconds, choice) pairs in order of preference, the first that the fastest
  does not beat by more than MARGIN: the one near-tie rule of every timed choice."""
  fastest = min(t for t, _ in options)
  return next(o for o in options if not clearly_faster(fastest, o[0]))


def _preference(algorithm):
  rank = PREFERENCE.index(algorithm) if algorithm in PREFERENCE else len(PREFERENCE)
  return rank, algorithm


# The nominal model's round figures: a launch per hop, a device link in a host, and a
# link between hosts.
NOMINAL_HOP_SECONDS = 20e-6
NOMINAL_LOCAL_BYTES_PER_SECOND = 10e9
NOMINAL_NETWORK_BYTES_PER_SECOND = 2.5e9
NOMINAL_COPY_BYTES_PER_SECOND = 20e9


def nominal(algorithms: Sequence[str], local_devices: int, num_workers: int = 1
            ) -> CostModel:
  """The textbook alpha-beta model (Thakur et al. 2005) of `algorithms` on
  `num_workers` x `local_devices`, with the round constants above instead of
  measurements: what plans are made from when no timing may decide (op determinism).

  Per byte of a device's buffer, p devices in all, l per worker, w workers: the ring
  runs 2(p-1) hops and moves 2(p-1)/p bytes over the slowest link; reduce_to_one
  launches twice and moves 2(l-1) bytes through one device; hierarchical does that in
  each worker plus a ring of 2(w-1) hops over the workers.
  """
  l, w = int(local_devices), int(num_workers)
  p = l * w
  hop, copy = NOMINAL_HOP_SECONDS, 1.0 / NOMINAL_COPY_BYTES_PER_SECOND
  local, network = 1.0 / NOMINAL_LOCAL_BYTES_PER_SECOND, 1.0 / NOMINAL_NETWORK_BYTES_PER_SECOND
  link = network if w > 1 else local
  shapes = {
      "ring": (2 * (p - 1) * hop, 2 * (p - 1) / p * link),
      "reduce_to_one": (2 * hop, 2 * (l - 1) * local),
      "hierarchical": ((2 + 2 * (w - 1)) * hop,
                       2 * (l - 1) * local + 2 * (w - 1) / w * network),
  }
  unknown = sorted(set(algorithms) - set(shapes))
  if unknown:
    raise ValueError(f"No nominal cost for {unknown}; known: {sorted(shapes)}.")
  return CostModel({a: shapes[a][0] for a in algorithms},
                   {a: shapes[a][1] for a in algorithms}, copy_beta=copy,
                   description=f"nominal, no timing: {w} worker(s) x {l} devices")


def _interpolate(points, nbytes):
  """Piecewise-linear through the points, non-decreasing; flat below the first point,
  the last segment's slope past the last."""
  sizes = np.array([n for n, _ in points], np.float64)
  times = np.maximum.accumulate(np.array([t for _, t in points], np.float64))
  if nbytes <= sizes[-1] or len(sizes) == 1:
    return float(np.interp(nbytes, sizes, times))
  slope = (times[-1] - times[-2]) / max(sizes[-1] - sizes[-2], 1.0)
  return float(times[-1] + slope * (nbytes - sizes[-1]))


def read(path: str, topology: str) -> Optional[CostModel]:
  """The model kept in `path`, if the file is there, readable and for `topology`
  (logged when it is not: the caller calibrates again)."""
  if not tf.io.gfile.exists(path):
    return None
  try:
    model = CostModel.load(path)
  except (ValueError, TypeError, KeyError) as e:
    logging.warning("tf_fusion: ignoring the cost model in %s (%s); calibrating again.",
                    path, e)
    return None
  if model.topology != topology:
    logging.warning("tf_fusion: the cost model in %s is for %r, not %r; calibrating "
                    "again.", path, model.topology, topology)
    return None
  logging.info("tf_fusion: cost model read from %s (%s).", path, model.description)
  return model


def write(model: CostModel, path: str) -> None:
  """Writes `model` to `path` atomically: workers sharing a file system may write the
  same path."""
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  if "://" in path:
    model.save(path)
    return
  fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=".cost_model.")
  os.close(fd)
  model.save(tmp)
  os.replace(tmp, path)
  logging.info("tf_fusion: cost model written to %s.", path)
