"""All-reduce benchmark: TF's built-ins against tf_fusion, side by side in one process.

Reduces the gradient set of ResNet-50 and of AlexNet-BN across logical CPU replicas,
the way Keras does it (strategy.extended.batch_reduce_to inside a tf.function), and
prints median/min/max per configuration with ratios to the best TF built-in and to the
floor (one pre-packed buffer of the same bytes through the fastest algorithm). Writes
JSON and a PNG bar chart to --out_dir.

  python tools/allreduce_bench.py --devices 4 --reps 10 --out_dir out/allreduce_bench

With --workers N, the multi-process mode (tools/multi_worker_bench.py): N workers on
127.0.0.1 with --devices logical CPU devices each, MultiWorkerMirroredStrategy.

  python tools/allreduce_bench.py --workers 2 --devices 2 --reps 5
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from tf_fusion import cost_model as cost_lib  # pylint: disable=wrong-import-position
from tools import gradient_sets  # pylint: disable=wrong-import-position

MIB = 1 << 20


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sets", default="resnet50,alexnet_bn",
                 help=f"comma-separated gradient sets: {', '.join(gradient_sets.SETS)}")
  p.add_argument("--devices", type=int, default=4, help="logical CPU replicas")
  p.add_argument("--reps", type=int, default=10, help="timed repetitions per config")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls (the first traces)")
  p.add_argument("--only", default="", help="comma-separated config names to run")
  p.add_argument("--out_dir", default="out/allreduce_bench")
  p.add_argument("--workers", type=int, default=1,
                 help="> 1: multi-process mode, workers on 127.0.0.1")
  p.add_argument("--worker_out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  unknown = set(args.sets.split(",")) - set(gradient_sets.SETS)
  if unknown:
    p.error(f"unknown --sets {sorted(unknown)}; valid: {', '.join(gradient_sets.SETS)}")
  if args.workers < 1 or args.reps < 1 or args.devices < (2 if args.workers == 1 else 1):
    p.error("need --workers >= 1, --reps >= 1, and --devices >= 2 (>= 1 with "
            "several workers)")
  return args


def _builtin(cross_device_ops=None, options=None):
  def make(devices, cost_model):
    del cost_model
    # TF's collective strategies in one process must not share group keys
    # (measured); TF's own tests bump this base per strategy.
    tf.distribute.MirroredStrategy._collective_key_base += 10_000  # pylint: disable=protected-access
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops), options
  return make


def _fused(**option_kwargs):
  def make(devices, cost_model):
    import tf_fusion  # pylint: disable=g-import-not-at-top
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(**option_kwargs),
                                   cost_model=cost_model)
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops), None
  return make


def configs():
  """(name, kind, factory); kind "builtin", "fused", "per_tensor" or "floor"."""
  from tensorflow.python.distribute import collective_util  # pylint: disable=g-import-not-at-top
  bpp = lambda n: collective_util.Options(bytes_per_pack=n)
  out = [
      ("per_tensor (ring, no fusion)", "per_tensor",
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
  for algorithm in ("ring", "reduce_to_one"):
    out.append((f"floor: one pre-packed buffer, {algorithm}", "floor",
                _fused(algorithm=algorithm, pack_bytes=0, first_pack_bytes=0)))
  return out


def _per_replica(strategy, shapes, seed):
  """One PerReplica of random values per shape (any number of workers)."""
  def value_fn(ctx, i, shape):
    rng = tf.random.Generator.from_seed(seed + 1000 * i + ctx.replica_id_in_sync_group)
    return rng.normal(shape)
  return [strategy.experimental_distribute_values_from_function(
      lambda ctx, i=i, s=s: value_fn(ctx, i, s)) for i, s in enumerate(shapes)]


def time_config(strategy, options, shapes, reps, warmup):
  """Times batch_reduce_to(SUM) of `shapes` as Keras calls it; returns seconds."""
  grads = _per_replica(strategy, shapes, seed=1)

  @tf.function
  def step():
    # Values made inside the replica function carry their device, as gradients do.
    local = strategy.run(lambda *g: [tf.identity(x) for x in g], args=tuple(grads))
    reduced = strategy.extended.batch_reduce_to(
        tf.distribute.ReduceOp.SUM, [(v, v) for v in local], options=options)
    return [t for r in reduced for t in strategy.experimental_local_results(r)]

  return cost_lib.time_calls(step, reps, warmup)


def run_set(set_name, devices, args, cost_model, selected):
  shapes = gradient_sets.SETS[set_name]()
  total = [(int(np.prod(shapes_) if shapes_ else 1)) for shapes_ in shapes]
  print(f"\n== {set_name}: {gradient_sets.describe(shapes)}, {len(devices)} replicas",
        flush=True)
  rows = []
  for name, kind, factory in configs():
    if selected and name not in selected:
      continue
    strategy, options = factory(devices, cost_model)
    set_shapes = [(sum(total),)] if kind == "floor" else shapes
    with strategy.scope():
      first, times = time_config(strategy, options, set_shapes, args.reps, args.warmup)
    row = dict(config=name, kind=kind, first_call_s=first,
               median_ms=1e3 * float(np.median(times)), min_ms=1e3 * min(times),
               max_ms=1e3 * max(times), times_ms=[1e3 * t for t in times])
    import tf_fusion  # pylint: disable=g-import-not-at-top
    ops = tf_fusion.fused_ops_of(strategy)
    if ops is not None:
      plan = ops.last_plan
      row["packs"] = len(plan)
      row["algorithms"] = {a: sum(e.algorithm == a for e in plan)
                           for a in sorted({e.algorithm for e in plan})}
    rows.append(row)
    print(f"  {name:42s} median {row['median_ms']:8.1f} ms  (first call "
          f"{first:5.1f} s){'  packs ' + str(row.get('packs')) if 'packs' in row else ''}",
          flush=True)
  return dict(set=set_name, description=gradient_sets.describe(shapes), rows=rows)


def add_ratios(result):
  rows = result["rows"]
  best = min((r for r in rows if r["kind"] == "builtin"), key=lambda r: r["median_ms"],
             default=None)
  floor = min((r for r in rows if r["kind"] == "floor"), key=lambda r: r["median_ms"],
              default=None)
  per_tensor = next((r for r in rows if r["kind"] == "per_tensor"), None)
  result["best_builtin"] = best and best["config"]
  result["floor"] = floor and floor["config"]
  for r in rows:
    r["x_best_builtin"] = best and r["median_ms"] / best["median_ms"]
    r["x_floor"] = floor and r["median_ms"] / floor["median_ms"]
    r["speedup_vs_per_tensor"] = per_tensor and per_tensor["median_ms"] / r["median_ms"]
  return result


def print_table(result):
  print(f"\n{result['set']} ({result['description']}); best built-in: "
        f"{result['best_builtin']}; floor: {result['floor']}")
  print(f"{'config':44s} {'median':>8s} {'min':>8s} {'max':>8s} {'x best TF':>9s} "
        f"{'x floor':>8s} {'vs per-tensor':>13s}  plan")
  fmt = lambda v, spec: format(v, spec) if v is not None else "-"
  for r in result["rows"]:
    plan = ""
    if "algorithms" in r:
      plan = f"{r['packs']} packs " + ",".join(f"{k}:{v}" for k, v in r["algorithms"].items())
    print(f"{r['config']:44s} {r['median_ms']:8.1f} {r['min_ms']:8.1f} {r['max_ms']:8.1f} "
          f"{fmt(r['x_best_builtin'], '9.2f')} {fmt(r['x_floor'], '8.2f')} "
          f"{fmt(r['speedup_vs_per_tensor'], '12.1f')}x  {plan}")


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
  colors = {"builtin": "tab:gray", "fused": "tab:blue", "per_tensor": "tab:red",
            "floor": "tab:green"}
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


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.workers > 1:
    from tools import multi_worker_bench  # pylint: disable=g-import-not-at-top
    return multi_worker_bench.main(args, argv)
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * args.devices)
  devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  import tf_fusion  # pylint: disable=g-import-not-at-top
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
  os.makedirs(args.out_dir, exist_ok=True)
  report = dict(devices=len(devices), reps=args.reps, cost_model=json.loads(
      cost_model.to_json()), tensorflow=tf.__version__, results=results)
  json_path = os.path.join(args.out_dir, "allreduce_bench.json")
  with open(json_path, "w") as f:
    json.dump(report, f, indent=2)
  png_path = os.path.join(args.out_dir, "allreduce_bench.png")
  plot(results, png_path)
  print(f"\nwrote {json_path} and {png_path}")
  return report


if __name__ == "__main__":
  main()
