"""Fusion-threshold sweep: measured all-reduce time against pack_bytes, and where the
autotuner (FusionOptions(pack_bytes=None)) lands.

For each gradient set (ResNet-50, AlexNet-BN) and each algorithm, reduces the set with
pack_bytes = 0 (one pack) and 64 KiB ... 256 MiB, and with pack_bytes=None under both
autotuners: "model" (pack_bytes and first_pack_bytes predicted by the calibrated cost
model) and "measure" (the fastest of a few candidate plans, timed on the set). All
configurations are traced first, then timed round-robin (one call of each per round),
so that drift on a noisy machine hits every configuration alike. Prints a table per set
with the measured and predicted times, the autotuned choice and its ratio to the best
swept point (target <= 1.05); writes JSON and a PNG with the chosen point marked.

  python -m tools.fusion_sweep --devices 4 --reps 7                 # one host
  python -m tools.fusion_sweep --workers 2 --devices 2 --reps 5     # 2 workers x 2

With --workers N the same script runs as N processes on 127.0.0.1 (tf_fusion.launch);
worker 0 writes the results.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from tools import bench_lib

KIB = 1 << 10


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sets", default="resnet50,alexnet_bn")
  p.add_argument("--algorithms", default="",
                 help="comma-separated; default ring,reduce_to_one,auto on one host and "
                 "ring,hierarchical,auto with several workers")
  p.add_argument("--compression", default="none", choices=("none", "fp16"))
  p.add_argument("--grid", default="pow2", choices=("pow2", "pow4"),
                 help="swept pack_bytes: every power of 2 or of 4 from 64 KiB to 256 MiB")
  p.add_argument("--devices", type=int, default=4, help="logical CPUs per worker")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--reps", type=int, default=7, help="timed rounds")
  p.add_argument("--cost_model_file", default="",
                 help="keep the calibrated cost model here (read if it fits); default "
                 "<out_dir>/cost_model_<workers>x<devices>.json, shared by the sets")
  p.add_argument("--out_dir", default="out/fusion_sweep")
  p.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.workers < 1 or args.reps < 1 or args.devices < 1 or (
      args.workers == 1 and args.devices < 2):
    p.error("need --workers >= 1, --reps >= 1 and >= 2 devices in all")
  if not args.cost_model_file:
    args.cost_model_file = os.path.abspath(os.path.join(
        args.out_dir, f"cost_model_{args.workers}x{args.devices}.json"))
  return args


def grid(name):
  """The autotuners' own grids: the model's (every power of 2) or the measured one's."""
  from tf_fusion import autotune  # pylint: disable=g-import-not-at-top
  return autotune.PACK_BYTES_GRID if name == "pow2" else autotune.MEASURED_PACK_BYTES


def measure(args):
  """Runs the sweep in this process (one host, or one worker); returns the report."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import autotune  # pylint: disable=g-import-not-at-top

  tf.get_logger().setLevel("ERROR")   # one trace per configuration is the point here
  multi = bool(os.environ.get("TF_CONFIG"))
  strategy, num_workers, names, make_ops = _setup(args, multi)
  devices = strategy.extended.worker_devices
  group = len(devices) * num_workers
  start = time.perf_counter()
  model = autotune.load_or_calibrate(args.cost_model_file, devices, names,
                                     timeout_seconds=600, group_size=group)
  say = print if not multi or strategy.cluster_resolver.task_id == 0 else (lambda *a, **k: None)
  say(f"cost model ({time.perf_counter() - start:.1f} s): {model.description}; "
      f"alpha {model.alpha}, beta {model.beta}, copy_beta {model.copy_beta:.3g}", flush=True)
  chosen_algorithms = (args.algorithms.split(",") if args.algorithms
                       else list(names) + ["auto"])
  results = []
  for set_name in args.sets.split(","):
    shapes = bench_lib.gradient_shapes(set_name)
    grads = bench_lib.per_replica(strategy, shapes, seed=1)
    configs = []
    for alg in chosen_algorithms:
      for pack_bytes in grid(args.grid) + (None, "measure"):
        options = tf_fusion.FusionOptions(
            pack_bytes=pack_bytes if pack_bytes != "measure" else None,
            first_pack_bytes=0 if isinstance(pack_bytes, int) else 1 << 20,
            autotune="measure" if pack_bytes == "measure" else "model",
            algorithm=alg, compression=args.compression, timeout_seconds=600)
        configs.append(dict(algorithm=alg, pack_bytes=pack_bytes,
                            ops=make_ops(options, model)))
    times = _time_round_robin(strategy, grads, configs, args.reps)
    rows = [_row(c, t, shapes, model, devices, args.compression, multi)
            for c, t in zip(configs, times)]
    results.append(dict(set=set_name, description=bench_lib.describe(shapes),
                        rows=rows))
  return dict(workers=num_workers, devices_per_worker=len(devices),
              compression=args.compression, cost_model=json.loads(model.to_json()),
              results=results, is_chief=not multi or strategy.cluster_resolver.task_id == 0)


def _setup(args, multi):
  """(strategy, workers, algorithm names, make_ops(options, model)) of this process."""
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import algorithms  # pylint: disable=g-import-not-at-top
  if multi:
    strategy = tf_fusion.multi_worker_strategy(
        tf_fusion.FusionOptions(timeout_seconds=600), devices_per_worker=args.devices)
    num_workers = tf_fusion.strategy.num_workers(strategy)
    tf_ops = tf_fusion.fused_ops_of(strategy).tf_ops
    return strategy, num_workers, algorithms.MULTI_WORKER_ALGORITHMS, (
        lambda options, model: tf_fusion.MultiWorkerFusedAllReduce(
            options, tf_ops, num_workers, cost_model=model))
  strategy = tf_fusion.mirrored_strategy(tf_fusion.strategy.logical_cpu_devices(args.devices))
  return strategy, 1, algorithms.LOCAL_ALGORITHMS, (
      lambda options, model: tf_fusion.FusedAllReduce(options, cost_model=model))


def _time_round_robin(strategy, grads, configs, reps):
  """Every configuration traced first, then timed one call each per round: `reps`
  seconds per configuration."""
  steps = []
  for c in configs:
    step = bench_lib.reduction_step(
        strategy, grads, lambda pairs, ops=c["ops"]: ops.batch_reduce("SUM", pairs))
    with strategy.scope():
      step()   # trace
      step()
    steps.append(step)
  times = [[] for _ in configs]
  for _ in range(reps):
    for i, step in enumerate(steps):
      with strategy.scope():
        t0 = time.perf_counter()
        step()
        times[i].append(time.perf_counter() - t0)
  return times


def _row(c, t, shapes, model, devices, compression, multi):
  """One configuration's line of the report: its times, its plan and, for the
  autotuners, the thresholds they chose."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import autotune  # pylint: disable=g-import-not-at-top
  plan = c["ops"].last_plan
  row = dict(algorithm=c["algorithm"], pack_bytes=c["pack_bytes"],
             median_ms=1e3 * float(np.median(t)), min_ms=1e3 * min(t),
             times_ms=[1e3 * x for x in t], packs=len(plan),
             plan=[[p.algorithm, list(p.tensor_indices)] for p in plan],
             predicted_ms=1e3 * sum(p.predicted_seconds or 0.0 for p in plan))
  alg = "hierarchical" if c["algorithm"] == "reduce_to_one" and multi else c["algorithm"]
  specs = [(tf.float32, tf.TensorShape(s)) for s in shapes]
  if c["pack_bytes"] is None:
    wire = tf_fusion.Compression.get(compression).wire_dtype
    row["chosen_pack_bytes"], row["chosen_first_pack_bytes"], _ = autotune.choose(
        specs, wire, model, alg,
        unknown_size_algorithm="hierarchical" if multi else "reduce_to_one")
  elif c["pack_bytes"] == "measure":
    tuned = c["ops"].cost_model(devices).tuned[autotune.list_key(specs, alg, compression)]
    row["chosen_pack_bytes"], row["chosen_first_pack_bytes"] = tuned[:2]
  return row


def summarize(result):
  """Per algorithm: the best swept point and the autotuned one, with their ratio."""
  out = {}
  for alg in dict.fromkeys(r["algorithm"] for r in result["rows"]):
    rows = [r for r in result["rows"] if r["algorithm"] == alg]
    swept = [r for r in rows if isinstance(r["pack_bytes"], int)]
    best = min(swept, key=lambda r: r["median_ms"])
    auto = next(r for r in rows if r["pack_bytes"] is None)
    measured = next((r for r in rows if r["pack_bytes"] == "measure"), None)
    # The same plan measured under several thresholds: how far apart identical work
    # lands in one run (this machine's noise), and what the autotuned plan measured
    # wherever it was swept.
    same = {}
    for r in rows:
      if r.get("plan"):
        same.setdefault(json.dumps(r["plan"]), []).append(r["median_ms"])
    spread = max((max(v) / min(v) for v in same.values() if len(v) > 1), default=1.0)
    as_auto = same.get(json.dumps(auto.get("plan")), [auto["median_ms"]])
    out[alg] = dict(best_pack_bytes=best["pack_bytes"], best_ms=best["median_ms"],
                    auto_pack_bytes=auto["chosen_pack_bytes"],
                    auto_first_pack_bytes=auto["chosen_first_pack_bytes"],
                    auto_ms=auto["median_ms"], ratio=auto["median_ms"] / best["median_ms"],
                    same_plan_ms=sorted(as_auto), noise=spread)
    if measured is not None:
      out[alg].update(measured_pack_bytes=measured["chosen_pack_bytes"],
                      measured_first_pack_bytes=measured["chosen_first_pack_bytes"],
                      measured_ms=measured["median_ms"],
                      measured_ratio=measured["median_ms"] / best["median_ms"])
  result["summary"] = out
  return out


def _size(n):
  if n is None:
    return "auto model"
  if n == "measure":
    return "auto measure"
  if n == 0:
    return "0 (one)"
  return f"{n // KIB} KiB" if n < (1 << 20) else f"{n >> 20} MiB"


def print_table(result, header):
  summary = summarize(result)
  algs = list(summary)
  print(f"\n== {result['set']} ({result['description']}); {header}")
  print(f"{'pack_bytes':>12s} " + " ".join(f"{a + ' ms (pred)':>26s}" for a in algs))
  for pack_bytes in dict.fromkeys(r["pack_bytes"] for r in result["rows"]):
    cells = []
    for a in algs:
      r = next(x for x in result["rows"]
               if x["algorithm"] == a and x["pack_bytes"] == pack_bytes)
      mark = "*" if isinstance(pack_bytes, int) and pack_bytes == summary[a]["best_pack_bytes"] else " "
      cells.append(f"{r['median_ms']:9.1f}{mark} ({r['predicted_ms']:7.1f}) {r['packs']:4d}p")
    print(f"{_size(pack_bytes):>12s} " + " ".join(f"{c:>26s}" for c in cells))
  for a, s in summary.items():
    verdict = "met" if s["ratio"] <= 1.05 else "MISSED"
    print(f"  {a}: autotuned pack_bytes={_size(s['auto_pack_bytes'])}, first="
          f"{_size(s['auto_first_pack_bytes'])}: {s['auto_ms']:.1f} ms vs best swept "
          f"{_size(s['best_pack_bytes'])} {s['best_ms']:.1f} ms -> {s['ratio']:.3f}x "
          f"(target <= 1.05: {verdict}); its plan measured "
          f"{', '.join(f'{x:.1f}' for x in s['same_plan_ms'])} ms; identical plans "
          f"differ by up to {100 * (s['noise'] - 1):.0f}% in this run")
    if "measured_ms" in s:
      verdict = "met" if s["measured_ratio"] <= 1.05 else "MISSED"
      print(f"  {a}: measured autotune pack_bytes={_size(s['measured_pack_bytes'])}, "
            f"first={_size(s['measured_first_pack_bytes'])}: {s['measured_ms']:.1f} ms -> "
            f"{s['measured_ratio']:.3f}x best swept (target <= 1.05: {verdict})")


def plot(report, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  results = report["results"]
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
  for ax, result in zip(axes[0], results):
    for alg, s in result["summary"].items():
      rows = [r for r in result["rows"] if r["algorithm"] == alg
              and isinstance(r["pack_bytes"], int) and r["pack_bytes"]]
      xs = [r["pack_bytes"] for r in rows]
      line, = ax.plot(xs, [r["median_ms"] for r in rows], "o-", label=alg, ms=3)
      one = next(r for r in result["rows"] if r["algorithm"] == alg and r["pack_bytes"] == 0)
      ax.axhline(one["median_ms"], color=line.get_color(), ls=":", lw=0.8)
      x = s["auto_pack_bytes"] or max(xs)
      ax.plot([x], [s["auto_ms"]], "*", color=line.get_color(), ms=14, mec="k",
              label=f"{alg} autotuned, model ({s['ratio']:.2f}x best)")
      if "measured_ms" in s:
        ax.plot([s["measured_pack_bytes"] or max(xs)], [s["measured_ms"]], "D",
                color=line.get_color(), ms=8, mec="k",
                label=f"{alg} autotuned, measured ({s['measured_ratio']:.2f}x best)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pack_bytes (dotted: one pack)")
    ax.set_ylabel("all-reduce, median ms")
    ax.set_title(f"{result['set']}: {report['workers']} worker(s) x "
                 f"{report['devices_per_worker']} devices")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_part(args, argv, set_name, algorithm):
  """One gradient set and algorithm in fresh processes: TF keeps hundreds of idle
  collective threads per traced configuration, and one process for the whole sweep
  runs out of threads."""
  tag = f"{args.workers}x{args.devices}"
  raw = os.path.abspath(os.path.join(args.out_dir,
                                     f"sweep_{tag}_{set_name}_{algorithm}.raw.json"))
  argv = bench_lib.without_flag(bench_lib.without_flag(argv, "--sets"), "--algorithms")
  return bench_lib.run_children("tools.fusion_sweep",
                                argv + ["--sets", set_name, "--algorithms", algorithm],
                                args.workers, args.devices, raw)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker_out:   # a child: one set, in this process (or this worker)
    report = measure(args)
    if report.pop("is_chief"):
      with open(args.worker_out, "w") as f:
        json.dump(report, f)
    return None
  os.makedirs(args.out_dir, exist_ok=True)
  algorithms = (args.algorithms.split(",") if args.algorithms else
                ["ring", "hierarchical" if args.workers > 1 else "reduce_to_one", "auto"])
  report, by_set = None, {}
  for set_name in args.sets.split(","):
    for algorithm in algorithms:
      part = run_part(args, argv, set_name, algorithm)
      report = report or dict(part, results=[])
      for result in part["results"]:
        if result["set"] in by_set:
          by_set[result["set"]]["rows"] += result["rows"]
        else:
          by_set[result["set"]] = result
          report["results"].append(result)
  header = (f"{report['workers']} worker(s) x {report['devices_per_worker']} devices, "
            f"compression {report['compression']}, medians of {args.reps} rounds; "
            "* best swept; (pred) = cost model; Np = packs")
  for result in report["results"]:
    print_table(result, header)
  tag = f"{args.workers}x{args.devices}"
  path = os.path.join(args.out_dir, f"sweep_{tag}.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  plot(report, os.path.join(args.out_dir, f"sweep_{tag}.png"))
  print(f"\nwrote {path} and sweep_{tag}.png")
  return report


if __name__ == "__main__":
  main()
