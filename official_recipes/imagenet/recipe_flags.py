"""The recipe's absl flags, in groups, with validators and the paper's presets.

Each define_* helper takes the FlagValues to define into (default: absl's global FLAGS),
so tests build their own and never touch global state. Flags are never mutated: a
--schedule_preset supplies values for the flags the user did not give, in `resolve`.
"""

import dataclasses
from typing import Optional

from absl import flags

from official_recipes import shared_flags
from official_recipes.flag_groups import group
from official_recipes.imagenet import models
from official_recipes.shared_flags import define_communication_flags
from official_recipes.shared_flags import define_distribution_flags
from official_recipes.shared_flags import define_input_flags
from official_recipes.shared_flags import define_output_flags
from official_recipes.shared_flags import define_precision_flags


# Jia et al. 2018 (arXiv:1807.11205): 64K batch, LARS (eta 0.001, momentum 0.9), poly(2) decay
# after a linear warm-up, FP16 forward/backward on FP32 master weights, FP16 on the wire,
# hybrid all-reduce; ResNet-50 90 epochs, AlexNet-BN 95 epochs. Values the paper does not
# give are marked "assumed" (the learning rate follows --learning_rate's default rule).
@dataclasses.dataclass(frozen=True)
class JiaSchedule(shared_flags.Preset):
  """Jia et al. 2018's settings of one network (flag values)."""
  model: str
  epochs: float
  weight_decay: float
  image_size: int = 224
  batch_size: int = 65536
  optimizer: str = "lars"
  lars_eta: float = 0.001
  momentum: float = 0.9
  poly_power: float = 2.0
  dtype: str = "fp16"
  compression: str = "fp16"
  all_reduce_alg: str = "auto"
  warmup_epochs: float = 5.0     # assumed: Goyal et al. 2017


PRESETS = {
    "jia2018_resnet50_64k": JiaSchedule(
        "resnet50", epochs=90,
        weight_decay=5e-5),       # assumed: tf_fusion.LARS's default
    "jia2018_alexnet_bn_64k": JiaSchedule(
        "alexnet_bn", epochs=95,
        weight_decay=5e-4),       # assumed: You et al. 2017's AlexNet-BN
}


def define_data_flags(fv=flags.FLAGS):
  with group("data", fv):
    _define_data_flags(fv)


def _define_data_flags(fv):
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
    shared_flags.positive(name, fv)

  def one_source(d):
    return sum([bool(d["data_dir"]), bool(d["tfds_data_dir"]), bool(d["synthetic"])]) == 1
  flags.register_multi_flags_validator(
      ["data_dir", "tfds_data_dir", "synthetic"], one_source,
      message="Give exactly one of --data_dir, --tfds_data_dir, --synthetic.",
      flag_values=fv)


def define_schedule_flags(fv=flags.FLAGS):
  shared_flags.define_schedule_flags(
      fv, batch_size=256, train_steps=None, learning_rate=None,
      learning_rate_default="0.1 x batch_size / 256 (Goyal et al.'s linear scaling)",
      warmup_proportion=None, warmup_default="--warmup_epochs",
      poly_power=2.0, weight_decay=5e-5, not_decayed="biases and batch norm")
  shared_flags.define_old_name(fv, "base_lr", "learning_rate")
  with group("schedule", fv):
    _define_epoch_flags(fv)


def _define_epoch_flags(fv):
  flags.DEFINE_float("epochs", None, "Epochs to train (default 90 unless --train_steps).",
                     flag_values=fv)
  flags.DEFINE_float("warmup_epochs", 5.0, "Linear warm-up, in epochs (or give "
                     "--warmup_proportion).", flag_values=fv)
  flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing in [0, 1).", flag_values=fv)
  flags.DEFINE_integer("epochs_between_evals", 1, "Evaluate every this many epochs.",
                       flag_values=fv)
  for name in ("epochs", "epochs_between_evals"):
    shared_flags.positive(name, fv)
  shared_flags.positive("warmup_epochs", fv, allow_zero=True)
  flags.register_validator("label_smoothing", lambda v: 0 <= v < 1,
                           message="--label_smoothing must be in [0, 1).", flag_values=fv)
  flags.register_multi_flags_validator(
      ["epochs", "train_steps"], lambda d: d["epochs"] is None or d["train_steps"] is None,
      message="Give --epochs or --train_steps, not both.", flag_values=fv)
  flags.register_multi_flags_validator(
      ["warmup_epochs", "warmup_proportion"],
      lambda d: not (fv["warmup_epochs"].present and d["warmup_proportion"] is not None),
      message="Give --warmup_epochs or --warmup_proportion, not both.", flag_values=fv)


def define_optimizer_flags(fv=flags.FLAGS):
  with group("optimizer", fv):
    flags.DEFINE_enum("optimizer", "lars", ["lars", "sgd"], "LARS (the paper) or SGD with "
                      "momentum.", flag_values=fv)
    flags.DEFINE_float("lars_eta", 0.001, "LARS trust coefficient.", flag_values=fv)
    flags.DEFINE_float("momentum", 0.9, "Momentum.", flag_values=fv)
  shared_flags.positive("lars_eta", fv, allow_none=False)
  flags.register_validator("momentum", lambda v: 0 <= v < 1,
                           message="--momentum must be in [0, 1).", flag_values=fv)


def define_all(fv=flags.FLAGS):
  """Every flag of the recipe."""
  with group("model", fv):
    flags.DEFINE_enum("model", "resnet50", sorted(models.MODELS), "Network.",
                      flag_values=fv)
    flags.DEFINE_enum("schedule_preset", None, sorted(PRESETS), "The paper's "
                      "hyperparameters; flags given explicitly still win.", flag_values=fv)
  shared_flags.define_old_name(fv, "preset", "schedule_preset")
  for define in (define_data_flags, define_input_flags, define_schedule_flags,
                 define_optimizer_flags,
                 define_precision_flags, define_communication_flags,
                 define_distribution_flags, define_output_flags):
    define(fv)

  def size_fits(d):
    model = d["model"]
    if _preset(d) and not fv["model"].present:
      model = PRESETS[_preset(d)].model
    return d["image_size"] is None or d["image_size"] >= models.MIN_IMAGE_SIZE[model]
  flags.register_multi_flags_validator(
      ["model", "image_size", "schedule_preset", "preset"], size_fits,
      message="--image_size too small for the model: "
      + ", ".join(f"{m} needs >= {s}" for m, s in sorted(models.MIN_IMAGE_SIZE.items())),
      flag_values=fv)
  flags.register_multi_flags_validator(
      ["model", "schedule_preset", "preset"],
      lambda d: not (_preset(d) and fv["model"].present
                     and PRESETS[_preset(d)].model != d["model"]),
      message="--schedule_preset is for another --model.", flag_values=fv)


def _preset(values):
  """The preset's name under its name or its old one (--preset)."""
  return values["schedule_preset"] or values["preset"]


@dataclasses.dataclass(frozen=True)
class RecipeConfig(shared_flags.SharedConfig):
  """The settings of one run: every recipe flag, typed, after the preset and checks.

  Built by `resolve` from the parsed flags (whose validators have run); the library
  never sees flags, only what `main.run` makes of this.
  """

  model: str
  schedule_preset: Optional[str]
  # data
  data_dir: Optional[str]
  tfds_data_dir: Optional[str]
  tfds_manual_dir: Optional[str]
  synthetic: bool
  image_size: int
  num_classes: int
  num_train_examples: Optional[int]
  num_eval_examples: Optional[int]
  # schedule (batch size, steps, learning rate, decay, accumulation: SharedConfig)
  epochs: Optional[float]
  warmup_epochs: float
  warmup_given: bool          # the user (or the preset) chose the warm-up
  label_smoothing: float
  epochs_between_evals: int
  # optimizer
  optimizer: str
  lars_eta: float
  momentum: float


# Flags renamed so that both recipes say the same concept the same way: (old, new).
RENAMED = (("base_lr", "learning_rate"), ("preset", "schedule_preset"))


def resolve(fv) -> RecipeConfig:
  """The settings of a run: flag values, with the preset's where a flag was not given."""
  name = _preset({"schedule_preset": fv.schedule_preset, "preset": fv.preset})
  preset = PRESETS[name] if name else None
  values = shared_flags.config_values(RecipeConfig, fv, preset, skip=("warmup_given",))
  shared_flags.take_old_names(fv, values, RENAMED)
  # A warm-up the user asked for must fit the run; the default may be shortened.
  values["warmup_given"] = (fv["warmup_epochs"].present or preset is not None
                            or values["warmup_proportion"] is not None)
  return RecipeConfig(**values)
