r"""Trains ResNet-50 v1.5 or AlexNet-BN on ImageNet the way Jia et al. 2018 did: large
batch, LARS with warm-up and poly(2) decay, mixed precision, fused all-reduce with an
FP16 wire.

Examples:
  # 8 GPUs, the paper's ResNet-50 hyperparameters scaled to 8K batch:
  python -m official_recipes.imagenet.main --schedule_preset=jia2018_resnet50_64k \
      --batch_size=8192 --data_dir=/data/imagenet --model_dir=/tmp/r50
  # Several hosts: the same command on each, with TF_CONFIG, --strategy=multi_worker.
  # Offline, on CPU: tools/make_fake_imagenet.py, then --data_dir there (README).

`run(flags_obj)` does the work and returns a stats dict; tests call it directly.

References:
  Jia et al. 2018, arXiv:1807.11205; Goyal et al. 2017, arXiv:1706.02677.
"""

import os

# TensorFlow's C++ start-up INFO lines (oneDNN, CUDA stubs, CPU features) say nothing
# a user of the recipe can act on; warnings and errors still show. Set before import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import logging
import keras

import tf_fusion
from official_recipes import runner
from official_recipes import training
from official_recipes.imagenet import input_pipeline
from official_recipes.imagenet import models
from official_recipes.imagenet import recipe_flags
from official_recipes.schedules import WarmupPolyDecay

# No weight decay (and, for LARS, no trust ratio) on biases and batch norm: Jia et al.
NO_DECAY = tf_fusion.optimizers.lars.DEFAULT_EXCLUSIONS


def make_optimizer(cfg, learning_rate):
  """LARS or SGD + momentum (no decay on biases and batch norm), loss-scaled for fp16,
  accumulating --accumulation_steps batches per update."""
  accumulate = ({"gradient_accumulation_steps": cfg.accumulation_steps}
                if cfg.accumulation_steps > 1 else {})
  if cfg.optimizer == "lars":
    opt = tf_fusion.LARS(learning_rate, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, eta=cfg.lars_eta,
                         exclude_from_weight_decay=NO_DECAY, **accumulate)
  else:
    opt = keras.optimizers.SGD(learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay or None, **accumulate)
    opt.exclude_from_weight_decay(var_names=list(NO_DECAY))
  return training.loss_scaled(cfg, opt)


def make_datasets(cfg, strategy, global_batch):
  """(train, eval or None, train examples, eval examples) as distributed datasets."""
  dtype = keras.mixed_precision.dtype_policy().compute_dtype
  args = dict(image_size=cfg.image_size, num_classes=cfg.num_classes, dtype=dtype)
  if cfg.synthetic:
    def fn(is_training):
      return lambda ctx: input_pipeline.synthetic_dataset(
          ctx.get_per_replica_batch_size(global_batch), seed=cfg.seed or 0, **args)
    n_train = cfg.num_train_examples or input_pipeline.IMAGENET_TRAIN_EXAMPLES
    n_eval = cfg.num_eval_examples or input_pipeline.IMAGENET_EVAL_EXAMPLES
  elif cfg.tfds_data_dir:
    def fn(is_training):
      return lambda ctx: input_pipeline.tfds_dataset(
          cfg.tfds_data_dir, is_training, ctx.get_per_replica_batch_size(global_batch),
          input_context=ctx, manual_dir=cfg.tfds_manual_dir, seed=cfg.seed, **args)
    n_train = cfg.num_train_examples or input_pipeline.tfds_num_examples(
        cfg.tfds_data_dir, True, cfg.tfds_manual_dir)
    n_eval = cfg.num_eval_examples or input_pipeline.tfds_num_examples(
        cfg.tfds_data_dir, False, cfg.tfds_manual_dir)
  else:
    files = {t: input_pipeline.tfrecord_files(cfg.data_dir, t)
             for t in (True, False) if t or not cfg.skip_eval}
    def fn(is_training):
      return lambda ctx: input_pipeline.tfrecord_dataset(
          files[is_training], is_training, ctx.get_per_replica_batch_size(global_batch),
          input_context=ctx, seed=cfg.seed, skip_corrupt=cfg.skip_corrupt_records, **args)
    skip = cfg.skip_corrupt_records   # then always counted: the log names the damage
    n_train = ((not skip and cfg.num_train_examples)
               or input_pipeline.count_examples(files[True], True, skip))
    n_train = cfg.num_train_examples or n_train
    n_eval = cfg.num_eval_examples or (
        0 if cfg.skip_eval else input_pipeline.count_examples(files[False], False, skip))
  train = strategy.distribute_datasets_from_function(fn(True))
  evaluation = None if cfg.skip_eval else strategy.distribute_datasets_from_function(fn(False))
  return train, evaluation, n_train, n_eval


def plan_steps(cfg, n_train, n_eval, global_batch):
  """Steps per epoch, total steps, warm-up steps, eval steps; ValueError if they make
  no sense for the data."""
  steps_per_epoch = n_train // global_batch
  if steps_per_epoch < 1:
    raise ValueError(f"The training set has {n_train} examples, fewer than one global "
                     f"batch (--batch_size={global_batch}).")
  epochs = cfg.epochs if cfg.epochs is not None else (None if cfg.train_steps else 90)
  total = cfg.train_steps or max(1, round(epochs * steps_per_epoch))
  if cfg.warmup_proportion is not None:
    warmup, asked = round(cfg.warmup_proportion * total), (
        f"--warmup_proportion={cfg.warmup_proportion}")
  else:
    warmup, asked = round(cfg.warmup_epochs * steps_per_epoch), (
        f"--warmup_epochs={cfg.warmup_epochs}")
  if warmup >= total:
    if cfg.warmup_given:
      raise ValueError(f"{asked} is {warmup} steps, not fewer than the run's {total} "
                       f"steps ({steps_per_epoch} steps per epoch).")
    logging.warning("The default warm-up (%g epochs, %d steps) is not shorter than this "
                    "run's %d steps: warming up for %d steps instead (--warmup_epochs "
                    "sets it).", cfg.warmup_epochs, warmup, total, total // 10)
    warmup = total // 10
  eval_steps = 0 if cfg.skip_eval else n_eval // global_batch
  if not cfg.skip_eval and eval_steps < 1:
    raise ValueError(f"The validation set has {n_eval} examples, fewer than one global "
                     f"batch (--batch_size={global_batch}); use --skip_eval.")
  if cfg.synthetic and cfg.num_eval_examples is None:
    # Random images measure speed, not accuracy: a smoke run of a few steps should not
    # evaluate 50,000 of them. --num_eval_examples asks for more.
    eval_steps = min(eval_steps, total)
  return steps_per_epoch, total, warmup, eval_steps


def run(flags_obj):
  """Trains and evaluates as the flags say; returns the stats (ValueError for input or settings that
  cannot work, naming them)."""
  return runner.run(ImagenetTask(), recipe_flags.resolve(flags_obj))


class ImagenetTask:
  """The recipe's part of a run (runner.Task): ImageNet-format data, the step plan in
  epochs, ResNet-50 v1.5 or AlexNet-BN with LARS (or SGD) and a warm-up + poly decay,
  evaluated every --epochs_between_evals."""

  def data(self, cfg, strategy) -> runner.Data:
    train, evaluation, n_train, n_eval = make_datasets(cfg, strategy, cfg.batch_size)
    steps_per_epoch, total, warmup, eval_steps = plan_steps(cfg, n_train, n_eval,
                                                            cfg.batch_size)
    files = input_pipeline.tfrecord_files(cfg.data_dir, True) if cfg.data_dir else ()
    return runner.Data(train, evaluation, total, steps_per_epoch * cfg.epochs_between_evals,
                       eval_steps, evaluate_in_fit=True, train_files=files, unit="images",
                       meta={"steps_per_epoch": steps_per_epoch, "warmup": warmup})

  def build(self, cfg, strategy, data: runner.Data) -> keras.Model:
    # Under gradient accumulation an update sees accumulation_steps batches, and the
    # schedule runs on the optimizer's update count.
    per_update = cfg.accumulation_steps
    with strategy.scope():
      model = models.build(cfg.model, cfg.num_classes, cfg.image_size)
      schedule = WarmupPolyDecay(_peak_lr(cfg), data.meta["warmup"] // per_update,
                                 max(1, data.total // per_update), power=cfg.poly_power)
      # No XLA: with XLA on GPUs, MirroredStrategy ignores custom cross-device ops.
      model.compile(make_optimizer(cfg, schedule),
                    loss=keras.losses.CategoricalCrossentropy(
                        from_logits=True, label_smoothing=cfg.label_smoothing),
                    metrics=[keras.metrics.CategoricalAccuracy(name="top_1"),
                             keras.metrics.TopKCategoricalAccuracy(5, name="top_5")],
                    jit_compile=False, steps_per_execution=cfg.steps_per_execution)
    return model

  def describe(self, cfg, model, strategy, data, start_step) -> str:
    del model
    return (f"{cfg.model} on {strategy.num_replicas_in_sync} replicas, global batch "
            f"{cfg.batch_size} (x{cfg.accumulation_steps} per update), "
            f"{data.meta['steps_per_epoch']} steps per epoch; steps {start_step}.."
            f"{data.total}, peak lr {_peak_lr(cfg):.4g} after {data.meta['warmup']} "
            "warm-up steps")

  def stats(self, cfg, model, strategy, data, metrics, logger) -> dict:
    del cfg, model, strategy
    return {"steps_per_epoch": data.meta["steps_per_epoch"],
            "train_top_1": metrics.get("top_1"), "eval_top_1": metrics.get("val_top_1"),
            "eval_top_5": metrics.get("val_top_5"), "images_per_sec": logger.steady_rate}


def _peak_lr(cfg):
  """--learning_rate, or Goyal et al.'s 0.1 per 256 images of an update."""
  return cfg.learning_rate or 0.1 * cfg.batch_size * cfg.accumulation_steps / 256


if __name__ == "__main__":
  training.start(recipe_flags.define_all, run)
