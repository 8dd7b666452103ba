"""The BERT recipe's absl flags: its own (model, data, schedule, optimizer), the ones
every recipe shares (official_recipes/shared_flags.py), and LAMB's large-batch presets.
"""

import dataclasses
from typing import Optional

from absl import flags

from official_recipes import shared_flags
from official_recipes.bert import model
from official_recipes.flag_groups import group

# LAMB at large batch for BERT (You et al. 2019, "Large Batch Optimization for Deep
# Learning: Training BERT in 76 minutes"): phase 1 at sequence length 128, phase 2 at
# 512. The presets follow one reference, NVIDIA's published LAMB configuration of that
# two-phase run (DeepLearningExamples, TensorFlow BERT; 64K then 32K, 7,038 + 1,563
# updates, close to the paper's 8,599), whole: its schedule (peak, warm-up proportion,
# poly(0.5) decay), and its optimizer: the trust ratio on every variable (weight decay
# still not on biases and LayerNorm) and the gradient's global norm clipped to 1.0
# before the update. Run phase 2 with --model_dir of phase 1 and a corpus of length 512.
@dataclasses.dataclass(frozen=True)
class LambSchedule(shared_flags.Preset):
  """One phase of NVIDIA's LAMB run (flag values): its schedule, and its optimizer."""
  batch_size: int
  train_steps: int
  learning_rate: float
  warmup_proportion: float
  max_predictions: int
  poly_power: float = 0.5
  optimizer: str = "lamb"
  weight_decay: float = 0.01
  lamb_adapt_all: bool = True
  global_clipnorm: float = 1.0
  dtype: str = "fp16"
  compression: str = "fp16"


SCHEDULE_PRESETS = {
    "lamb_64k_phase1": LambSchedule(65536, 7038, learning_rate=6e-3,
                                    warmup_proportion=0.2843, max_predictions=20),
    "lamb_32k_phase2": LambSchedule(32768, 1563, learning_rate=4e-3,
                                    warmup_proportion=0.128, max_predictions=80),
}


def define_all(fv=flags.FLAGS):
  """Every flag of the BERT recipe, in the groups both recipes share."""
  with group("model", fv):
    flags.DEFINE_enum("model", "tiny", sorted(model.PRESETS), "Encoder size: tiny (this "
                      "machine) or bert_base (Devlin et al.'s 110M).", flag_values=fv)
    flags.DEFINE_enum("schedule_preset", None, sorted(SCHEDULE_PRESETS), "LAMB's "
                      "large-batch hyperparameters; flags given explicitly still win.",
                      flag_values=fv)
    flags.DEFINE_integer("max_predictions", None, "Masked positions per sequence; "
                         "default the model's (tiny 5, bert_base 20).", flag_values=fv)
    flags.DEFINE_float("dropout", None, "Dropout rate; default the model's (0.1).",
                       flag_values=fv)
  shared_flags.define_old_name(fv, "preset", "model")
  with group("data", fv):
    flags.DEFINE_string("data_dir", None, "Token-id TFRecords with meta.json "
                        "(tools/make_fake_text.py).", flag_values=fv)
  flags.mark_flag_as_required("data_dir", flag_values=fv)
  shared_flags.define_schedule_flags(
      fv, batch_size=64, train_steps=1000, learning_rate=2e-3, learning_rate_default="2e-3",
      warmup_proportion=0.1, warmup_default="0.1", poly_power=1.0, weight_decay=0.01,
      not_decayed="biases and LayerNorm")
  _define_optimizer_flags(fv)
  with group("output", fv):
    flags.DEFINE_integer("checkpoint_steps", 1000, "Save (and report) every this many "
                         "steps; a rerun resumes from the last save.", flag_values=fv)
  for name in ("max_predictions", "checkpoint_steps"):
    shared_flags.positive(name, fv)
  for name in ("dropout", "beta_1", "beta_2"):
    flags.register_validator(name, lambda v: v is None or 0 <= v < 1,
                             message=f"--{name} must be in [0, 1).", flag_values=fv)
  for define in (shared_flags.define_input_flags, shared_flags.define_precision_flags,
                 shared_flags.define_communication_flags,
                 shared_flags.define_distribution_flags, shared_flags.define_output_flags):
    define(fv)


def _define_optimizer_flags(fv):
  with group("optimizer", fv):
    flags.DEFINE_enum("optimizer", "lamb", ["lamb", "adamw"], "tf_fusion.LAMB, or Keras's "
                      "AdamW (the small-batch baseline).", flag_values=fv)
    flags.DEFINE_bool("lamb_adapt_all", False, "LAMB's trust ratio on every variable "
                      "(NVIDIA's LAMB), not only on those with weight decay (TensorFlow "
                      "Addons' with BERT's exclusions).", flag_values=fv)
    flags.DEFINE_float("global_clipnorm", None, "Clip the reduced gradient's global norm "
                       "to this before the update (NVIDIA's LAMB: 1.0); none by default.",
                       flag_values=fv)
    flags.DEFINE_float("beta_1", 0.9, "First-moment decay.", flag_values=fv)
    flags.DEFINE_float("beta_2", 0.999, "Second-moment decay.", flag_values=fv)
    flags.DEFINE_float("epsilon", 1e-6, "Added to the second moment's root.",
                       flag_values=fv)


@dataclasses.dataclass(frozen=True)
class BertConfig(shared_flags.SharedConfig):
  """The settings of one run: the recipe's own flags and the shared ones, typed, after
  the schedule preset."""

  model: str
  schedule_preset: Optional[str]
  data_dir: str
  max_predictions: Optional[int]
  dropout: Optional[float]
  optimizer: str
  lamb_adapt_all: bool
  global_clipnorm: Optional[float]
  beta_1: float
  beta_2: float
  epsilon: float
  checkpoint_steps: int

  @property
  def predictions(self) -> int:
    return self.max_predictions or model.PRESETS[self.model].max_predictions


# Flags renamed so that both recipes say the same concept the same way: (old, new).
RENAMED = (("preset", "model"),)


def resolve(fv) -> BertConfig:
  """The settings of a run: flag values, the schedule preset's where none was given."""
  preset = SCHEDULE_PRESETS[fv.schedule_preset] if fv.schedule_preset else None
  values = shared_flags.config_values(BertConfig, fv, preset)
  return BertConfig(**shared_flags.take_old_names(fv, values, RENAMED))
