"""The recipe's absl flags, in groups, with validators and the paper's presets.

Each define_* helper takes the FlagValues to define into (default: absl's global FLAGS),
so tests build their own and never touch global state. Flags are never mutated: a
--preset supplies values for the flags the user did not give, in `resolve`.
"""

import dataclasses
from typing import Optional

from absl import flags

from official_recipes.imagenet import models

DTYPES = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}

# Jia et al. 2018 (arXiv:1807.11205): 64K batch, LARS (eta 0.001, momentum 0.9), poly(2) decay
# after a linear warm-up, FP16 forward/backward on FP32 master weights, FP16 on the wire,
# hybrid all-reduce; ResNet-50 90 epochs, AlexNet-BN 95 epochs. Values the paper does not
# give are marked "assumed" (the base learning rate follows --base_lr's default rule).
PRESETS = {
    "jia2018_resnet50_64k": {
        "model": "resnet50", "image_size": 224, "batch_size": 65536, "epochs": 90,
        "optimizer": "lars", "lars_eta": 0.001, "momentum": 0.9, "poly_power": 2.0,
        "dtype": "fp16", "compression": "fp16", "all_reduce_alg": "auto",
        "weight_decay": 5e-5,     # assumed: tf_fusion.LARS's default
        "warmup_epochs": 5.0,     # assumed: Goyal et al. 2017
    },
    "jia2018_alexnet_bn_64k": {
        "model": "alexnet_bn", "image_size": 224, "batch_size": 65536, "epochs": 95,
        "optimizer": "lars", "lars_eta": 0.001, "momentum": 0.9, "poly_power": 2.0,
        "dtype": "fp16", "compression": "fp16", "all_reduce_alg": "auto",
        "weight_decay": 5e-4,     # assumed: You et al. 2017's AlexNet-BN
        "warmup_epochs": 5.0,     # assumed
    },
}


def _positive(name, fv, allow_zero=False, allow_none=True):
  check = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
  flags.register_validator(
      name, lambda v: (v is None and allow_none) or (v is not None and check(v)),
      message=f"--{name} must be {'>= 0' if allow_zero else '> 0'}.", flag_values=fv)


def define_data_flags(fv=flags.FLAGS):
  flags.DEFINE_string("data_dir", None, "Directory of ImageNet TFRecord shards "
                      "(train-*, validation-*).", flag_values=fv)
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir holding imagenet2012.",
                      flag_values=fv)
  flags.DEFINE_string("tfds_manual_dir", None, "Where ILSVRC2012_img_{train,val}.tar "
                      "are, for TFDS to prepare imagenet2012 once.", flag_values=fv)
  flags.DEFINE_bool("synthetic", False, "Random images instead of data: the step "
                    "without input cost.", flag_values=fv)
  flags.DEFINE_integer("image_size", 224, "Side of the square training image.",
                       flag_values=fv)
  flags.DEFINE_integer("num_classes", 1000, "Classes (ImageNet: 1000).", flag_values=fv)
  flags.DEFINE_integer("num_train_examples", None, "Training examples; default: counted "
                       "(small data) or ImageNet's 1,281,167.", flag_values=fv)
  flags.DEFINE_integer("num_eval_examples", None, "Validation examples; default: counted "
                       "(small data) or ImageNet's 50,000.", flag_values=fv)
  for name in ("num_classes", "num_train_examples", "num_eval_examples"):
    _positive(name, fv)

  def one_source(d):
    return sum([bool(d["data_dir"]), bool(d["tfds_data_dir"]), bool(d["synthetic"])]) == 1
  flags.register_multi_flags_validator(
      ["data_dir", "tfds_data_dir", "synthetic"], one_source,
      message="Give exactly one of --data_dir, --tfds_data_dir, --synthetic.",
      flag_values=fv)


def define_schedule_flags(fv=flags.FLAGS):
  flags.DEFINE_integer("batch_size", 256, "Global batch size (all replicas).",
                       flag_values=fv)
  flags.DEFINE_float("epochs", None, "Epochs to train (default 90 unless --train_steps).",
                     flag_values=fv)
  flags.DEFINE_integer("train_steps", None, "Steps to train, instead of --epochs.",
                       flag_values=fv)
  flags.DEFINE_float("base_lr", None, "Peak learning rate after warm-up; default "
                     "0.1 x batch_size / 256 (Goyal et al.'s linear scaling).",
                     flag_values=fv)
  flags.DEFINE_float("warmup_epochs", 5.0, "Linear warm-up, in epochs.", flag_values=fv)
  flags.DEFINE_float("poly_power", 2.0, "Exponent of the polynomial decay.",
                     flag_values=fv)
  flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing in [0, 1).", flag_values=fv)
  flags.DEFINE_integer("epochs_between_evals", 1, "Evaluate every this many epochs.",
                       flag_values=fv)
  flags.DEFINE_bool("skip_eval", False, "Train only.", flag_values=fv)
  flags.DEFINE_integer("accumulation_steps", 1, "Batches per optimizer update (gradient "
                       "accumulation): each update sees batch_size x N examples and "
                       "crosses the wire once; the learning-rate schedule counts "
                       "updates, --train_steps and the logs count batches.",
                       flag_values=fv)
  flags.DEFINE_integer("steps_per_execution", 1, "Training steps run per call of the "
                       "compiled step (Keras steps_per_execution, Model Garden's "
                       "steps_per_loop): less Python and launch overhead per step.",
                       flag_values=fv)
  for name in ("batch_size", "epochs", "train_steps", "base_lr", "poly_power",
               "epochs_between_evals", "accumulation_steps", "steps_per_execution"):
    _positive(name, fv)
  _positive("warmup_epochs", fv, allow_zero=True)
  flags.register_validator("label_smoothing", lambda v: 0 <= v < 1,
                           message="--label_smoothing must be in [0, 1).", flag_values=fv)
  flags.register_multi_flags_validator(
      ["epochs", "train_steps"], lambda d: d["epochs"] is None or d["train_steps"] is None,
      message="Give --epochs or --train_steps, not both.", flag_values=fv)


def define_optimizer_flags(fv=flags.FLAGS):
  flags.DEFINE_enum("optimizer", "lars", ["lars", "sgd"], "LARS (the paper) or SGD with "
                    "momentum.", flag_values=fv)
  flags.DEFINE_float("weight_decay", 5e-5, "Weight decay (not on biases and batch norm).",
                     flag_values=fv)
  flags.DEFINE_float("lars_eta", 0.001, "LARS trust coefficient.", flag_values=fv)
  flags.DEFINE_float("momentum", 0.9, "Momentum.", flag_values=fv)
  _positive("weight_decay", fv, allow_zero=True, allow_none=False)
  _positive("lars_eta", fv, allow_none=False)
  flags.register_validator("momentum", lambda v: 0 <= v < 1,
                           message="--momentum must be in [0, 1).", flag_values=fv)


def define_precision_flags(fv=flags.FLAGS):
  flags.DEFINE_enum("dtype", "fp32", list(DTYPES), "Compute precision: fp16 is the "
                    "paper's (loss scaling on), bf16 needs none.", flag_values=fv)
  flags.DEFINE_string("loss_scale", "dynamic", "fp16 only: 'dynamic', or a number: a "
                      "fixed scale (lowered only if a step overflows).", flag_values=fv)
  flags.register_validator("loss_scale", lambda v: v == "dynamic" or _float(v) > 0,
                           message="--loss_scale must be 'dynamic' or a number > 0.",
                           flag_values=fv)


def define_communication_flags(fv=flags.FLAGS):
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
  _positive("tf_bytes_per_pack", fv, allow_zero=True, allow_none=False)
  flags.register_validator(
      "pack_bytes", lambda v: pack_bytes_value(v) != -1,
      message="--pack_bytes must be a whole number of bytes >= 0, or auto.",
      flag_values=fv)
  _positive("first_pack_bytes", fv, allow_zero=True, allow_none=False)
  _positive("backward_seconds", fv, allow_zero=True)


def pack_bytes_value(text):
  """--pack_bytes as FusionOptions wants it: an int, None for auto; -1 if invalid."""
  text = str(text).strip().lower()
  if text == "auto":
    return None
  return int(text) if text.isdigit() else -1


def define_distribution_flags(fv=flags.FLAGS):
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
  _positive("num_devices", fv)
  _positive("port_base", fv, allow_none=False)


def define_output_flags(fv=flags.FLAGS):
  flags.DEFINE_string("model_dir", None, "Checkpoints and TensorBoard logs; a run in a "
                      "model_dir with a checkpoint continues from it.", flag_values=fv)
  flags.DEFINE_string("profile_steps", "", "'first,last' steps to trace with the "
                      "TensorBoard profiler, e.g. '20,22'; empty: none.", flag_values=fv)
  flags.DEFINE_float("stall_seconds", 300.0, "A training step still running after this "
                     "many seconds is reported, naming the workers behind it, and ended "
                     "with an error (tf_fusion.StallWatch); 0: never.", flag_values=fv)
  flags.DEFINE_integer("log_steps", 100, "Log loss and images/s every this many steps.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", None, "Random seed (weights, data order).", flag_values=fv)
  flags.mark_flag_as_required("model_dir", flag_values=fv)
  _positive("log_steps", fv, allow_none=False)
  _positive("stall_seconds", fv, allow_zero=True, allow_none=False)
  flags.register_validator("profile_steps", lambda v: not v or _steps_range(v) is not None,
                           message="--profile_steps must be 'first,last' with "
                           "1 <= first <= last, or empty.", flag_values=fv)


def define_all(fv=flags.FLAGS):
  """Every flag of the recipe."""
  flags.DEFINE_enum("model", "resnet50", sorted(models.MODELS), "Network.",
                    flag_values=fv)
  flags.DEFINE_enum("preset", None, sorted(PRESETS), "The paper's hyperparameters; "
                    "flags given explicitly still win.", flag_values=fv)
  for define in (define_data_flags, define_schedule_flags, define_optimizer_flags,
                 define_precision_flags, define_communication_flags,
                 define_distribution_flags, define_output_flags):
    define(fv)

  def size_fits(d):
    model = d["model"]
    if d["preset"] and not fv["model"].present:
      model = PRESETS[d["preset"]]["model"]
    return d["image_size"] is None or d["image_size"] >= models.MIN_IMAGE_SIZE[model]
  flags.register_multi_flags_validator(
      ["model", "image_size", "preset"], size_fits,
      message="--image_size too small for the model: "
      + ", ".join(f"{m} needs >= {s}" for m, s in sorted(models.MIN_IMAGE_SIZE.items())),
      flag_values=fv)
  flags.register_multi_flags_validator(
      ["model", "preset"],
      lambda d: not (d["preset"] and fv["model"].present
                     and PRESETS[d["preset"]]["model"] != d["model"]),
      message="--preset is for another --model.", flag_values=fv)


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  """The settings of one run: every recipe flag, typed, after the preset and checks.

  Built by `resolve` from the parsed flags (whose validators have run); the library
  never sees flags, only what `main.run` makes of this.
  """

  model: str
  preset: Optional[str]
  # data
  data_dir: Optional[str]
  tfds_data_dir: Optional[str]
  tfds_manual_dir: Optional[str]
  synthetic: bool
  image_size: int
  num_classes: int
  num_train_examples: Optional[int]
  num_eval_examples: Optional[int]
  # schedule
  batch_size: int
  epochs: Optional[float]
  train_steps: Optional[int]
  base_lr: Optional[float]
  warmup_epochs: float
  warmup_given: bool          # the user (or the preset) chose warmup_epochs
  poly_power: float
  label_smoothing: float
  epochs_between_evals: int
  skip_eval: bool
  accumulation_steps: int
  steps_per_execution: int
  # optimizer and precision
  optimizer: str
  weight_decay: float
  lars_eta: float
  momentum: float
  dtype: str
  loss_scale: str             # "dynamic" or a number
  # communication
  pack_bytes: Optional[int]   # None: auto
  first_pack_bytes: int
  cost_model_file: Optional[str]
  autotune: str
  backward_seconds: Optional[float]
  compression: str
  all_reduce_alg: str
  cross_device_ops: str
  tf_bytes_per_pack: int
  # distribution and output
  strategy: str
  cluster_resolver: str
  port_base: int
  num_devices: Optional[int]
  model_dir: str
  profile_steps: str
  stall_seconds: float
  log_steps: int
  seed: Optional[int]

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; valid: {', '.join(DTYPES)}.")
    if self.pack_bytes is not None and self.pack_bytes < 0:
      raise ValueError(f"pack_bytes={self.pack_bytes} must be >= 0 or None (auto).")
    if self.loss_scale != "dynamic" and not _float(self.loss_scale) > 0:
      raise ValueError(f"loss_scale={self.loss_scale!r} must be 'dynamic' or a number > 0.")


def resolve(fv) -> RecipeConfig:
  """The settings of a run: flag values, with the preset's where a flag was not given."""
  preset = PRESETS.get(fv.preset, {}) if fv.preset else {}
  names = [f.name for f in dataclasses.fields(RecipeConfig)]
  values = {name: fv[name].value for name in names if name != "warmup_given"}
  values.update({k: v for k, v in preset.items() if not fv[k].present})
  values["pack_bytes"] = pack_bytes_value(values["pack_bytes"])
  # A warm-up the user asked for must fit the run; the default may be shortened.
  values["warmup_given"] = fv["warmup_epochs"].present or "warmup_epochs" in preset
  return RecipeConfig(**values)


def _float(text):
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
