"""Large-batch masked-LM accuracy on the generated language: does LAMB keep what a 32x
batch loses with AdamW?

You et al. 2019's claim (BERT with LAMB at batch 32K-64K matches the small-batch
baseline; AdamW does not scale there) in miniature, on a corpus that
tools/make_fake_text.py writes (no download). Every run trains the BERT recipe's
encoder (official_recipes/bert/model.py, a small config) with its input pipeline
(dynamic 80/10/10 masking) on 2 logical replicas through FusedAllReduce with FP16 on the
wire, for the same number of sequences:
  baseline      batch 32,   AdamW, warm-up + linear decay
  adamw_linear  batch 1024, AdamW, lr scaled linearly by 32, the same schedule
  lamb          batch 1024, tf_fusion.LAMB, warm-up + linear decay
It prints the validation masked-token accuracy (mean and spread over seeds), writes
JSON and a PNG of the curves.

Usage:
  python -m tools.large_batch_text --seeds 3 --first_seed 6 --out_dir out/large_batch_text
  # about 75 min on 2 cores; --only baseline,lamb leaves out the AdamW-linear run
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from tools import large_batch_lib  # noqa: E402

SMALL_BATCH = 32
LARGE_BATCH = 1024
VALIDATION_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The generated language of the experiment (tools/make_fake_text.py's arguments)."""
  vocab_size: int = 132
  seq_length: int = 16
  num_train: int = 16384
  num_validation: int = 2048
  max_predictions: int = 3


@dataclasses.dataclass(frozen=True)
class Run:
  """One training configuration of the experiment."""
  name: str
  batch: int
  optimizer: str          # "adamw" | "lamb"
  lr: float               # peak learning rate
  warmup_fraction: float = 0.1
  weight_decay: float = 0.01
  beta_2: float = 0.999


def default_runs(small=SMALL_BATCH, large=LARGE_BATCH, adamw_lr=1e-3, lamb_lr=2e-2,
                 large_warmup=0.3, lamb_beta_2=0.999):
  """The three runs of the table.

  The settings come from a small grid on seed 0 (LAMB masked accuracy): at 131072
  sequences, 128 steps, lr 0.01/0.02/0.03/0.1 gave 32.0/3.7/2.8/3.0%; at 262144, lr 0.01
  with 10% warm-up 80.5%, lr 0.02 with 30% warm-up 87.1% (with 40%/50% warm-up
  87.0/87.2%, lr 0.015/0.025/0.03 85.9/87.0/85.8%, beta_2 0.99/0.95 86.7/86.9%: a
  plateau, the baseline 87.7%). At 524288 sequences, 512 steps, the same settings gave
  88.9% against the baseline's 88.1%. Seeds from 3 on are held out for the table.
  """
  scale = large / small
  return [
      Run("baseline", small, "adamw", adamw_lr),
      Run("adamw_linear", large, "adamw", adamw_lr * scale, warmup_fraction=large_warmup),
      Run("lamb", large, "lamb", lamb_lr, warmup_fraction=large_warmup, beta_2=lamb_beta_2),
  ]


def encoder_config(corpus):
  """The tiny preset's shape, sized to the corpus, no dropout (few updates at 1024)."""
  from official_recipes.bert import model  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(model.PRESETS["tiny"], max_position=corpus.seq_length,
                             vocab_size=corpus.vocab_size, dropout=0.0)


def write_corpus(corpus, out_dir):
  """The corpus's files under out_dir (written once; the language's seed is fixed)."""
  from tools import make_fake_text  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(out_dir, "meta.json")):
    make_fake_text.make(out_dir, corpus.vocab_size, corpus.seq_length, corpus.num_train,
                        corpus.num_validation, train_shards=1, validation_shards=1,
                        seed=0, log=lambda line: None)
  return out_dir


def _optimizer(run, schedule):
  import keras  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  if run.optimizer == "lamb":
    return tf_fusion.LAMB(schedule, beta_2=run.beta_2, weight_decay=run.weight_decay)
  opt = keras.optimizers.AdamW(schedule, weight_decay=run.weight_decay, beta_2=run.beta_2,
                               epsilon=1e-6)
  opt.exclude_from_weight_decay(var_names=list(tf_fusion.optimizers.lamb.DEFAULT_EXCLUSIONS))
  return opt


def train(run, seed, data_dir, corpus, sequences, evals, devices, compression="fp16",
          steps_per_execution=1):
  """Trains one run on `sequences` sequences; returns {"masked_accuracy": [per eval],
  "final_accuracy", "steps", "seconds", ...}."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from official_recipes.bert import input_pipeline  # pylint: disable=g-import-not-at-top
  from official_recipes.bert import model as bert_model  # pylint: disable=g-import-not-at-top
  from official_recipes import schedules  # pylint: disable=g-import-not-at-top

  if sequences % (run.batch * evals):
    raise ValueError(f"sequences={sequences} is not a multiple of batch {run.batch} x "
                     f"{evals} evaluations.")
  total = sequences // run.batch
  meta = input_pipeline.read_meta(data_dir)
  schedule = schedules.WarmupPolyDecay(run.lr, int(run.warmup_fraction * total), total,
                                       power=1.0)
  ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(compression=compression))
  strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
  with strategy.scope():
    keras.utils.set_random_seed(seed)
    model = bert_model.build(encoder_config(corpus))
    model.compile(_optimizer(run, schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(
                      name="masked_accuracy")],
                  steps_per_execution=steps_per_execution)
  make = lambda is_training, batch: input_pipeline.dataset(
      input_pipeline.tfrecord_files(data_dir, is_training), meta, batch,
      corpus.max_predictions, is_training, seed=seed)
  # Repeated: Keras keeps one validation iterator across epochs when validation_steps
  # is given, and a finite one would be exhausted after the first evaluation.
  validation = make(False, VALIDATION_BATCH).repeat()
  start = time.perf_counter()
  history = model.fit(make(True, run.batch), epochs=evals, steps_per_epoch=total // evals,
                      validation_data=validation,
                      validation_steps=corpus.num_validation // VALIDATION_BATCH, verbose=0)
  seconds = time.perf_counter() - start
  accuracy = [float(a) for a in history.history["val_masked_accuracy"]]
  return {"run": run.name, "seed": seed, "masked_accuracy": accuracy,
          "final_accuracy": accuracy[-1], "final_loss": float(history.history["loss"][-1]),
          "steps": total, "seconds": seconds}


def summarize(results, runs):
  """Rows: run, batch, optimizer, lr, steps, the final accuracy over seeds."""
  return large_batch_lib.summarize(results, runs, ("batch", "optimizer", "lr"))


def format_table(rows):
  return large_batch_lib.format_table(
      rows, [("batch", "batch"), ("optimizer", "optimizer"), ("peak lr", "lr")],
      "masked acc")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--first_seed", type=int, default=6,
                      help="seed 0 chose the settings; 3-5 were held out at 262144 "
                           "sequences, 6-8 at 524288")
  parser.add_argument("--sequences", type=int, default=524288,
                      help="sequences every run trains on (a multiple of 1024 x --evals); "
                           "32 passes over the corpus, 512 steps at batch 1024")
  parser.add_argument("--evals", type=int, default=8, help="validations per run")
  parser.add_argument("--replicas", type=int, default=2,
                      help="2: on 2 cores, 4 replicas of batch 8 cost 3x more per step")
  parser.add_argument("--adamw_lr", type=float, default=1e-3,
                      help="baseline lr; adamw_linear uses it times 1024/32")
  parser.add_argument("--lamb_lr", type=float, default=2e-2)
  parser.add_argument("--large_warmup", type=float, default=0.3,
                      help="warm-up fraction of the two batch-1024 runs (baseline: 0.1)")
  parser.add_argument("--lamb_beta_2", type=float, default=0.999,
                      help="LAMB's second-moment decay")
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--data_dir", default=None,
                      help="where the corpus is written (default: a temporary directory)")
  parser.add_argument("--out_dir", default="out/large_batch_text")
  args = parser.parse_args(argv)

  devices = large_batch_lib.logical_cpus(args.replicas)
  runs = large_batch_lib.select(parser, default_runs(
      adamw_lr=args.adamw_lr, lamb_lr=args.lamb_lr, large_warmup=args.large_warmup,
      lamb_beta_2=args.lamb_beta_2), args.only)
  corpus = Corpus()
  os.makedirs(args.out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = write_corpus(corpus, args.data_dir or tmp)
    results = large_batch_lib.run_all(
        runs, range(args.first_seed, args.first_seed + args.seeds),
        lambda run, seed: train(run, seed, data_dir, corpus, args.sequences, args.evals,
                                devices), "masked accuracy")
  rows = summarize(results, runs)
  print(format_table(rows))
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"args": vars(args), "corpus": dataclasses.asdict(corpus), "rows": rows,
               "runs": results}, f, indent=1)
  large_batch_lib.plot(results, runs, "masked_accuracy",
                       os.path.join(args.out_dir, "curves.png"),
                       "fraction of training (same sequences for every run)",
                       "validation masked-token accuracy, % (mean over seeds)",
                       fraction=True)
  print(f"wrote {args.out_dir}/results.json and curves.png")
  return rows


if __name__ == "__main__":
  main()
