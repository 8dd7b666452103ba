"""Multi-process mode of tools/allreduce_bench.py: workers on 127.0.0.1 via tf_fusion.launch.

`python tools/allreduce_bench.py --workers 2 --devices 2` measures loopback bandwidth B,
starts the workers through the launcher with the same arguments, and prints the table
worker 0 measured. Every worker reduces the gradient set of ResNet-50 / AlexNet-BN with
(all configurations in the same processes, side by side):
  tf MWMS bpp=0 (TF's default), bpp=4MB, bpp=64MB: the strategy's own CollectiveAllReduce
  per_tensor: one ring collective per tensor
  tf_fusion ring / hierarchical / auto, fp32 and fp16 on the wire
and compares with the wire limit 2(W-1)/W * S / B for S bytes of FP32 gradients and W
workers: the least time any algorithm needs to move the bytes between workers over a
link of bandwidth B.
"""

import json
import os
import socket
import sys
import threading
import time

import numpy as np

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loopback_bandwidth(nbytes=512 * MIB, chunk=4 * MIB):
  """Bytes per second through one TCP connection on 127.0.0.1 (median of 3)."""
  rates = []
  payload = b"\0" * chunk
  for _ in range(3):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = [0]

    def sink():
      conn, _ = server.accept()
      while True:
        data = conn.recv(chunk)
        if not data:
          break
        received[0] += len(data)
      conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    client = socket.create_connection(server.getsockname())
    start = time.perf_counter()
    for _ in range(nbytes // chunk):
      client.sendall(payload)
    client.close()
    thread.join()
    rates.append(received[0] / (time.perf_counter() - start))
    server.close()
  return float(np.median(rates))


def configs():
  """(name, kind, options for tf_fusion or bytes_per_pack for TF)."""
  out = [("tf MWMS default (bpp=0)", "builtin", 0),
         ("tf MWMS bpp=4MB", "builtin", 4 * MIB),
         ("tf MWMS bpp=64MB", "builtin", 64 * MIB),
         ("per_tensor (ring, no fusion)", "per_tensor",
          dict(algorithm="ring", pack_bytes=1, first_pack_bytes=0))]
  for algorithm in ("ring", "hierarchical", "auto"):
    for compression in ("none", "fp16", "bf16"):
      out.append((f"tf_fusion {algorithm} {compression}", "fused",
                  dict(algorithm=algorithm, compression=compression)))
  return out


def worker_main(args):
  """Inside one worker (TF_CONFIG set by the launcher): measure, worker 0 writes JSON."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import algorithms  # pylint: disable=g-import-not-at-top
  from tf_fusion import cost_model as cost_lib  # pylint: disable=g-import-not-at-top
  from tools import allreduce_bench  # pylint: disable=g-import-not-at-top
  from tools import gradient_sets  # pylint: disable=g-import-not-at-top

  strategy = tf_fusion.multi_worker_strategy(
      tf_fusion.FusionOptions(timeout_seconds=600), devices_per_worker=args.devices)
  ext = strategy.extended
  tf_ops = tf_fusion.fused_ops_of(strategy)._tf_ops  # pylint: disable=protected-access
  devices = ext.worker_devices
  task = strategy.cluster_resolver.task_id
  start = time.perf_counter()
  cost_model = tf_fusion.calibrate(devices, algorithms.MULTI_WORKER_ALGORITHMS,
                                   group_size=len(devices) * ext._num_workers,  # pylint: disable=protected-access
                                   timeout_seconds=600)
  if task == 0:
    print(f"calibrated in {time.perf_counter() - start:.1f} s: alpha {cost_model.alpha}, "
          f"beta {cost_model.beta}", flush=True)
  selected = set(filter(None, args.only.split(",")))
  results = []
  for set_name in args.sets.split(","):
    shapes = gradient_sets.SETS[set_name]()
    grads = allreduce_bench._per_replica(strategy, shapes, seed=1)  # pylint: disable=protected-access
    rows = []
    for name, kind, setting in configs():
      if selected and name not in selected:
        continue
      if kind == "builtin":
        ops = tf_ops
        options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=setting)
      else:
        ops = tf_fusion.MultiWorkerFusedAllReduce(
            tf_fusion.FusionOptions(timeout_seconds=600, **setting), tf_ops,
            ext._num_workers, cost_model=cost_model)  # pylint: disable=protected-access
        options = None

      @tf.function
      def step(ops=ops, options=options):
        local = strategy.run(lambda *g: [tf.identity(x) for x in g], args=tuple(grads))
        reduced = ops.batch_reduce(tf.distribute.ReduceOp.SUM, [(v, v) for v in local],
                                   options=options)
        return [t for r in reduced for t in strategy.experimental_local_results(r)]

      with strategy.scope():
        first, times = cost_lib.time_calls(step, args.reps, args.warmup)
      row = dict(config=name, kind=kind, first_call_s=first,
                 median_ms=1e3 * float(np.median(times)), min_ms=1e3 * min(times),
                 max_ms=1e3 * max(times), times_ms=[1e3 * t for t in times])
      if kind != "builtin":
        plan = ops.last_plan
        row["packs"] = len(plan)
        row["algorithms"] = {a: sum(e.algorithm == a for e in plan)
                             for a in sorted({e.algorithm for e in plan})}
      rows.append(row)
      if task == 0:
        print(f"  {set_name} {name:34s} median {row['median_ms']:8.1f} ms", flush=True)
    nbytes = sum(4 * int(np.prod(s)) for s in shapes)
    results.append(dict(set=set_name, description=gradient_sets.describe(shapes),
                        fp32_bytes=nbytes, rows=rows))
  if task == 0:
    with open(args.worker_out, "w") as f:
      json.dump(dict(workers=ext._num_workers, devices_per_worker=len(devices),  # pylint: disable=protected-access
                     cost_model=json.loads(cost_model.to_json()), results=results), f)


def add_ratios(result, workers, bandwidth):
  rows = result["rows"]
  default = next(r for r in rows if r["config"].startswith("tf MWMS default"))
  limit_s = 2 * (workers - 1) / workers * result["fp32_bytes"] / bandwidth
  result["wire_limit_ms"] = 1e3 * limit_s
  for r in rows:
    r["x_faster_than_tf_default"] = default["median_ms"] / r["median_ms"]
    r["x_wire_limit"] = r["median_ms"] / result["wire_limit_ms"]
  return result


def print_table(result, workers, devices):
  print(f"\n{result['set']} ({result['description']}), {workers} workers x {devices} "
        f"devices; wire limit {result['wire_limit_ms']:.1f} ms")
  print(f"{'config':34s} {'median':>8s} {'min':>8s} {'max':>8s} {'TF default/this':>15s} "
        f"{'x wire limit':>12s}  plan")
  for r in result["rows"]:
    plan = ""
    if "algorithms" in r:
      plan = f"{r['packs']} packs " + ",".join(f"{k}:{v}" for k, v in r["algorithms"].items())
    print(f"{r['config']:34s} {r['median_ms']:8.1f} {r['min_ms']:8.1f} {r['max_ms']:8.1f} "
          f"{r['x_faster_than_tf_default']:15.2f} {r['x_wire_limit']:12.2f}  {plan}")


def parent_main(args, argv):
  """Measures B, launches the workers with the same arguments, reports."""
  from tf_fusion import launch  # pylint: disable=g-import-not-at-top
  bandwidth = loopback_bandwidth()
  print(f"loopback TCP bandwidth B = {bandwidth / 1e9:.2f} GB/s", flush=True)
  os.makedirs(args.out_dir, exist_ok=True)
  tag = f"{args.workers}x{args.devices}"
  worker_out = os.path.abspath(os.path.join(args.out_dir, f"multi_worker_{tag}.raw.json"))
  command = [sys.executable, os.path.join(ROOT, "tools", "allreduce_bench.py")] + list(
      argv) + ["--worker_out", worker_out]
  env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
  code = launch.launch(command, args.workers, args.devices, env=env)
  if code:
    raise SystemExit(f"the benchmark workers failed (exit {code})")
  with open(worker_out) as f:
    report = json.load(f)
  report["loopback_bytes_per_s"] = bandwidth
  for result in report["results"]:
    add_ratios(result, args.workers, bandwidth)
    print_table(result, args.workers, args.devices)
  path = os.path.join(args.out_dir, f"multi_worker_{tag}.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  os.remove(worker_out)
  print(f"\nwrote {path}")
  return report


def main(args, argv):
  if os.environ.get("TF_CONFIG"):
    return worker_main(args)
  return parent_main(args, argv)

