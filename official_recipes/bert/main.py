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

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import keras

import tf_fusion
from official_recipes import runner
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
  """Trains as the flags say; returns the stats (ValueError for input or settings that
  cannot work, naming them)."""
  return runner.run(BertTask(), recipe_flags.resolve(flags_obj))


class BertTask:
  """The recipe's part of a run (runner.Task): a masked-LM corpus, --train_steps in
  Keras epochs of --checkpoint_steps, the encoder with its masked-LM head and LAMB (or
  AdamW), evaluated once at the end."""

  def data(self, cfg, strategy) -> runner.Data:
    meta = input_pipeline.read_meta(cfg.data_dir)
    if cfg.predictions > meta["seq_length"]:
      raise ValueError(f"--max_predictions={cfg.predictions} exceeds the corpus's "
                       f"sequence length {meta['seq_length']}.")
    train, validation, eval_steps = make_datasets(cfg, strategy, meta)
    return runner.Data(train, validation, cfg.train_steps,
                       min(cfg.checkpoint_steps, cfg.train_steps), eval_steps,
                       evaluate_in_fit=False,
                       train_files=input_pipeline.tfrecord_files(cfg.data_dir, True),
                       unit="sequences", meta=meta)

  def build(self, cfg, strategy, data: runner.Data) -> keras.Model:
    """The encoder with its masked-LM head, compiled under `strategy`."""
    meta = data.meta
    updates = max(1, cfg.train_steps // cfg.accumulation_steps)
    with strategy.scope():
      model = bert_model.build(cfg.model, meta["vocab_size"], cfg.dropout)
      if meta["seq_length"] > model.config.max_position:
        raise ValueError(f"The corpus's sequences ({meta['seq_length']} tokens) are "
                         f"longer than the encoder's {model.config.max_position} "
                         "positions.")
      schedule = WarmupPolyDecay(cfg.learning_rate, round(cfg.warmup_proportion * updates),
                                 updates, power=cfg.poly_power)
      model.compile(make_optimizer(cfg, schedule),
                    loss=masked_lm_loss(),
                    weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                        name="masked_accuracy")],
                    jit_compile=False, steps_per_execution=cfg.steps_per_execution)
    return model

  def describe(self, cfg, model, strategy, data, start_step) -> str:
    return (f"{cfg.model} encoder ({model.count_params()} parameters) on "
            f"{strategy.num_replicas_in_sync} replicas, global batch {cfg.batch_size} "
            f"sequences of {data.meta['seq_length']} tokens, steps {start_step}.."
            f"{data.total}, peak lr {cfg.learning_rate:.4g}")

  def stats(self, cfg, model, strategy, data, metrics, logger) -> dict:
    ops = tf_fusion.fused_ops_of(strategy)
    plan = ops.last_plan if ops is not None else ()
    return {
        "preset": cfg.model,   # the stats' old key of "model"
        "optimizer": cfg.optimizer, "seq_length": data.meta["seq_length"],
        "parameters": model.count_params(), "logged_losses": logger.losses,
        "train_masked_accuracy": metrics.get("masked_accuracy"),
        "eval_masked_accuracy": metrics.get("val_masked_accuracy"),
        "sequences_per_sec": logger.steady_rate,
        # IndexedSlices gathered / densified (none under accumulation: Keras sums the
        # gradients into dense accumulators before they are reduced).
        "gathered": sum(p.tensor_count for p in plan
                        if p.algorithm in tf_fusion.stats.GATHERS),
        "densified": sum(len(p.densified) for p in plan),
    }


if __name__ == "__main__":
  training.start(recipe_flags.define_all, run)
