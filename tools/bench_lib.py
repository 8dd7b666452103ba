"""What the benchmarks in tools/ share, as Model Garden's benchmark base does for its
benchmarks: the gradient sets (from the recipe's own models), per-replica values, a
timed reduction, result rows with the plan, the loopback bandwidth, and running a
benchmark again as N worker processes on 127.0.0.1.

Run the tools as modules from the repository's root, e.g.
`python -m tools.allreduce_bench --workers 2 --devices 2`.
"""

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ("resnet50", "alexnet_bn", "bert_base")
# BERT-base phase 1 per replica: 32 sequences of 128 tokens.
BERT_SEQUENCES, BERT_LENGTH = 32, 128

# An embedding's gradient as a lookup gives it: `rows` rows of a table of shape `table`.
Sparse = collections.namedtuple("Sparse", ["table", "rows"])


def gradient_shapes(name, num_classes=1000, image_size=224):
  """The shapes of the trainable variables (so, of the gradients, in the order Keras
  reduces them) of the recipe model `name`: what a training step reduces."""
  return [s.table if isinstance(s, Sparse) else s for s in gradient_set(
      name, num_classes, image_size)]


def gradient_set(name, num_classes=1000, image_size=224, sequences=BERT_SEQUENCES):
  """gradient_shapes, with each embedding a lookup feeds as `Sparse`: for bert_base (the
  BERT recipe's encoder) the word, position and segment tables' IndexedSlices of
  `sequences` x 128 tokens per replica (as an untied lookup gives them)."""
  if name not in SETS:
    raise ValueError(f"unknown gradient set {name!r}; valid: {', '.join(SETS)}")
  if name == "bert_base":
    from official_recipes.bert import model as bert  # pylint: disable=g-import-not-at-top
    lookups = {"word_embeddings": sequences * BERT_LENGTH,
               "position_embeddings": BERT_LENGTH,
               "segment_embeddings": sequences * BERT_LENGTH}
    out = []
    for v in bert.build("bert_base").trainable_variables:
      shape = tuple(int(d) for d in v.shape)
      table = v.path.split("/")[-2]
      out.append(Sparse(shape, lookups[table]) if table in lookups else shape)
    return out
  from official_recipes.imagenet import models  # pylint: disable=g-import-not-at-top
  model = models.build(name, num_classes, image_size)
  return [tuple(int(d) for d in v.shape) for v in model.trainable_variables]


def num_elements(spec):
  """Elements of a dense gradient, or of the whole table of a Sparse one."""
  return int(np.prod(spec.table if isinstance(spec, Sparse) else spec))


def describe(specs):
  params = sum(num_elements(s) for s in specs)
  sparse = [s for s in specs if isinstance(s, Sparse)]
  text = f"{len(specs)} tensors, {params / 1e6:.1f}M params, {params * 4 / MIB:.1f} MiB"
  if sparse:
    text += (f"; {len(sparse)} as IndexedSlices ("
             + ", ".join(f"{s.rows} rows of {s.table[0]}x{s.table[1]}" for s in sparse) + ")")
  return text


def per_replica(strategy, shapes, seed):
  """One PerReplica of random float32 values per shape (any number of workers); an
  IndexedSlices for a Sparse one, its indices skewed towards the first rows (frequent
  words) and repeated, as a batch's tokens are."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def value_fn(ctx, i, shape):
    rng = tf.random.Generator.from_seed(seed + 1000 * i + ctx.replica_id_in_sync_group)
    if isinstance(shape, Sparse):
      vocab, width = shape.table
      indices = tf.cast(vocab * rng.uniform([shape.rows]) ** 3, tf.int64)
      return tf.IndexedSlices(rng.normal([shape.rows, width]), indices,
                              tf.constant([vocab, width], tf.int64))
    return rng.normal(shape)
  return [strategy.experimental_distribute_values_from_function(
      lambda ctx, i=i, s=s: value_fn(ctx, i, s)) for i, s in enumerate(shapes)]


def reduction_step(strategy, grads, reduce):
  """A tf.function that reduces `grads` as Keras does: values made inside the replica
  function (so they carry their device, as gradients do), then `reduce(list of
  PerReplica) -> list of Mirrored`; returns every local result."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  @tf.function
  def step():
    local = strategy.run(lambda *g: [tf.identity(x) for x in g], args=tuple(grads))
    reduced = reduce([(v, v) for v in local])
    return [t for r in reduced for t in strategy.experimental_local_results(r)]
  return step


def time_reduction(strategy, grads, reduce, reps, warmup):
  """(first call seconds, [seconds per timed call], CPU seconds per call) of
  `reduction_step`; each call is timed until the devices are done
  (tf_fusion.calibration.time_calls). The CPU seconds are this process's (every thread)
  over one more untimed call and the timed ones: on CPU replicas a collective is work
  that competes with the step's compute for the same cores, and its wall time alone does
  not say how much."""
  from tf_fusion import calibration  # pylint: disable=g-import-not-at-top
  step = reduction_step(strategy, grads, reduce)
  with strategy.scope():
    first, _ = calibration.time_calls(step, 0, warmup)
    start = time.process_time()
    _, times = calibration.time_calls(step, reps, warmup=1)
    return first, times, (time.process_time() - start) / (reps + 1)


def plan_fields(plan):
  """The packs of a tf_fusion plan and how many run each algorithm."""
  return dict(packs=len(plan), algorithms={
      a: sum(e.algorithm == a for e in plan) for a in sorted({e.algorithm for e in plan})})


def plan_text(row):
  """'5 packs ring:5' for a row with plan fields, else ''."""
  if "algorithms" not in row:
    return ""
  return f"{row['packs']} packs " + ",".join(f"{k}:{v}" for k, v in row["algorithms"].items())


def result_row(config, kind, times, first=None, plan=None, **extra):
  """One configuration's timings in ms (median, min, max, all), with its plan."""
  row = dict(config=config, kind=kind, first_call_s=first,
             median_ms=1e3 * float(np.median(times)), min_ms=1e3 * min(times),
             max_ms=1e3 * max(times), times_ms=[1e3 * t for t in times], **extra)
  if plan is not None:
    row.update(plan_fields(plan))
  return row


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


def without_flag(argv, flag):
  """argv without `flag` and its value (either --flag=v or --flag v)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == flag:
      skip = True
    elif not a.startswith(flag + "="):
      out.append(a)
  return out


def run_children(module, argv, workers, devices, out_path):
  """Runs `python -m module argv --worker_out out_path` as `workers` processes on
  127.0.0.1 (tf_fusion.launch, `devices` logical CPUs each), or as one process when
  workers == 1; returns the JSON the chief wrote to out_path (then removed).

  Raises:
    SystemExit: when a process fails, with the exit code.
  """
  command = [sys.executable, "-m", module] + list(argv) + ["--worker_out", out_path]
  code = run_processes(command, workers, devices,
                       dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES=""))
  if code:
    raise SystemExit(f"{module} {' '.join(argv)}: the workers failed (exit {code})")
  with open(out_path) as f:
    report = json.load(f)
  os.remove(out_path)
  return report


def run_processes(command, workers, devices, env, log=None):
  """Runs `command` as `workers` processes on 127.0.0.1 (tf_fusion.launch, `devices`
  logical CPUs each), or as one process from the repository's root when workers == 1;
  output to `log` (a file) if given. Returns the exit code."""
  if workers > 1:
    from tf_fusion import launch  # pylint: disable=g-import-not-at-top
    return launch.launch(command, workers, devices, env=env, out=log)
  return subprocess.call(command, env=env, cwd=ROOT, stdout=log,
                         stderr=subprocess.STDOUT if log is not None else None)


def write_json(report, path):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  return path


def sharded_exchange(devices):
  """(strategy, reduce) for allreduce_bench: the sharded update's reduce-scatter and
  all-gather (shard_exchange, in-graph on one host) of the gradients, by its layout, so
  that every replica ends with every summed tensor, as from an all-reduce."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top
  from tf_fusion import packing, shard_layout  # pylint: disable=g-import-not-at-top
  from tf_fusion.collectives import Collectives  # pylint: disable=g-import-not-at-top
  from tf_fusion.shard_exchange import Exchange  # pylint: disable=g-import-not-at-top
  strategy = tf_fusion.strategy.tf_mirrored_strategy(devices)
  n = len(devices)
  exchange = Exchange(Collectives.get(devices), range(n), range(n), False)

  def reduce(pairs):
    per_device = [[strategy.experimental_local_results(v)[d] for v, _ in pairs]
                  for d in range(n)]
    specs = [(t.dtype, t.shape) for t in per_device[0]]
    out = [[None] * len(specs) for _ in range(n)]
    for p in shard_layout.plan_layout(specs, n, 32 * MIB, MIB).packs:
      buffers = []
      for d, device in enumerate(exchange.devices):
        with tf.device(device):
          flat = [tf.reshape(per_device[d][i], [-1]) for i in p.variables]
          flat.append(tf.zeros([p.padded_size - p.size], p.dtype))
          buffers.append(tf.concat(flat, 0))
      blocks = exchange.reduce_scatter(buffers, p.shard_size)
      like = [per_device[0][i] for i in p.variables]
      for d, gathered in enumerate(exchange.all_gather(blocks)):
        with tf.device(exchange.devices[d]):
          for i, t in zip(p.variables, packing.unpack_blocks(gathered, p.size,
                                                             p.shard_size, like)):
            out[d][i] = t
    # Per tensor, every replica's copy, as a distributed value (each on its device).
    return [strategy.experimental_distribute_values_from_function(
        lambda ctx, i=i: out[ctx.replica_id_in_sync_group][i]) for i in range(len(specs))]

  return strategy, reduce
