r"""Pre-trains a BERT-style encoder with a masked-language-model loss the way You et al.
2019 did at large batch: LAMB with warm-up and polynomial decay, mixed precision, tied
input/output embeddings, fused all-reduce with the sparse gradients in the plan.

Examples:
  # This machine: the tiny encoder on a generated corpus, 4 logical CPUs.
  python -m tools.make_fake_text --out_dir /tmp/fake_text
  python -m official_recipes.bert.main --model=tiny --data_dir=/tmp/fake_text \
      --train_steps=200 --batch_size=64 --num_devices=4 --model_dir=/tmp/bert
  # GPUs, LAMB's 64K phase 1 (with --accumulation_steps to reach the batch):
  python -m official_recipes.bert.main --model=bert_base --schedule_preset=lamb_64k_phase1 \
      --data_dir=/data/bert128 --model_dir=/ckpt/bert
  # Several hosts: the same command with --strategy=multi_worker (TF_CONFIG, Slurm, or
  # python -m tf_fusion.launch on one machine).

`run(flags_obj)` does the work and returns a stats dict; the last line printed is that
dict as JSON (`train_loss`, `sequences_per_sec`, ...).
"""

import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import logging
import keras
import tensorflow as tf

import tf_fusion
from official_recipes import callbacks as recipe_callbacks
from official_recipes import training
from official_recipes.bert import input_pipeline
from official_recipes.bert import model as bert_model
from official_recipes.bert import recipe_flags
from official_recipes.schedules import WarmupPolyDecay


def masked_lm_loss():
  """BERT's masked-LM loss: the cross-entropy at the masked positions weighted by the
  prediction weights (0 on padding slots) and divided by their sum. Keras's default
  reduction divides by every slot, padding included, which dilutes the loss and scales
  the gradient by the batch's fraction of real predictions. Under a strategy each
  replica divides by its own sum (as BERT's TPU code does per core)."""
  return keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                    reduction="mean_with_sample_weight")


def make_optimizer(cfg, learning_rate):
  """LAMB or AdamW (no decay on biases and LayerNorm; LAMB's trust ratio on all
  variables with --lamb_adapt_all), clipped by --global_clipnorm, loss-scaled for fp16."""
  accumulate = ({"gradient_accumulation_steps": cfg.accumulation_steps}
                if cfg.accumulation_steps > 1 else {})
  moments = dict(beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon,
                 global_clipnorm=cfg.global_clipnorm)
  if cfg.optimizer == "lamb":
    opt = tf_fusion.LAMB(learning_rate, weight_decay=cfg.weight_decay, **moments,
                         exclude_from_layer_adaptation=() if cfg.lamb_adapt_all else None,
                         **accumulate)
  else:
    opt = keras.optimizers.AdamW(learning_rate, weight_decay=cfg.weight_decay, **moments,
                                 **accumulate)
    opt.exclude_from_weight_decay(var_names=list(tf_fusion.optimizers.lamb.DEFAULT_EXCLUSIONS))
  return training.loss_scaled(cfg, opt)


def make_datasets(cfg, strategy, meta):
  """(train, validation or None, validation steps) as distributed datasets."""
  def fn(is_training, files):
    return lambda ctx: input_pipeline.dataset(
        files, meta, ctx.get_per_replica_batch_size(cfg.batch_size), cfg.predictions,
        is_training, input_context=ctx, seed=cfg.seed,
        skip_corrupt=cfg.skip_corrupt_records)
  files = input_pipeline.tfrecord_files(cfg.data_dir, True)
  if cfg.skip_corrupt_records:   # names and counts the damaged files in the log
    input_pipeline.count_examples(files, skip_corrupt=True)
  train = strategy.distribute_datasets_from_function(fn(True, files))
  if cfg.skip_eval:
    return train, None, 0
  files = input_pipeline.tfrecord_files(cfg.data_dir, False)
  steps = input_pipeline.count_examples(files, cfg.skip_corrupt_records) // cfg.batch_size
  if steps < 1:
    raise ValueError(f"The validation split has fewer sequences than one global batch "
                     f"(--batch_size={cfg.batch_size}); use --skip_eval.")
  return train, strategy.distribute_datasets_from_function(fn(False, files)), steps


def run(flags_obj):
  """Trains as the flags say; returns a dict of stats.

  Raises:
    ValueError: for input or settings that cannot work, naming them.
  """
  cfg = recipe_flags.resolve(flags_obj)
  return training.with_policy(cfg.dtype, _run, cfg)


def _run(cfg):
  start_time = time.perf_counter()
  training.seed(cfg)
  meta = input_pipeline.read_meta(cfg.data_dir)
  strategy = training.make_strategy(cfg)
  replicas = strategy.num_replicas_in_sync
  if cfg.batch_size % replicas:
    raise ValueError(f"--batch_size={cfg.batch_size} does not split over {replicas} "
                     "replicas.")
  if cfg.predictions > meta["seq_length"]:
    raise ValueError(f"--max_predictions={cfg.predictions} exceeds the corpus's "
                     f"sequence length {meta['seq_length']}.")
  train, validation, eval_steps = make_datasets(cfg, strategy, meta)
  out_dir = training.worker_dir(cfg.model_dir, strategy)
  model = _build(cfg, strategy, meta)
  backup, start_step = training.backup_and_restore(cfg, model, strategy, out_dir)
  total, loop = cfg.train_steps, min(cfg.checkpoint_steps, cfg.train_steps)
  if loop % cfg.steps_per_execution or (total - start_step) % cfg.steps_per_execution:
    raise ValueError(f"--steps_per_execution={cfg.steps_per_execution} must divide "
                     f"--checkpoint_steps ({loop}) and the steps left ({total - start_step}).")
  logging.info("%s encoder (%d parameters) on %d replicas, global batch %d sequences "
               "of %d tokens, steps %d..%d, peak lr %.4g", cfg.model, model.count_params(),
               replicas, cfg.batch_size, meta["seq_length"], start_step, total,
               cfg.learning_rate)
  logger, preemption, callbacks = training.callbacks(cfg, model, backup, total, 0, out_dir,
                                                     unit="sequences")
  history = {}
  if start_step < total:
    first = training.first_epoch(backup, start_step, loop)
    try:
      history = model.fit(train, epochs=first + math.ceil((total - start_step) / loop),
                          initial_epoch=first, steps_per_epoch=loop, callbacks=callbacks,
                          verbose=1).history
    except tf.errors.DataLossError as e:
      raise training.corrupt_data(e, cfg.data_dir, input_pipeline.tfrecord_files(
          cfg.data_dir, True), model, out_dir) from None
  metrics = {k: v[-1] for k, v in history.items()}
  if validation is not None:
    metrics.update({f"eval_{k}": v for k, v in model.evaluate(
        validation, steps=eval_steps, verbose=0, return_dict=True).items()})
  stats = _stats(cfg, model, strategy, meta, metrics, logger, start_step)
  stats.update(training.common_stats(model, strategy, logger, preemption, out_dir,
                                     start_time))
  return training.write_report(stats)


def _build(cfg, strategy, meta):
  """The encoder with its masked-LM head, compiled under `strategy`."""
  updates = max(1, cfg.train_steps // cfg.accumulation_steps)
  with strategy.scope():
    model = bert_model.build(cfg.model, meta["vocab_size"], cfg.dropout)
    if meta["seq_length"] > model.config.max_position:
      raise ValueError(f"The corpus's sequences ({meta['seq_length']} tokens) are longer "
                       f"than the encoder's {model.config.max_position} positions.")
    schedule = WarmupPolyDecay(cfg.learning_rate, round(cfg.warmup_proportion * updates),
                               updates, power=cfg.poly_power)
    model.compile(make_optimizer(cfg, schedule),
                  loss=masked_lm_loss(),
                  weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                      name="masked_accuracy")],
                  jit_compile=False, steps_per_execution=cfg.steps_per_execution)
  return model


def _stats(cfg, model, strategy, meta, metrics, logger, start_step):
  """The recipe's own figures of the run (training.common_stats adds the shared ones)."""
  ops = tf_fusion.fused_ops_of(strategy)
  plan = ops.last_plan if ops is not None else ()
  return {
      "model": cfg.model, "preset": cfg.model,   # "preset": the stats' old key
      "optimizer": cfg.optimizer,
      "cross_device_ops": cfg.cross_device_ops, "weight_update": cfg.weight_update,
      "num_replicas": strategy.num_replicas_in_sync,
      "global_batch_size": cfg.batch_size, "seq_length": meta["seq_length"],
      "dtype": cfg.dtype, "parameters": model.count_params(), "start_step": start_step,
      "final_step": recipe_callbacks.step_of(model), "total_steps": cfg.train_steps,
      "updates": recipe_callbacks.updates_of(model),
      "train_loss": metrics.get("loss"), "logged_losses": logger.losses,
      "train_masked_accuracy": metrics.get("masked_accuracy"),
      "eval_loss": metrics.get("eval_loss"),
      "eval_masked_accuracy": metrics.get("eval_masked_accuracy"),
      "sequences_per_sec": logger.steady_rate,
      # IndexedSlices gathered / densified (none under accumulation: Keras sums the
      # gradients into dense accumulators before they are reduced).
      "gathered": sum(p.tensor_count for p in plan if p.algorithm in tf_fusion.stats.GATHERS),
      "densified": sum(len(p.densified) for p in plan),
  }


if __name__ == "__main__":
  training.start(recipe_flags.define_all, run)
