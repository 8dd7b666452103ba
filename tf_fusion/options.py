"""FusionOptions: the one validated, frozen description of how gradients are fused.

Follows the shape of `tf.distribute.experimental.CommunicationOptions`: enum names are
accepted as strings, every field is checked once at construction, and the object is
immutable so a strategy can hold it safely. Environment variables are read here and only
here (`FusionOptions.from_env`), unlike Horovod, which reads them all over its code.
"""

import dataclasses
import os
from typing import Mapping, NamedTuple, Optional

COMPRESSIONS = ("none", "fp16", "bf16")
AUTOTUNE = ("model", "measure")
ALGORITHMS = ("ring", "hierarchical", "reduce_to_one", "auto")
IMPLEMENTATIONS = ("auto", "nccl", "ring")
SPARSE = ("auto", "gather", "dense")
WEIGHT_UPDATES = ("replicated", "sharded")

_ENV_PREFIX = "TF_FUSION_"


def _check_bytes(name, value, allow_none):
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name} must be a non-negative number of bytes, got None.")
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(
        f"{name} must be a non-negative int (bytes), got {value!r} "
        f"of type {type(value).__name__}.")
  if value < 0:
    raise ValueError(f"{name} must be >= 0 bytes, got {value}.")


def _check_seconds(name, value, allow_zero):
  if value is None:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not value >= 0 or (value == 0 and not allow_zero) or value == float("inf")):
    raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                     f"finite number of seconds or None, got {value!r}.")


def _check_choice(name, value, choices):
  if not isinstance(value, str) or value.lower() not in choices:
    raise ValueError(
        f"{name}={value!r} is not valid; valid values: {', '.join(choices)}.")
  return value.lower()


@dataclasses.dataclass(frozen=True)
class FusionOptions:
  """How gradients are packed, compressed and all-reduced.

  Attributes:
    pack_bytes: fusion threshold per pack, in bytes. Tensors are added to a pack
      until the next would push it past this size; a tensor larger than the
      threshold goes alone. 0 means one pack per dtype. None means auto: the
      threshold is chosen from the calibrated cost model.
    first_pack_bytes: threshold for the first pack of each dtype (the last
      layers' gradients, ready first in back-propagation), kept small so that
      communication starts early, as PyTorch DDP does with its 1 MB bucket.
      0 means no special first pack.
    compression: "none"; "fp16" to carry floating tensors wider than 16 bits as
      float16 on the wire (halves the bytes; 11-bit mantissa; each pack is
      range-scaled by an agreed power of two, so nothing underflows or overflows);
      "bf16" for bfloat16 (float32's range, 8-bit mantissa, no scaling needed).
    algorithm: "ring", "hierarchical", "reduce_to_one", or "auto" (hybrid: the
      cheapest per pack from the calibrated cost model).
    timeout_seconds: optional timeout for each collective, so a dead peer gives
      an error instead of a hang. None waits forever.
    cost_model_file: where the calibrated cost model is kept (JSON). Read when it
      exists and fits the topology; else the model is measured and written there.
      None: measured in every process that needs it.
    backward_seconds: how long one step's back-propagation takes, for the autotuner
      (pack_bytes=None) to count the communication hidden behind it. None: no overlap
      assumed. With pack_bytes=None the autotuner also chooses first_pack_bytes.
    autotune: how pack_bytes=None decides: "model" (the cost model's prediction, with
      overlap) or "measure" (times the reduction of the actual gradient list under a
      few candidate thresholds, once, and keeps the fastest; kept in cost_model_file).
    implementation: the collective on GPUs: "auto" (NCCL when every device of a group
      is a GPU), "nccl", or "ring" (TensorFlow's own ring, also on GPUs). Devices that
      are not all GPUs always run TensorFlow's ring, as TF does. A call's
      CommunicationOptions(implementation=...) other than AUTO wins.
    sparse: what happens to an IndexedSlices gradient (an embedding's): "gather"
      (every replica's rows and indices, all sparse gradients of a step in one fused
      all-gather), "dense" (made a dense tensor that joins the dense packs and the
      16-bit wire, as Horovod's sparse_as_dense), or "auto": per tensor, whichever the
      cost model predicts cheaper from its bytes (gather when the rows are not known
      when the step is traced). The choice and its reason are in `last_plan`.
    weight_update: "replicated" (every replica applies the optimizer to every weight,
      with the whole optimizer state: TensorFlow's way) or "sharded": the gradients
      are reduce-scattered, each of N replicas updates 1/N of every pack of weights
      with 1/N of the optimizer's state, and the new weights are all-gathered (Xu et
      al. 2020; ZeRO stage 1). Same bytes on the wire as one all-reduce; 1/N of the
      update's compute and state per replica. See docs/sharded_update.md.

  Example:
    >>> opts = FusionOptions(pack_bytes=4 << 20, compression="fp16")
    >>> opts.algorithm
    'auto'

  Raises:
    ValueError: on a negative or non-integer size, or an unknown name; the
      message names the bad value and the valid ones.
  """

  pack_bytes: Optional[int] = 32 << 20
  first_pack_bytes: int = 1 << 20
  compression: str = "none"
  algorithm: str = "auto"
  timeout_seconds: Optional[float] = None
  cost_model_file: Optional[str] = None
  backward_seconds: Optional[float] = None
  autotune: str = "model"
  implementation: str = "auto"
  sparse: str = "auto"
  weight_update: str = "replicated"

  def __post_init__(self):
    _check_bytes("pack_bytes", self.pack_bytes, allow_none=True)
    _check_bytes("first_pack_bytes", self.first_pack_bytes, allow_none=False)
    object.__setattr__(self, "compression",
                       _check_choice("compression", self.compression, COMPRESSIONS))
    object.__setattr__(self, "algorithm",
                       _check_choice("algorithm", self.algorithm, ALGORITHMS))
    object.__setattr__(self, "autotune",
                       _check_choice("autotune", self.autotune, AUTOTUNE))
    object.__setattr__(self, "implementation", _check_choice(
        "implementation", self.implementation, IMPLEMENTATIONS))
    object.__setattr__(self, "sparse", _check_choice("sparse", self.sparse, SPARSE))
    object.__setattr__(self, "weight_update", _check_choice(
        "weight_update", self.weight_update, WEIGHT_UPDATES))
    _check_seconds("timeout_seconds", self.timeout_seconds, allow_zero=False)
    _check_seconds("backward_seconds", self.backward_seconds, allow_zero=True)
    if self.cost_model_file is not None and (
        not isinstance(self.cost_model_file, str) or not self.cost_model_file):
      raise ValueError(f"cost_model_file must be a non-empty path or None, got "
                       f"{self.cost_model_file!r}.")

  def replace(self, **changes) -> "FusionOptions":
    """Returns a copy with `changes` applied (and validated)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_env(cls, environ: Optional[Mapping[str, str]] = None,
               **overrides) -> "FusionOptions":
    """Builds options from TF_FUSION_* variables; keyword overrides win.

    Reads TF_FUSION_PACK_BYTES ("auto" for None), TF_FUSION_FIRST_PACK_BYTES,
    TF_FUSION_COMPRESSION, TF_FUSION_ALGORITHM, TF_FUSION_TIMEOUT_SECONDS,
    TF_FUSION_COST_MODEL_FILE, TF_FUSION_BACKWARD_SECONDS, TF_FUSION_AUTOTUNE,
    TF_FUSION_IMPLEMENTATION, TF_FUSION_SPARSE and TF_FUSION_WEIGHT_UPDATE.
    Sizes are plain integers of bytes; a suffix such as "MB" is refused rather
    than guessed, because byte-versus-megabyte confusion is a known pain with
    Horovod's HOROVOD_FUSION_THRESHOLD.

    Args:
      environ: the mapping to read; os.environ when None.
      **overrides: field values that take precedence over the environment.

    Returns:
      A validated FusionOptions.

    Raises:
      ValueError: if a variable does not parse; the message names it.
    """
    environ = os.environ if environ is None else environ
    kwargs = {}
    for field in dataclasses.fields(cls):
      key = _ENV_PREFIX + field.name.upper()
      if key not in environ:
        continue
      raw = environ[key].strip()
      try:
        if field.name == "pack_bytes" and raw.lower() == "auto":
          kwargs[field.name] = None
        elif field.name in ("pack_bytes", "first_pack_bytes"):
          kwargs[field.name] = int(raw)
        elif field.name in ("timeout_seconds", "backward_seconds"):
          kwargs[field.name] = float(raw)
        else:
          kwargs[field.name] = raw
      except ValueError:
        expected = {"pack_bytes": "a plain integer number of bytes or auto",
                    "first_pack_bytes": "a plain integer number of bytes",
                    "timeout_seconds": "a number of seconds",
                    "backward_seconds": "a number of seconds"}[field.name]
        raise ValueError(
            f"{key}={raw!r} does not parse; expected {expected}.") from None
    kwargs.update(overrides)
    return cls(**kwargs)


class CallSettings(NamedTuple):
  """What one call's CommunicationOptions change, over FusionOptions.

  timeout_seconds bounds this call's collectives; bytes_per_pack > 0 caps the pack size
  (as TF documents it); implementation picks the collective (NCCL or ring) on GPUs
  (over FusionOptions.implementation), and on other devices does what TF does: NCCL is
  not there, so ring.
  """
  timeout_seconds: Optional[float]
  max_pack_bytes: Optional[int]
  implementation: str   # "auto", "ring" or "nccl"

  @classmethod
  def of(cls, fusion_options, options=None) -> "CallSettings":
    """The settings of a call with CommunicationOptions `options` (or None)."""
    timeout = fusion_options.timeout_seconds
    max_pack_bytes, implementation = None, fusion_options.implementation
    if options is not None:
      timeout = options.timeout_seconds or timeout
      max_pack_bytes = options.bytes_per_pack or None
      if options.implementation.value.lower() != "auto":
        implementation = options.implementation.value.lower()
    return cls(timeout, max_pack_bytes, implementation)


DEVICES_PER_WORKER_ENV = _ENV_PREFIX + "DEVICES_PER_WORKER"


def devices_per_worker_from_env(environ: Optional[Mapping[str, str]] = None
                                ) -> Optional[int]:
  """TF_FUSION_DEVICES_PER_WORKER (set by `python -m tf_fusion.launch`), or None.

  Raises:
    ValueError: if it is set but not a positive integer.
  """
  environ = os.environ if environ is None else environ
  raw = environ.get(DEVICES_PER_WORKER_ENV)
  if raw is None or not raw.strip():
    return None
  try:
    value = int(raw)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f"{DEVICES_PER_WORKER_ENV}={raw!r} must be a positive integer.")
  return value
