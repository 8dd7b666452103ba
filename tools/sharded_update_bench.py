"""The sharded weight update against the replicated one: memory and step time.

  python -m tools.sharded_update_bench memory        # 33.6M-parameter MLP, Adam, 4 replicas
  python -m tools.sharded_update_bench step          # BERT-base masked LM, LAMB, 4 replicas
  python -m tools.sharded_update_bench memory --reps 3 --devices 4

Each run is a fresh process (peak memory is a process's: VmHWM in /proc/self/status),
on --devices logical CPU replicas; the two sides alternate (A B, B A, ...) and the table
gives medians:
- memory: an MLP of two 4096 x 4096 layers (33.6M parameters) trained a few steps with
  Adam (two FP32 moments per weight): each side's peak memory and the elements of
  optimizer state each replica holds;
- step: the BERT recipe's bert_base (110M parameters) with LAMB, a few steps at a small
  batch, where the update is a large share of the step: seconds per step (the median of
  the steps after the first, which traces) and peak memory.
Writes sharded_update_bench.json to --out_dir.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from tools import bench_lib

SIDES = ("replicated", "sharded")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("memory", "step"))
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--out_dir", default="out/sharded_update_bench")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def peak_bytes():
  """This process's peak resident memory (VmHWM), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(side, devices, steps):
  """One side of the memory run, in this process; its result."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import shard_state  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  names = tf_fusion.strategy.logical_cpu_devices(devices)
  strategy = tf_fusion.mirrored_strategy(names, tf_fusion.FusionOptions(
      algorithm="reduce_to_one", weight_update=side))
  width = 4096
  with strategy.scope():
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width),
                              keras.layers.Dense(width)])
    model.compile(keras.optimizers.Adam(1e-4), loss="mse")
  x = np.random.RandomState(0).randn(8 * devices, width).astype(np.float32)
  start = time.perf_counter()
  model.fit(x, x, batch_size=2 * devices, epochs=1, steps_per_epoch=steps, verbose=0)
  state = shard_state.of(model.optimizer)
  params = model.count_params()
  per_replica = (state.state_elements() if state is not None else [params] * devices)
  return dict(side=side, parameters=params, peak_bytes=peak_bytes(),
              state_elements_per_replica=per_replica,
              seconds=time.perf_counter() - start, tensorflow=tf.__version__)


def step_child(side, devices, steps):
  """One side of the BERT-base LAMB run: the recipe's stats and this process's peak."""
  from official_recipes.bert import main as bert_main  # pylint: disable=g-import-not-at-top
  from official_recipes.bert import recipe_flags  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tools import train_bench  # pylint: disable=g-import-not-at-top
  model_dir = tempfile.mkdtemp(prefix=f"sharded_update_bench_{side}_")
  fv = flags.FlagValues()
  recipe_flags.define_all(fv)
  fv(["main", "--model=bert_base", f"--data_dir={train_bench.text_corpus()}",
      f"--batch_size={2 * devices}", f"--train_steps={steps}", "--log_steps=1",
      f"--num_devices={devices}", f"--weight_update={side}", "--skip_eval",
      f"--checkpoint_steps={10 * steps}", "--stall_seconds=0", "--seed=1",
      f"--model_dir={model_dir}"])
  stats = bert_main.run(fv)
  return dict(side=side, peak_bytes=peak_bytes(), parameters=stats.get("parameters"),
              sequences_per_sec=stats.get("sequences_per_sec"),
              step_seconds=stats.get("step_seconds"), train_loss=stats.get("train_loss"))


def run_child(what, side, devices, steps):
  """One fresh process for one side; its JSON result."""
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out = f.name
  env = dict(os.environ, PYTHONPATH=bench_lib.ROOT, TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-m", "tools.sharded_update_bench", what, f"--devices={devices}",
       f"--steps={steps}", f"--child={side}:{out}"],
      cwd=bench_lib.ROOT, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{what} {side} failed (exit {proc.returncode}):\n"
                       f"{(proc.stdout + proc.stderr)[-3000:]}")
  with open(out) as f:
    return json.load(f)


def summarize(what, runs):
  rows = {}
  for side in SIDES:
    mine = [r for r in runs if r["side"] == side]
    row = dict(peak_mb=statistics.median(r["peak_bytes"] for r in mine) / 2**20,
               runs_mb=[round(r["peak_bytes"] / 2**20) for r in mine])
    if what == "memory":
      row["state_elements_per_replica"] = mine[0]["state_elements_per_replica"]
      row["parameters"] = mine[0]["parameters"]
    else:
      rates = [r["sequences_per_sec"] for r in mine if r["sequences_per_sec"]]
      row["sequences_per_sec"] = statistics.median(rates) if rates else None
      row["runs_sequences_per_sec"] = rates
    rows[side] = row
  rows["peak_saved_mb"] = rows["replicated"]["peak_mb"] - rows["sharded"]["peak_mb"]
  if what == "step" and rows["replicated"]["sequences_per_sec"]:
    rows["speedup"] = (rows["sharded"]["sequences_per_sec"]
                       / rows["replicated"]["sequences_per_sec"])
  return rows


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.child:
    side, out = args.child.split(":", 1)
    fn = memory_child if args.what == "memory" else step_child
    result = fn(side, args.devices, args.steps)
    with open(out, "w") as f:
      json.dump(result, f)
    return result
  runs = []
  for rep in range(args.reps):
    for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
      result = run_child(args.what, side, args.devices, args.steps)
      runs.append(result)
      print(f"[{rep + 1}/{args.reps}] {side:10s} peak {result['peak_bytes'] / 2**20:8.0f} MB"
            + (f", {result['sequences_per_sec']:.2f} sequences/s"
               if result.get("sequences_per_sec") else ""), flush=True)
  summary = summarize(args.what, runs)
  report = dict(args=vars(args), runs=runs, summary=summary)
  path = os.path.join(args.out_dir, "sharded_update_bench.json")
  bench_lib.write_json(report, path)
  print(json.dumps(summary, indent=1))
  print(f"wrote {path}")
  return report


if __name__ == "__main__":
  main()
