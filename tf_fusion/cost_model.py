"""The cost model of one pack's all-reduce, as data: predict, save, load.

alpha + beta * S per algorithm for a pack of S bytes (the alpha-beta model of Thakur et
al. 2005), with the measured points that `CostModel.seconds` interpolates; packing a
pack of several tensors costs copy_beta * S more. The constants are measured by
calibration.calibrate on the devices in use, never guessed. This module depends on no
other part of tf_fusion.
"""

import dataclasses
import json
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf


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
    """The algorithm with the lowest predicted time (ties: alphabetical)."""
    algorithms = algorithms or self.algorithms
    return min(sorted(algorithms),
               key=lambda a: self.seconds(a, nbytes, num_tensors))

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


def _interpolate(points, nbytes):
  """Piecewise-linear through the points, non-decreasing; flat below the first point,
  the last segment's slope past the last."""
  sizes = np.array([n for n, _ in points], np.float64)
  times = np.maximum.accumulate(np.array([t for _, t in points], np.float64))
  if nbytes <= sizes[-1] or len(sizes) == 1:
    return float(np.interp(nbytes, sizes, times))
  slope = (times[-1] - times[-2]) / max(sizes[-1] - sizes[-2], 1.0)
  return float(times[-1] + slope * (nbytes - sizes[-1]))
