"""The absl flags every recipe shares: precision, communication (tf_fusion's options and
the baselines), distribution (one host or several, cluster resolvers) and output
(model_dir, profiling, stall reports, logging). Each define_* helper takes the
FlagValues to define into, so tests build their own.
"""

import dataclasses
import typing
from typing import Optional

from absl import flags
from absl import logging

from official_recipes.flag_groups import group

DTYPES = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}


def positive(name, fv, allow_zero=False, allow_none=True):
  """A validator on flag `name`: > 0 (>= 0 with allow_zero), or None if allowed."""
  check = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
  flags.register_validator(
      name, lambda v: (v is None and allow_none) or (v is not None and check(v)),
      message=f"--{name} must be {'>= 0' if allow_zero else '> 0'}.", flag_values=fv)


def define_precision_flags(fv=flags.FLAGS):
  with group("precision", fv):
    flags.DEFINE_enum("dtype", "fp32", list(DTYPES), "Compute precision: fp16 is the "
                      "paper's (loss scaling on), bf16 needs none.", flag_values=fv)
    flags.DEFINE_string("loss_scale", "dynamic", "fp16 only: 'dynamic', or a number: a "
                        "fixed scale (lowered only if a step overflows).", flag_values=fv)
    flags.register_validator("loss_scale", lambda v: v == "dynamic" or number(v) > 0,
                             message="--loss_scale must be 'dynamic' or a number > 0.",
                             flag_values=fv)


def define_communication_flags(fv=flags.FLAGS):
  with group("communication", fv):
    flags.DEFINE_string("pack_bytes", str(32 << 20), "Fusion threshold per pack (bytes); "
                        "0: one pack per dtype; auto: chosen with first_pack_bytes from the "
                        "calibrated cost model.", flag_values=fv)
    flags.DEFINE_integer("first_pack_bytes", 1 << 20, "Threshold of the first pack, sent "
                         "while back-propagation goes on.", flag_values=fv)
    flags.DEFINE_string("cost_model_file", None, "Where the calibrated all-reduce cost "
                        "model is kept (read if it fits, else measured and written); "
                        "default: <model_dir>/cost_model.json.", flag_values=fv)
    flags.DEFINE_enum("autotune", "model", ["model", "measure"], "How --pack_bytes=auto "
                      "decides: the cost model's prediction, or timing a few candidate "
                      "thresholds on the model's gradients once (kept in --cost_model_file).",
                      flag_values=fv)
    flags.DEFINE_float("backward_seconds", None, "One step's back-propagation time, so "
                       "--pack_bytes=auto counts the communication hidden behind it "
                       "(tools/profile_step.py measures it).", flag_values=fv)
    flags.DEFINE_enum("compression", "none", ["none", "fp16", "bf16"], "16 bits on the wire: "
                      "fp16 (range-scaled) or bf16.",
                      flag_values=fv)
    flags.DEFINE_enum("sparse", "auto", ["auto", "gather", "dense"], "IndexedSlices "
                      "gradients (embeddings): gathered together, made dense to join the "
                      "dense packs (Horovod's sparse_as_dense), or auto: per tensor by the "
                      "cost model.", flag_values=fv)
    flags.DEFINE_enum("weight_update", "replicated", ["replicated", "sharded"],
                      "The optimizer's update: repeated on every replica with the whole "
                      "optimizer state (replicated), or sharded: gradients "
                      "reduce-scattered, each replica updates 1/N of the weights with 1/N "
                      "of the state, weights all-gathered (docs/sharded_update.md).",
                      flag_values=fv)
    flags.DEFINE_enum("all_reduce_alg", "auto",
                      ["auto", "ring", "hierarchical", "reduce_to_one"],
                      "All-reduce per pack; auto picks per pack from a calibrated cost "
                      "model.", flag_values=fv)
    flags.DEFINE_enum("cross_device_ops", "tf_fusion", ["tf_fusion", "tf", "none"],
                      "Who reduces the gradients: tf_fusion, or TensorFlow's own reduction "
                      "for the strategy (MirroredStrategy's default; MultiWorkerMirrored"
                      "Strategy's CollectiveAllReduce with --tf_bytes_per_pack), on the same "
                      "devices with everything else equal: the baseline to compare with. "
                      "none: MEASUREMENT ONLY, no communication (each replica applies its "
                      "own gradients; the model is not trained correctly and no "
                      "checkpoint is written): the floor for scaling efficiency.",
                      flag_values=fv)
    flags.DEFINE_integer("tf_bytes_per_pack", 0, "With --cross_device_ops=tf and several "
                         "workers: TF's bytes_per_pack (0: TF's default, one pack).",
                         flag_values=fv)
    positive("tf_bytes_per_pack", fv, allow_zero=True, allow_none=False)
    flags.register_validator(
        "pack_bytes", lambda v: pack_bytes_value(v) != -1,
        message="--pack_bytes must be a whole number of bytes >= 0, or auto.",
        flag_values=fv)
    positive("first_pack_bytes", fv, allow_zero=True, allow_none=False)
    positive("backward_seconds", fv, allow_zero=True)


def pack_bytes_value(text):
  """--pack_bytes as FusionOptions wants it: an int, None for auto; -1 if invalid."""
  text = str(text).strip().lower()
  if text == "auto":
    return None
  return int(text) if text.isdigit() else -1


def define_distribution_flags(fv=flags.FLAGS):
  with group("distribution", fv):
    flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "multi_worker"],
                      "One host (MirroredStrategy) or several (TF_CONFIG; see "
                      "python -m tf_fusion.launch).", flag_values=fv)
    flags.DEFINE_enum("cluster_resolver", "auto", ["auto", "tf_config", "slurm"],
                      "With --strategy=multi_worker, where the workers come from: TF_CONFIG "
                      "(tf_fusion.launch, Kubernetes TFJob), Slurm's srun variables, or auto: "
                      "TF_CONFIG when set, else Slurm when SLURM_PROCID is set.",
                      flag_values=fv)
    flags.DEFINE_integer("port_base", 8888, "Under Slurm, task i of a node listens on "
                         "port_base + i.", flag_values=fv)
    flags.DEFINE_integer("num_devices", None, "Devices per host; default: all GPUs, or "
                         "1 CPU. On a host without GPUs, N > 1 makes N logical CPUs.",
                         flag_values=fv)
    positive("num_devices", fv)
    positive("port_base", fv, allow_none=False)


def define_schedule_flags(fv=flags.FLAGS, *, batch_size, train_steps, learning_rate,
                          learning_rate_default, warmup_proportion, warmup_default,
                          poly_power, weight_decay, not_decayed):
  """The flags of the training schedule and its optimizer that both recipes have, under
  the same names; each recipe gives its defaults (and ImageNet adds its epochs: --epochs,
  --warmup_epochs)."""
  with group("schedule", fv):
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size (all replicas).",
                         flag_values=fv)
    flags.DEFINE_integer("train_steps", train_steps, "Training steps (batches).",
                         flag_values=fv)
    flags.DEFINE_float("learning_rate", learning_rate, "Peak learning rate after warm-up; "
                       f"default {learning_rate_default}.", flag_values=fv)
    flags.DEFINE_float("warmup_proportion", warmup_proportion, "Linear warm-up of the "
                       f"learning rate, as a fraction of the updates; default "
                       f"{warmup_default}.", flag_values=fv)
    flags.DEFINE_float("poly_power", poly_power, "Exponent of the polynomial decay to 0 "
                       "(1: linear).", flag_values=fv)
    flags.DEFINE_float("weight_decay", weight_decay, f"Weight decay (not on {not_decayed}).",
                       flag_values=fv)
    flags.DEFINE_integer("accumulation_steps", 1, "Batches per optimizer update (gradient "
                         "accumulation): each update sees batch_size x N examples and "
                         "crosses the wire once; the learning-rate schedule counts "
                         "updates, --train_steps and the logs count batches.",
                         flag_values=fv)
    flags.DEFINE_integer("steps_per_execution", 1, "Training steps run per call of the "
                         "compiled step (Keras steps_per_execution, Model Garden's "
                         "steps_per_loop): less Python and launch overhead per step.",
                         flag_values=fv)
    flags.DEFINE_bool("skip_eval", False, "Train only: no evaluation.", flag_values=fv)
    for name in ("batch_size", "train_steps", "learning_rate", "poly_power",
                 "accumulation_steps", "steps_per_execution"):
      positive(name, fv)
    positive("weight_decay", fv, allow_zero=True, allow_none=False)
    flags.register_validator("warmup_proportion", lambda v: v is None or 0 <= v < 1,
                             message="--warmup_proportion must be in [0, 1).",
                             flag_values=fv)


def define_old_name(fv, old, new):
  """--`old`, a flag renamed --`new` (already defined into `fv`): the same type and
  values, not both given; `take_old_names` uses it and says the new name."""
  parser = fv[new].parser
  if isinstance(parser, flags.EnumParser):
    flags.DEFINE_enum(old, None, parser.enum_values, f"Old name of --{new}.",
                      flag_values=fv)
  elif isinstance(parser, flags.FloatParser):
    flags.DEFINE_float(old, None, f"Old name of --{new}.", flag_values=fv)
  else:
    raise TypeError(f"--{new}: only float and enum flags are renamed here.")
  flags.register_multi_flags_validator(
      [old, new], lambda d: not (fv[old].present and fv[new].present),
      message=f"--{old} is the old name of --{new}: give one.", flag_values=fv)


def take_old_names(fv, values, renames):
  """`values` (config fields) with each old name's value under its new name, where the
  old name was given; logs the new name, once per run."""
  for old, new in renames:
    if fv[old].present:
      logging.warning("--%s is now --%s (the same in both recipes); the old name still "
                      "works.", old, new)
      values[new] = fv[old].value
  return values


def define_input_flags(fv=flags.FLAGS):
  with group("data", fv):
    flags.DEFINE_bool("skip_corrupt_records", False, "A corrupt or truncated TFRecord file "
                      "is read up to the damage and the rest of it skipped (tf.data's "
                      "ignore_errors, per file), instead of stopping the run. The files are "
                      "read once before training to name and count the damaged ones in the "
                      "log.", flag_values=fv)


def define_output_flags(fv=flags.FLAGS):
  with group("output", fv):
    flags.DEFINE_string("model_dir", None, "Checkpoints and TensorBoard logs; a run in a "
                        "model_dir with a checkpoint continues from it.", flag_values=fv)
    flags.DEFINE_string("profile_steps", "", "'first,last' steps to trace with the "
                        "TensorBoard profiler, e.g. '20,22'; empty: none.", flag_values=fv)
    flags.DEFINE_float("stall_seconds", 300.0, "A training step still running after this "
                       "many seconds is reported, naming the workers behind it, and ended "
                       "with an error (tf_fusion.StallWatch); 0: never.", flag_values=fv)
    flags.DEFINE_integer("log_steps", 100, "Log loss and throughput every this many steps.",
                         flag_values=fv)
    flags.DEFINE_integer("seed", None, "Random seed (weights, data order).", flag_values=fv)
    flags.DEFINE_bool("deterministic", False, "The same bits from every run with the same "
                      "--seed and cluster shape: TensorFlow's op determinism, under which "
                      "tf_fusion plans from its nominal cost model, with no timing "
                      "(docs/autotune.md). Needs --seed.", flag_values=fv)
    flags.mark_flag_as_required("model_dir", flag_values=fv)
    flags.register_multi_flags_validator(
        ["deterministic", "seed"], lambda v: not v["deterministic"] or v["seed"] is not None,
        message="--deterministic needs --seed: the same bits come from the same seed.",
        flag_values=fv)
    positive("log_steps", fv, allow_none=False)
    positive("stall_seconds", fv, allow_zero=True, allow_none=False)
    flags.register_validator("profile_steps", lambda v: not v or _steps_range(v) is not None,
                             message="--profile_steps must be 'first,last' with "
                             "1 <= first <= last, or empty.", flag_values=fv)


def number(text):
  """float(text), or -1.0 when it is no number (the validators want > 0)."""
  try:
    return float(text)
  except (TypeError, ValueError):
    return -1.0


def _steps_range(text):
  """'a,b' -> (a, b) with 1 <= a <= b, else None."""
  try:
    first, last = (int(p) for p in text.split(","))
  except ValueError:
    return None
  return (first, last) if 1 <= first <= last else None


def profile_range(text):
  """The validated (first, last) of --profile_steps, or None."""
  return _steps_range(text) if text else None


@dataclasses.dataclass(frozen=True)
class SharedConfig:
  """The shared flags of one run, typed (schedule, input, precision, communication,
  distribution, output); each recipe's config adds its own fields to these."""

  batch_size: int
  train_steps: Optional[int]
  learning_rate: Optional[float]
  warmup_proportion: Optional[float]
  poly_power: float
  weight_decay: float
  accumulation_steps: int
  steps_per_execution: int
  skip_eval: bool

  dtype: str
  loss_scale: str             # "dynamic" or a number
  pack_bytes: Optional[int]   # None: auto
  first_pack_bytes: int
  cost_model_file: Optional[str]
  autotune: str
  backward_seconds: Optional[float]
  compression: str
  sparse: str
  weight_update: str
  all_reduce_alg: str
  cross_device_ops: str
  tf_bytes_per_pack: int
  strategy: str
  cluster_resolver: str
  port_base: int
  num_devices: Optional[int]
  model_dir: str
  profile_steps: str
  stall_seconds: float
  log_steps: int
  seed: Optional[int]
  deterministic: bool
  skip_corrupt_records: bool

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; valid: {', '.join(DTYPES)}.")
    if self.pack_bytes is not None and self.pack_bytes < 0:
      raise ValueError(f"pack_bytes={self.pack_bytes} must be >= 0 or None (auto).")
    if self.loss_scale != "dynamic" and not number(self.loss_scale) > 0:
      raise ValueError(f"loss_scale={self.loss_scale!r} must be 'dynamic' or a number > 0.")


@dataclasses.dataclass(frozen=True)
class Preset:
  """A named set of flag values: a paper's or a reference's settings of a run.

  Subclasses are frozen dataclasses whose fields are flags of their recipe, typed as
  their flags are, so that a preset is checked when it is written (an int where a
  float flag is meant is taken as that float; anything else of another type is a
  TypeError naming the field). `resolve` fills in `as_flags()` for the flags the user
  did not give; tests/test_flag_groups.py parses every value under its flag.
  """

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for field in dataclasses.fields(self):
      want, value = hints[field.name], getattr(self, field.name)
      if want is float and type(value) is int:   # pylint: disable=unidiomatic-typecheck
        object.__setattr__(self, field.name, float(value))
      elif type(value) is not want:   # pylint: disable=unidiomatic-typecheck
        raise TypeError(f"{type(self).__name__}.{field.name}={value!r}: the flag "
                        f"--{field.name} takes a {want.__name__}.")

  def as_flags(self) -> dict:
    """{flag name: value} of every field."""
    return dataclasses.asdict(self)


def config_values(config_class, fv, preset: Optional[Preset], skip=()):
  """{field: value} of `config_class` from the parsed flags `fv`, with the `preset`'s
  values where a flag was not given; --pack_bytes as FusionOptions wants it."""
  values = {f.name: fv[f.name].value for f in dataclasses.fields(config_class)
            if f.name not in skip}
  given = preset.as_flags() if preset is not None else {}
  values.update({k: v for k, v in given.items() if not fv[k].present})
  values["pack_bytes"] = pack_bytes_value(values["pack_bytes"])
  return values
