"""Large-batch accuracy on scikit-learn's digits: does LARS keep what a 32x batch loses?

The paper's claim (Jia et al. 2018, §3; You et al. 2017) in miniature, on data that ships
with scikit-learn (no download). Every run trains the same MLP with batch norm on
4 logical replicas through FusedAllReduce with FP16 on the wire, for the same number of
samples ("epochs"):
  baseline     batch 32,   SGD + momentum, FP32
  sgd_linear   batch 1024, SGD + momentum, lr scaled linearly by 32, no warm-up
  lars         batch 1024, LARS + linear warm-up + poly(2) decay
the large-batch runs in FP32 and in mixed_float16 (dynamic loss scaling, loss-scaled FP16
wire). It prints test accuracy (mean and spread over seeds), writes JSON and a PNG of the
test-accuracy curves.

Usage:
  python -m tools.large_batch_digits --seeds 3 --out_dir out/large_batch_digits
"""

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top

from tools import large_batch_lib  # noqa: E402

SMALL_BATCH = 32
LARGE_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Run:
  """One training configuration of the experiment."""
  name: str
  batch: int
  optimizer: str       # "sgd" | "lars"
  lr: float            # peak learning rate
  warmup_fraction: float
  policy: str          # "float32" | "mixed_float16"
  eta: float = 0.001   # LARS trust coefficient
  weight_decay: float = 1e-4   # LARS only


def default_runs(small=SMALL_BATCH, large=LARGE_BATCH, sgd_lr=0.1, lars_lr=1.0,
                 lars_eta=0.01):
  """The five runs of the table.

  The learning rates come from small grids on seeds 0-2 (README lists them); the table in
  README is measured on seeds 3-5, which took no part in the choice.
  """
  scale = large / small
  return [
      Run("baseline", small, "sgd", sgd_lr, 0.0, "float32"),
      Run("sgd_linear", large, "sgd", sgd_lr * scale, 0.0, "float32"),
      Run("sgd_linear_mixed", large, "sgd", sgd_lr * scale, 0.0, "mixed_float16"),
      Run("lars", large, "lars", lars_lr, 0.1, "float32", eta=lars_eta),
      Run("lars_mixed", large, "lars", lars_lr, 0.1, "mixed_float16", eta=lars_eta),
  ]


def load_data():
  """Digits scaled to [0, 1]: a fixed stratified 80/20 split (1437 train, 360 test)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  return model_selection.train_test_split(x, y.astype(np.int32), test_size=0.2,
                                          stratify=y, random_state=0)


def build_model(keras):
  """64 -> 128 -> BN -> ReLU -> 128 -> BN -> ReLU -> 10; logits in float32.

  BN moving averages use momentum 0.9, not Keras's 0.99: a 1024 batch gets only ~100
  steps here, and at 0.99 the test-time statistics would still be 30% initial values.
  """
  layers = keras.layers
  return keras.Sequential([
      keras.Input((64,)),
      layers.Dense(128, use_bias=False), layers.BatchNormalization(momentum=0.9),
      layers.ReLU(),
      layers.Dense(128, use_bias=False), layers.BatchNormalization(momentum=0.9),
      layers.ReLU(),
      layers.Dense(10),
      layers.Activation("linear", dtype="float32"),
  ])


def train(run, seed, data, epochs, samples_per_epoch, devices, compression="fp16"):
  """Trains one run; returns {"test_accuracy": [per epoch], "seconds": ..., ...}."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from official_recipes import schedules  # pylint: disable=g-import-not-at-top

  x_train, x_test, y_train, y_test = data
  if samples_per_epoch % run.batch:
    raise ValueError(f"samples_per_epoch={samples_per_epoch} is not a multiple of "
                     f"batch {run.batch}.")
  steps_per_epoch = samples_per_epoch // run.batch
  total = steps_per_epoch * epochs
  schedule = schedules.WarmupPolyDecay(run.lr, int(run.warmup_fraction * total), total)
  ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(compression=compression))
  strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
  tf_fusion.mixed_precision.set_policy(run.policy)
  try:
    with strategy.scope():
      keras.utils.set_random_seed(seed)
      model = build_model(keras)
      if run.optimizer == "lars":
        opt = tf_fusion.LARS(schedule, momentum=0.9, weight_decay=run.weight_decay,
                             eta=run.eta)
      else:
        opt = keras.optimizers.SGD(schedule, momentum=0.9)
      model.compile(tf_fusion.mixed_precision.optimizer_for_policy(opt, run.policy),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
          .shuffle(len(x_train), seed=seed).repeat().batch(run.batch, drop_remainder=True)
          .prefetch(2))
    start = time.perf_counter()
    history = model.fit(ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        validation_data=(x_test, y_test), validation_batch_size=120,
                        verbose=0)
    seconds = time.perf_counter() - start
  finally:
    tf_fusion.mixed_precision.set_policy("float32")
  accuracy = [float(a) for a in history.history["val_accuracy"]]
  return {"run": run.name, "seed": seed, "test_accuracy": accuracy,
          "final_accuracy": accuracy[-1], "steps": total, "seconds": seconds,
          "final_loss_scale": (float(model.optimizer.dynamic_scale.numpy())
                               if hasattr(model.optimizer, "dynamic_scale") else None)}


def summarize(results, runs):
  """Rows: run, batch, optimizer, precision, lr, steps, the final accuracy over seeds."""
  return large_batch_lib.summarize(results, runs, ("batch", "optimizer", "policy", "lr"))


def format_table(rows):
  return large_batch_lib.format_table(
      rows, [("batch", "batch"), ("optimizer", "optimizer"), ("precision", "policy"),
             ("peak lr", "lr")], "test acc")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--first_seed", type=int, default=3,
                      help="seeds 0-2 chose the learning rates; 3 on are held out")
  parser.add_argument("--epochs", type=int, default=30,
                      help="epochs of --samples_per_epoch samples each")
  parser.add_argument("--samples_per_epoch", type=int, default=4096,
                      help="a multiple of both batch sizes (4096 is 2.85 passes)")
  parser.add_argument("--replicas", type=int, default=4)
  parser.add_argument("--sgd_lr", type=float, default=0.1,
                      help="baseline lr; sgd_linear uses it times 1024/32")
  parser.add_argument("--lars_lr", type=float, default=1.0)
  parser.add_argument("--lars_eta", type=float, default=0.01)
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--out_dir", default="out/large_batch_digits")
  args = parser.parse_args(argv)

  devices = large_batch_lib.logical_cpus(args.replicas)
  runs = large_batch_lib.select(parser, default_runs(
      sgd_lr=args.sgd_lr, lars_lr=args.lars_lr, lars_eta=args.lars_eta), args.only)
  data = load_data()
  os.makedirs(args.out_dir, exist_ok=True)
  results = large_batch_lib.run_all(
      runs, range(args.first_seed, args.first_seed + args.seeds),
      lambda run, seed: train(run, seed, data, args.epochs, args.samples_per_epoch,
                              devices), "test accuracy")
  rows = summarize(results, runs)
  table = format_table(rows)
  print(table)
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"args": vars(args), "rows": rows, "runs": results}, f, indent=1)
  large_batch_lib.plot(results, runs, "test_accuracy",
                       os.path.join(args.out_dir, "curves.png"),
                       "epoch (same samples for every run)",
                       "test accuracy, % (mean over seeds)", ylim=(50, 100))
  print(f"wrote {args.out_dir}/results.json and curves.png")
  return rows


if __name__ == "__main__":
  main()
