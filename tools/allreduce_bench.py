"""All-reduce benchmark: TF's built-ins against tf_fusion, side by side in one process.

Reduces the gradients of the ImageNet recipe's ResNet-50 and AlexNet-BN across logical
CPU replicas, the way Keras does it (strategy.extended.batch_reduce_to inside a
tf.function), and prints median/min/max per configuration with ratios to the best TF
built-in and to the floor (one pre-packed buffer of the same bytes through the fastest
algorithm), and the CPU seconds each all-reduce costs this process: on CPU replicas a
collective is copies, sums and loopback gRPC on the cores the step computes on, so what
overlap can hide is its latency, not its CPU. Writes JSON and a PNG bar chart to
--out_dir.

  python -m tools.allreduce_bench --devices 4 --reps 10 --out_dir out/allreduce_bench

The "sharded exchange" rows are the communication of the sharded weight update
(FusionOptions(weight_update="sharded")) on the same dense gradients: packed as its
layout packs them, reduce-scattered, and the blocks all-gathered back into every
replica's tensors, so every replica ends with what an all-reduce gives it (the update
between the two halves is left out).

With --workers N: N worker processes on 127.0.0.1 (tf_fusion.launch) with --devices
logical CPUs each, MultiWorkerMirroredStrategy; TF's CollectiveAllReduce at several
bytes_per_pack against tf_fusion's ring / hierarchical / auto, and the wire limit
2(W-1)/W * S / B for S bytes of float32 gradients, W workers and the loopback bandwidth
B: the least time any algorithm needs to move the bytes between workers.

  python -m tools.allreduce_bench --workers 2 --devices 2 --reps 5
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

from tools import bench_lib

MIB = bench_lib.MIB


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sets", default="resnet50,alexnet_bn",
                 help=f"comma-separated gradient sets: {', '.join(bench_lib.SETS)}")
  p.add_argument("--devices", type=int, default=4,
                 help="replicas: logical CPUs, or the first N GPUs with --device_type=gpu")
  p.add_argument("--device_type", default="cpu", choices=("cpu", "gpu"))
  p.add_argument("--reps", type=int, default=10, help="timed repetitions per config")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls (the first traces)")
  p.add_argument("--only", default="", help="comma-separated config names to run")
  p.add_argument("--out_dir", default="out/allreduce_bench")
  p.add_argument("--workers", type=int, default=1,
                 help="> 1: multi-process mode, workers on 127.0.0.1")
  p.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = set(args.sets.split(",")) - set(bench_lib.SETS)
  if unknown:
    p.error(f"unknown --sets {sorted(unknown)}; valid: {', '.join(bench_lib.SETS)}")
  if args.workers < 1 or args.reps < 1 or args.devices < (2 if args.workers == 1 else 1):
    p.error("need --workers >= 1, --reps >= 1, and --devices >= 2 (>= 1 with "
            "several workers)")
  return args


def _builtin(cross_device_ops=None, options=None):
  def make(devices, cost_model):
    del cost_model
    import tf_fusion  # pylint: disable=g-import-not-at-top
    # Each with collective keys of its own: TF's strategies in one process would share.
    return tf_fusion.strategy.tf_mirrored_strategy(devices, cross_device_ops), options
  return make


def _fused(**option_kwargs):
  def make(devices, cost_model):
    import tf_fusion  # pylint: disable=g-import-not-at-top
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(**option_kwargs),
                                   cost_model=cost_model)
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops), None
  return make


def configs(sparse=False):
  """(name, kind, factory); kind "builtin", "fused", "per_tensor" or "floor". With
  `sparse` (a set with IndexedSlices), tf_fusion's auto fp16 also forcing each way."""
  bpp = lambda n: tf.distribute.experimental.CommunicationOptions(bytes_per_pack=n)
  out = [
      ("per_tensor (ring; no fusion)", "per_tensor",
       _fused(algorithm="ring", pack_bytes=1, first_pack_bytes=0)),
      ("tf MirroredStrategy default", "builtin", _builtin()),
      ("tf ReductionToOneDevice", "builtin", _builtin(tf.distribute.ReductionToOneDevice())),
      ("tf HierarchicalCopyAllReduce", "builtin",
       _builtin(tf.distribute.HierarchicalCopyAllReduce())),
      ("tf CollectiveAllReduce bpp=0", "builtin", _builtin(options=bpp(0))),
      ("tf CollectiveAllReduce bpp=4MB", "builtin", _builtin(options=bpp(4 * MIB))),
      ("tf CollectiveAllReduce bpp=64MB", "builtin", _builtin(options=bpp(64 * MIB))),
  ]
  for algorithm in ("ring", "reduce_to_one", "auto"):
    for compression in ("none", "fp16", "bf16"):
      out.append((f"tf_fusion {algorithm} {compression}", "fused",
                  _fused(algorithm=algorithm, compression=compression)))
  if sparse:
    for compression in ("none", "fp16"):
      for option in ("gather", "dense"):
        out.append((f"tf_fusion auto {compression} sparse={option}", "fused",
                    _fused(algorithm="auto", compression=compression, sparse=option)))
  if not sparse:
    out.append(("tf_fusion sharded exchange", "sharded",
                lambda devices, _: bench_lib.sharded_exchange(devices)))
  for algorithm in ("ring", "reduce_to_one"):
    out.append((f"floor: one pre-packed buffer ({algorithm})", "floor",
                _fused(algorithm=algorithm, pack_bytes=0, first_pack_bytes=0)))
  return out


def run_set(set_name, devices, args, cost_model, selected):
  import tf_fusion  # pylint: disable=g-import-not-at-top
  shapes = bench_lib.gradient_set(set_name)
  total = sum(bench_lib.num_elements(s) for s in shapes)
  print(f"\n== {set_name}: {bench_lib.describe(shapes)}, {len(devices)} replicas",
        flush=True)
  rows = []
  harness = {}
  sparse = any(isinstance(s, bench_lib.Sparse) for s in shapes)
  for name, kind, factory in configs(sparse):
    if selected and name not in selected:
      continue
    strategy, options = factory(devices, cost_model)
    layout = [(total,)] if kind == "floor" else shapes
    grads = bench_lib.per_replica(strategy, layout, 1)
    if (kind == "floor") not in harness:
      harness[kind == "floor"] = _harness_ms(strategy, grads, args)
    reduce = options if kind == "sharded" else (
        lambda pairs, s=strategy, o=options: s.extended.batch_reduce_to("SUM", pairs,
                                                                        options=o))
    first, times, cpu = bench_lib.time_reduction(strategy, grads, reduce, args.reps,
                                                 args.warmup)
    ops = tf_fusion.fused_ops_of(strategy)
    row = bench_lib.result_row(name, kind, times, first,
                               ops.last_plan if ops is not None else None,
                               harness_ms=harness[kind == "floor"], cpu_ms=1e3 * cpu)
    rows.append(row)
    print(f"  {name:42s} median {row['median_ms']:8.1f} ms  (first call "
          f"{first:5.1f} s)  {bench_lib.plan_text(row)}", flush=True)
  return dict(set=set_name, description=bench_lib.describe(shapes), rows=rows)


def _harness_ms(strategy, grads, args):
  """Median ms of the timed step with no reduction at all: the same values made on the
  replicas and the same outputs handed back. 161 tensors cost more of this than one
  pre-packed buffer; `x own floor` takes it out of both sides."""
  _, times, _ = bench_lib.time_reduction(strategy, grads, lambda pairs: [v for v, _ in pairs],
                                      args.reps, args.warmup)
  return 1e3 * float(np.median(times))


def _own_floor(row, floors):
  """The floor of the row's algorithm (its one pre-packed buffer), else the fastest."""
  for algorithm, floor in floors.items():
    if row["config"].startswith(f"tf_fusion {algorithm} ") or row["config"] == floor["config"]:
      return floor
  return min(floors.values(), key=lambda r: r["median_ms"], default=None)


def add_ratios(result):
  rows = result["rows"]
  best = min((r for r in rows if r["kind"] == "builtin"), key=lambda r: r["median_ms"],
             default=None)
  floor = min((r for r in rows if r["kind"] == "floor"), key=lambda r: r["median_ms"],
              default=None)
  per_tensor = next((r for r in rows if r["kind"] == "per_tensor"), None)
  result["best_builtin"] = best and best["config"]
  result["floor"] = floor and floor["config"]
  floors = {r["config"][r["config"].index("(") + 1:-1]: r for r in rows if r["kind"] == "floor"}
  for r in rows:
    r["x_best_builtin"] = best and r["median_ms"] / best["median_ms"]
    r["x_floor"] = floor and r["median_ms"] / floor["median_ms"]
    own = _own_floor(r, floors)
    r["x_own_floor"] = own and ((r["median_ms"] - r["harness_ms"])
                                / (own["median_ms"] - own["harness_ms"]))
    r["speedup_vs_per_tensor"] = per_tensor and per_tensor["median_ms"] / r["median_ms"]
  return result


def print_table(result):
  print(f"\n{result['set']} ({result['description']}); best built-in: "
        f"{result['best_builtin']}; floor: {result['floor']}")
  print(f"{'config':44s} {'median':>8s} {'min':>8s} {'max':>8s} {'CPU ms':>7s} "
        f"{'harness':>8s} {'x best TF':>9s} {'x floor':>8s} {'x own floor':>11s} {'vs per-tensor':>13s}  plan")
  fmt = lambda v, spec: format(v, spec) if v is not None else "-"
  for r in result["rows"]:
    print(f"{r['config']:44s} {r['median_ms']:8.1f} {r['min_ms']:8.1f} {r['max_ms']:8.1f} "
          f"{r['cpu_ms']:7.1f} {r['harness_ms']:8.1f} {fmt(r['x_best_builtin'], '9.2f')} "
          f"{fmt(r['x_floor'], '8.2f')} {fmt(r.get('x_own_floor'), '11.2f')} "
          f"{fmt(r['speedup_vs_per_tensor'], '12.1f')}x  {bench_lib.plan_text(r)}")


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
  colors = {"builtin": "tab:gray", "fused": "tab:blue", "per_tensor": "tab:red",
            "floor": "tab:green", "sharded": "tab:purple"}
  for ax, result in zip(axes[0], results):
    rows = result["rows"]
    y = np.arange(len(rows))
    med = [r["median_ms"] for r in rows]
    err = [[r["median_ms"] - r["min_ms"] for r in rows],
           [r["max_ms"] - r["median_ms"] for r in rows]]
    ax.barh(y, med, xerr=err, color=[colors[r["kind"]] for r in rows])
    ax.set_yticks(y, [r["config"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per batch all-reduce (median, min-max)")
    ax.set_title(f"{result['set']}: {result['description']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# --- several workers ------------------------------------------------------------------

def multi_worker_configs(sparse=False):
  """(name, kind, options for tf_fusion or bytes_per_pack for TF); with `sparse`, auto
  fp16 forcing each FusionOptions.sparse way too."""
  out = [("tf MWMS default (bpp=0)", "builtin", 0),
         ("tf MWMS bpp=4MB", "builtin", 4 * MIB),
         ("tf MWMS bpp=64MB", "builtin", 64 * MIB),
         ("per_tensor (ring; no fusion)", "per_tensor",
          dict(algorithm="ring", pack_bytes=1, first_pack_bytes=0))]
  for algorithm in ("ring", "hierarchical", "auto"):
    for compression in ("none", "fp16", "bf16"):
      out.append((f"tf_fusion {algorithm} {compression}", "fused",
                  dict(algorithm=algorithm, compression=compression)))
  if sparse:
    for compression in ("none", "fp16"):
      for option in ("gather", "dense"):
        out.append((f"tf_fusion auto {compression} sparse={option}", "fused",
                    dict(algorithm="auto", compression=compression, sparse=option)))
  return out


def worker_main(args):
  """Inside one worker (TF_CONFIG set by the launcher): measure; worker 0 writes JSON."""
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import algorithms  # pylint: disable=g-import-not-at-top

  strategy = tf_fusion.multi_worker_strategy(
      tf_fusion.FusionOptions(timeout_seconds=600), devices_per_worker=args.devices)
  workers = tf_fusion.strategy.num_workers(strategy)
  tf_ops = tf_fusion.fused_ops_of(strategy).tf_ops
  devices = strategy.extended.worker_devices
  task = strategy.cluster_resolver.task_id
  start = time.perf_counter()
  cost_model = tf_fusion.calibrate(devices, algorithms.MULTI_WORKER_ALGORITHMS,
                                   group_size=len(devices) * workers, timeout_seconds=600)
  if task == 0:
    print(f"calibrated in {time.perf_counter() - start:.1f} s: alpha {cost_model.alpha}, "
          f"beta {cost_model.beta}", flush=True)
  selected = set(filter(None, args.only.split(",")))
  results = []
  for set_name in args.sets.split(","):
    shapes = bench_lib.gradient_set(set_name)
    grads = bench_lib.per_replica(strategy, shapes, seed=1)
    rows = []
    sparse = any(isinstance(s, bench_lib.Sparse) for s in shapes)
    for name, kind, setting in multi_worker_configs(sparse):
      if selected and name not in selected:
        continue
      if kind == "builtin":
        ops = tf_ops
        options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=setting)
      else:
        ops = tf_fusion.MultiWorkerFusedAllReduce(
            tf_fusion.FusionOptions(timeout_seconds=600, **setting), tf_ops, workers,
            cost_model=cost_model)
        options = None
      first, times, cpu = bench_lib.time_reduction(
          strategy, grads, lambda pairs, ops=ops, o=options: ops.batch_reduce(
              "SUM", pairs, options=o), args.reps, args.warmup)
      rows.append(bench_lib.result_row(name, kind, times, first,
                                       None if kind == "builtin" else ops.last_plan,
                                       cpu_ms=1e3 * cpu))
      if task == 0:
        print(f"  {set_name} {name:34s} median {rows[-1]['median_ms']:8.1f} ms, "
              f"{rows[-1]['cpu_ms']:7.1f} CPU ms on worker 0", flush=True)
    results.append(dict(set=set_name, description=bench_lib.describe(shapes),
                        fp32_bytes=sum(4 * bench_lib.num_elements(s) for s in shapes),
                        rows=rows))
  if task == 0:
    with open(args.worker_out, "w") as f:
      json.dump(dict(workers=workers, devices_per_worker=len(devices),
                     cost_model=json.loads(cost_model.to_json()), results=results), f)


def add_wire_ratios(result, workers, bandwidth):
  """Each row against TF's default and against the wire limit 2(W-1)/W * S / B."""
  rows = result["rows"]
  default = next(r for r in rows if r["config"].startswith("tf MWMS default"))
  limit_s = 2 * (workers - 1) / workers * result["fp32_bytes"] / bandwidth
  result["wire_limit_ms"] = 1e3 * limit_s
  for r in rows:
    r["x_faster_than_tf_default"] = default["median_ms"] / r["median_ms"]
    r["x_wire_limit"] = r["median_ms"] / result["wire_limit_ms"]
  return result


def print_multi_worker_table(result, workers, devices):
  print(f"\n{result['set']} ({result['description']}), {workers} workers x {devices} "
        f"devices; wire limit {result['wire_limit_ms']:.1f} ms")
  print(f"{'config':34s} {'median':>8s} {'min':>8s} {'max':>8s} {'CPU ms/worker':>13s} "
        f"{'TF default/this':>15s} {'x wire limit':>12s}  plan")
  for r in result["rows"]:
    print(f"{r['config']:34s} {r['median_ms']:8.1f} {r['min_ms']:8.1f} {r['max_ms']:8.1f} "
          f"{r['cpu_ms']:13.1f} {r['x_faster_than_tf_default']:15.2f} {r['x_wire_limit']:12.2f}  "
          f"{bench_lib.plan_text(r)}")


def multi_worker_main(args, argv):
  """Measures B, runs the workers with the same arguments, reports what worker 0 saw."""
  bandwidth = bench_lib.loopback_bandwidth()
  print(f"loopback TCP bandwidth B = {bandwidth / 1e9:.2f} GB/s", flush=True)
  tag = f"{args.workers}x{args.devices}"
  report = bench_lib.run_children(
      "tools.allreduce_bench", argv, args.workers, args.devices,
      os.path.abspath(os.path.join(args.out_dir, f"multi_worker_{tag}.raw.json")))
  report["loopback_bytes_per_s"] = bandwidth
  for result in report["results"]:
    add_wire_ratios(result, args.workers, bandwidth)
    print_multi_worker_table(result, args.workers, args.devices)
  path = bench_lib.write_json(report, os.path.join(args.out_dir, f"multi_worker_{tag}.json"))
  print(f"\nwrote {path}")
  return report


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.worker_out:
    return worker_main(args)
  if args.workers > 1:
    os.makedirs(args.out_dir, exist_ok=True)
    return multi_worker_main(args, argv)
  import tf_fusion  # pylint: disable=g-import-not-at-top
  if args.device_type == "gpu":
    devices = [d.name for d in tf.config.list_logical_devices("GPU")][:args.devices]
    if len(devices) < 2:
      raise SystemExit(f"--device_type=gpu needs >= 2 GPUs; this host has {len(devices)}.")
  else:
    devices = tf_fusion.strategy.logical_cpu_devices(args.devices)
  start = time.perf_counter()
  cost_model = tf_fusion.calibrate(devices)
  print(f"calibrated in {time.perf_counter() - start:.1f} s: "
        f"alpha {cost_model.alpha}, beta {cost_model.beta}, copy {cost_model.copy_beta:.3g}",
        flush=True)
  selected = set(filter(None, args.only.split(",")))
  results = []
  for set_name in args.sets.split(","):
    results.append(add_ratios(run_set(set_name, devices, args, cost_model, selected)))
  for result in results:
    print_table(result)
  report = dict(devices=len(devices), device_names=devices, reps=args.reps, cost_model=json.loads(
      cost_model.to_json()), tensorflow=tf.__version__, results=results)
  json_path = bench_lib.write_json(report, os.path.join(args.out_dir, "allreduce_bench.json"))
  png_path = os.path.join(args.out_dir, "allreduce_bench.png")
  plot(results, png_path)
  print(f"\nwrote {json_path} and {png_path}")
  return report


if __name__ == "__main__":
  main()
