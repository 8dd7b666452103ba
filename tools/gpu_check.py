"""One command for a GPU host: is tf_fusion right and fast on these GPUs?

  python -m tools.gpu_check                     # everything, report in out/gpu_check/
  python -m tools.gpu_check --steps 50 --reps 10

Checks, in order, and writes one JSON report (gpu_check.json):
1. the host: TensorFlow's version and build (CUDA, cuDNN), the GPUs;
2. the graph: the fused reduction traced for this host's GPUs (or two GPU names when
   it has none), on one worker and as one of two workers, with the device, op and
   communication hint of every collective (TF runs NCCL only for the hint "nccl"), and
   whether each GPU's NCCL launches are chained in one order;
3. with >= 2 GPUs: the training-equivalence and 16-bit-wire tests on the GPUs
   (TF_FUSION_TEST_DEVICE=GPU; tests that want more replicas than GPUs fail and say so);
4. with >= 2 GPUs: the all-reduce benchmark (TF's NcclAllReduce, HierarchicalCopy,
   CollectiveAllReduce against tf_fusion; ResNet-50 and AlexNet-BN gradients);
5. with >= 2 GPUs: --steps recipe steps (ResNet-50, synthetic 224 px, fp16 + LARS) with
   tf_fusion, with TensorFlow's own reduction and with no communication (the floor):
   images/s and each side's scaling efficiency over the floor; and one profiled run:
   per-pack times and which collective ops ran (read from the trace).

On a host without GPUs it says so, runs what needs none (1 and 2) and exits 0.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from tools import bench_lib


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out_dir", default="out/gpu_check")
  p.add_argument("--steps", type=int, default=50, help="recipe steps per run")
  p.add_argument("--reps", type=int, default=10, help="all-reduce benchmark repetitions")
  p.add_argument("--batch_per_gpu", type=int, default=128)
  p.add_argument("--skip", default="", help="comma-separated: tests, allreduce, recipe")
  args = p.parse_args(argv)
  args.skip = set(filter(None, args.skip.split(",")))
  if args.steps < 8:
    p.error("--steps must be >= 8 (the first window of the step logs holds tracing)")
  return args


def host():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  build = tf.sysconfig.get_build_info()
  gpus = tf.config.list_physical_devices("GPU")
  details = []
  for g in gpus:
    try:
      details.append(tf.config.experimental.get_device_details(g))
    except (ValueError, RuntimeError):
      details.append({})
  return dict(tensorflow=tf.__version__, cuda=build.get("cuda_version"),
              cudnn=build.get("cudnn_version"), gpus=[g.name for g in gpus],
              gpu_details=[{k: str(v) for k, v in d.items()} for d in details])


# Ops that launch a collective on a device: TF's collectives (NCCL or ring by hint) and
# nccl_ops' in-process all-reduce (always NCCL).
_NCCL_OP = "NcclAllReduce"


def _fixed_model(algorithms):
  """A cost model with a crossover near 100 KB: small packs take the first algorithm,
  large ones the second (tracing only; nothing is measured)."""
  import tf_fusion  # pylint: disable=g-import-not-at-top
  first, second = algorithms
  return tf_fusion.CostModel({first: 1e-5, second: 1e-4}, {first: 1e-9, second: 1e-10})


def fused_ops(algorithm, devices, num_workers=1, pack_bytes=1 << 20):
  """A FusedAllReduce (one worker) or MultiWorkerFusedAllReduce (`num_workers`, this
  being worker 0) over `devices`, built without a cluster: for tracing only."""
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import algorithms as algs  # pylint: disable=g-import-not-at-top
  options = tf_fusion.FusionOptions(pack_bytes=pack_bytes, first_pack_bytes=0,
                                    algorithm=algorithm)
  if num_workers == 1:
    return tf_fusion.FusedAllReduce(options, cost_model=_fixed_model(algs.LOCAL_ALGORITHMS))
  return tf_fusion.MultiWorkerFusedAllReduce.on_devices(
      options, devices, num_workers, cost_model=_fixed_model(algs.MULTI_WORKER_ALGORITHMS))


def trace_reduction(ops, devices, specs, options=None):
  """(plan, graph) of one fused SUM reduction of zeros of `specs` by `ops` over
  `devices`, traced and never run. The plan is made without the workers' agreement
  checks, which would wait for peers."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  plan = ops.make_plan(specs, devices, agree=False)

  def reduce():
    per_device = []
    for d in devices:
      with tf.device(d):
        per_device.append([tf.zeros(s, dt) for dt, s in specs])
    return ops.reduce_per_device(per_device, devices, plan, options=options)

  return plan, tf.function(reduce).get_concrete_function().graph


def launches(graph):
  """(device, op type, communication hint) of every collective launch in `graph`, in
  the order the ops were made; nccl_ops' all-reduce has the hint "nccl"."""
  out = []
  for op in graph.get_operations():
    if op.type == _NCCL_OP:
      out.append((op.device, op.type, "nccl"))
    elif op.type.startswith("Collective") and "communication_hint" in op.node_def.attr:
      out.append((op.device, op.type, op.get_attr("communication_hint").decode()))
  return out


def chained(graph):
  """{device: whether each NCCL launch there depends (through data or control edges)
  on the one made before it}: the order every GPU must keep (algorithms.DeviceOrder)."""
  by_device = {}
  for op in graph.get_operations():
    if op.type == _NCCL_OP or (op.type.startswith("Collective") and op.node_def.attr.get(
        "communication_hint") and op.get_attr("communication_hint") == b"nccl"):
      by_device.setdefault(op.device, []).append(op)
  return {device: all(_depends_on(b, a) for a, b in zip(ops, ops[1:]))
          for device, ops in by_device.items()}


def _depends_on(op, earlier):
  seen, stack = set(), [op]
  while stack:
    current = stack.pop()
    for parent in list(current.control_inputs) + [t.op for t in current.inputs]:
      if parent is earlier:
        return True
      if parent.name not in seen:
        seen.add(parent.name)
        stack.append(parent)
  return False


def collective_hints(devices):
  """What one traced fused reduction over `devices` launches, for ring and auto on one
  worker and hierarchical and auto as worker 0 of two: each collective's device, op
  type and hint, and whether every GPU's NCCL launches are chained in one order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  specs = [(tf.float32, tf.TensorShape([n])) for n in (300_000, 10, 500_000, 7)]
  out = {}
  soft = tf.config.get_soft_device_placement()
  tf.config.set_soft_device_placement(True)   # tracing only, also without the GPUs
  try:
    for name, algorithm, workers in (("ring", "ring", 1), ("auto", "auto", 1),
                                     ("hierarchical, 2 workers", "hierarchical", 2),
                                     ("auto, 2 workers", "auto", 2)):
      plan, graph = trace_reduction(fused_ops(algorithm, devices, workers), devices, specs)
      out[name] = dict(plan=[e.algorithm for e in plan], collectives=launches(graph),
                       chained=chained(graph))
    out["sharded weight update"] = sharded_update_launches(devices)
  finally:
    tf.config.set_soft_device_placement(soft)
  return out


def sharded_update_launches(devices, replica_launch=False):
  """What the sharded weight update's exchange launches over `devices` (one worker),
  traced for one pack: each collective's device, op type and hint, and whether each
  GPU's NCCL launches are chained (under merge_call)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_fusion.collectives import Collectives  # pylint: disable=g-import-not-at-top
  from tf_fusion.shard_exchange import Exchange  # pylint: disable=g-import-not-at-top
  collectives = Collectives.get(devices)
  ks = [0] if replica_launch else list(range(len(devices)))
  exchange = Exchange(collectives, ks, ks, replica_launch)
  shard = 1024

  def step():
    buffers = []
    for k in ks:
      with tf.device(devices[k]):
        buffers.append(tf.zeros([shard * len(devices)]))
    blocks = exchange.reduce_scatter(buffers, shard)
    sums = exchange.all_sum([tf.reduce_sum(b)[None] for b in blocks])
    return exchange.all_gather([b + s for b, s in zip(blocks, sums)])

  graph = tf.function(step).get_concrete_function().graph
  return dict(exchange=exchange.name, plan=[f"sharded_{exchange.name}"],
              collectives=launches(graph), chained=chained(graph))


def run_tests(out_dir):
  """The equivalence and wire tests with the GPUs as replicas; pytest's summary."""
  env = dict(os.environ, TF_FUSION_TEST_DEVICE="GPU", PYTHONPATH=bench_lib.ROOT)
  junit = os.path.abspath(os.path.join(out_dir, "gpu_tests.xml"))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "tests/test_training_equivalence.py",
       "tests/test_pipeline.py", "tests/test_gpu_graph.py",
       "tests/test_sharded_update.py", f"--junitxml={junit}"],
      cwd=bench_lib.ROOT, env=env, capture_output=True, text=True, check=False)
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  return dict(exit_code=proc.returncode, summary=lines[-1] if lines else "",
              failures=[l for l in lines if l.startswith("FAILED")][:50], junit=junit)


def run_allreduce(out_dir, gpus, reps):
  sub = os.path.abspath(os.path.join(out_dir, "allreduce"))
  proc = subprocess.run(
      [sys.executable, "-m", "tools.allreduce_bench", "--device_type=gpu",
       f"--devices={gpus}", f"--reps={reps}", f"--out_dir={sub}"],
      cwd=bench_lib.ROOT, env=dict(os.environ, PYTHONPATH=bench_lib.ROOT),
      capture_output=True, text=True, check=False)
  if proc.returncode:
    return dict(exit_code=proc.returncode, tail=(proc.stdout + proc.stderr)[-3000:])
  with open(os.path.join(sub, "allreduce_bench.json")) as f:
    report = json.load(f)
  return dict(exit_code=0, results=[
      dict(set=r["set"], rows=[{k: row.get(k) for k in (
          "config", "median_ms", "min_ms", "x_best_builtin", "packs", "algorithms")}
          for row in r["rows"]]) for r in report["results"]])


def run_recipe(gpus, steps, batch_per_gpu):
  """images/s of tf_fusion and of TF's own reduction; one profiled tf_fusion run."""
  from tools import profile_step  # pylint: disable=g-import-not-at-top
  from tools import train_bench  # pylint: disable=g-import-not-at-top
  batch = batch_per_gpu * gpus
  # After train_bench's own flags: the later value of a flag wins.
  extra = ["--image_size=224", f"--batch_size={batch}", f"--num_train_examples={batch * steps}",
           f"--num_eval_examples={batch}", "--dtype=fp16", "--compression=fp16",
           "--optimizer=lars", "--all_reduce_alg=auto", "--pack_bytes=auto"]
  out, runs = {}, []
  for side in train_bench.SIDES:
    stats = train_bench.run_once("resnet50", side, 1, gpus, steps, 10, extra, gpus=True)
    out[side] = dict(images_per_sec=stats["images_per_sec"], final_step=stats["final_step"])
    runs.append(dict(layout=f"1x{gpus}", model="resnet50", side=side,
                     images_per_sec=stats["images_per_sec"]))
  # tf_fusion / TF, and each side's scaling efficiency over the no-communication floor:
  # on GPUs the compute does not share the cores that move the bytes, which is where
  # overlap can make the efficiency approach 1 (on CPU replicas it cannot).
  row = train_bench.summarize(runs)[0]
  if row["ratio"]:
    out["ratio"] = row["ratio"]
  if row["sharded_ratio"]:
    out["sharded_over_replicated"] = row["sharded_ratio"]
  out["efficiency"] = row["efficiency"]
  stats = train_bench.run_once("resnet50", "tf_fusion", 1, gpus, steps, 10, extra,
                               profile_steps=f"{steps - 3},{steps - 2}", gpus=True)
  ops, step_spans = profile_step.read_trace(profile_step.latest_trace(stats["model_dir"]))
  summary = profile_step.analyze(ops, step_spans)
  kinds = sorted({n.rsplit(":", 1)[-1] for n, _, _ in ops
                  if profile_step.TF_COMMUNICATION.search(n)})
  out["profile"] = dict(
      steps=[{k: s[k] for k in ("step", "compute", "communication", "overlap_fraction")}
             for s in summary],
      packs=summary[-1]["packs"] if summary else {}, collective_ops_in_trace=kinds)
  return out


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out_dir, exist_ok=True)
  start = time.perf_counter()
  report = dict(host=host())
  gpus = report["host"]["gpus"]
  print(f"TensorFlow {report['host']['tensorflow']}, CUDA {report['host']['cuda']}; "
        f"{len(gpus)} GPU(s)", flush=True)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  names = ([d.name for d in tf.config.list_logical_devices("GPU")] if gpus else
           [f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in range(2)])
  report["graph"] = collective_hints(names)
  for algorithm, found in report["graph"].items():
    hints = sorted({h for _, _, h in found["collectives"]})
    kinds = sorted({t for _, t, _ in found["collectives"]})
    print(f"graph, {algorithm}: {len(found['collectives'])} collective(s) {kinds}, hints "
          f"{hints}, plan {found['plan']}, NCCL chained per GPU: "
          f"{all(found['chained'].values())}", flush=True)
  if len(gpus) < 2:
    report["skipped"] = ("no GPUs on this host" if not gpus else "one GPU: nothing to "
                         "all-reduce") + ": ran the host and graph checks only"
    print(f"{report['skipped']}.", flush=True)
  else:
    if "tests" not in args.skip:
      report["tests"] = run_tests(args.out_dir)
      print(f"tests on the GPUs: {report['tests']['summary']}", flush=True)
    if "allreduce" not in args.skip:
      report["allreduce"] = run_allreduce(args.out_dir, len(gpus), args.reps)
      print(f"all-reduce benchmark: exit {report['allreduce']['exit_code']}", flush=True)
    if "recipe" not in args.skip:
      report["recipe"] = run_recipe(len(gpus), args.steps, args.batch_per_gpu)
      r = report["recipe"]
      print(f"recipe: tf_fusion {r['tf_fusion']['images_per_sec']} images/s, TF "
            f"{r['tf']['images_per_sec']} images/s, floor {r['none']['images_per_sec']}; "
            f"efficiency {r['efficiency']}; collectives in the trace: "
            f"{r['profile']['collective_ops_in_trace']}", flush=True)
  report["seconds"] = time.perf_counter() - start
  path = bench_lib.write_json(report, os.path.join(args.out_dir, "gpu_check.json"))
  print(f"wrote {path}")
  failed = report.get("tests", {}).get("exit_code", 0) or report.get(
      "allreduce", {}).get("exit_code", 0)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
