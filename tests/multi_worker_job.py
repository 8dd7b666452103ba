"""One worker of the multi-worker tests: `python -m tests.multi_worker_job MODE OUT`.

Started with TF_CONFIG on 127.0.0.1 by tests/multi_worker.py or by tf_fusion.launch;
TF_FUSION_DEVICES_PER_WORKER logical CPU devices per worker. Each mode writes what it
measured to OUT with "{task}" replaced by the worker's index; the test asserts on it.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

import tf_fusion  # pylint: disable=g-import-not-at-top

SHAPES = [(3, 5), (7,), (2, 2, 4), (1,), (33, 3), (6,)]


def replica_arrays(replica, shapes=SHAPES, dtype=np.float32):
  """Deterministic per-replica inputs, known to every worker (for the reference)."""
  rng = np.random.RandomState(100 + replica)
  return [(rng.randn(*s) * 100).astype(dtype) for s in shapes]


def reference(num_replicas, reduce_op):
  """(float64 NumPy sum or mean over replicas, sum of magnitudes) per tensor.

  The ring adds in its own order and FP16 rounds every partial sum, so results are
  compared with a tolerance relative to the sum of the magnitudes added.
  """
  per = [replica_arrays(r) for r in range(num_replicas)]
  out = []
  for parts in zip(*per):
    total = np.sum([p.astype(np.float64) for p in parts], axis=0)
    scale = np.sum([np.abs(p.astype(np.float64)) for p in parts], axis=0)
    if reduce_op == "MEAN":
      total, scale = total / num_replicas, scale / num_replicas
    out.append((total, scale))
  return out


def mode_reduce(strategy):
  """Every algorithm x compression x SUM/MEAN against the NumPy reference."""
  n = strategy.num_replicas_in_sync
  values = [strategy.experimental_distribute_values_from_function(
      lambda ctx, i=i: tf.constant(replica_arrays(ctx.replica_id_in_sync_group)[i]))
            for i in range(len(SHAPES))]
  ints = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant([ctx.replica_id_in_sync_group + 1] * 3, tf.int32))
  # Crossover at ~110 bytes: "auto" gives the small packs ring, the larger hierarchical.
  model = tf_fusion.CostModel(alpha={"ring": 1e-6, "hierarchical": 2e-6},
                              beta={"ring": 1e-8, "hierarchical": 1e-9},
                              copy_beta=1e-12, description="fixed for tests")
  tf_ops = tf_fusion.fused_ops_of(strategy).tf_ops
  results = []
  for algorithm in ("ring", "hierarchical", "auto"):
    for compression in ("none", "fp16", "bf16"):
      opts = tf_fusion.FusionOptions(pack_bytes=200, first_pack_bytes=64,
                                     algorithm=algorithm, compression=compression,
                                     timeout_seconds=60)
      ops = tf_fusion.MultiWorkerFusedAllReduce(
          opts, tf_ops, tf_fusion.strategy.num_workers(strategy), cost_model=model)
      for reduce_op in ("SUM", "MEAN"):
        with strategy.scope():
          out = ops.batch_reduce(reduce_op, [(v, v) for v in values] + [(ints, ints)])
        errors = []
        for got, (want, scale) in zip(out[:-1], reference(n, reduce_op)):
          for local in strategy.experimental_local_results(got):
            errors.append(float(np.max(np.abs(local.numpy() - want) / scale)))
        int_sum = strategy.experimental_local_results(out[-1])[0].numpy().tolist()
        results.append(dict(algorithm=algorithm, compression=compression,
                            reduce_op=reduce_op, max_error=max(errors),
                            algorithms_used=sorted({p.algorithm for p in ops.last_plan}),
                            packs=len(ops.last_plan), int_result=int_sum))
  # The other two ways into the strategy's cross-device ops must cross workers too:
  # strategy.reduce (reduce_implementation) and the no-merge-call _all_reduce.
  want, _ = reference(n, "SUM")[0]
  reduced = strategy.reduce("SUM", values[0], axis=None)   # outside the scope, as users do
  paths = {"strategy.reduce": float(np.max(np.abs(reduced.numpy() - want)))}
  fused = strategy.extended._cross_device_ops  # pylint: disable=protected-access
  local = strategy.experimental_local_results(values[0])

  @tf.function
  def no_merge_call():
    out = []
    for rid, (device, v) in enumerate(zip(strategy.extended.worker_devices, local)):
      with tf.device(device):
        out.append(fused._all_reduce(  # pylint: disable=protected-access
            tf.distribute.ReduceOp.SUM, [v], rid,
            tf.distribute.experimental.CommunicationOptions())[0])
    return out

  paths["_all_reduce"] = max(float(np.max(np.abs(r.numpy() - want)))
                             for r in no_merge_call())
  return {"results": results, "num_replicas": n, "paths": paths,
          "moving_statistics": moving_statistics_after_sync(strategy)}


def moving_statistics_after_sync(strategy):
  """Replica r's batch-norm moving mean set to r + [0, 0.5, 0.25], then averaged across
  workers by tf_fusion.callbacks; returns each local replica's moving mean."""
  import keras  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
  moving_mean = model.layers[0].moving_mean
  for device, component in zip(strategy.extended.worker_devices, moving_mean.value.values):
    replica = strategy.extended.worker_devices.index(device) + (
        strategy.cluster_resolver.task_id * len(strategy.extended.worker_devices))
    component.assign(replica + np.array([0, 0.5, 0.25], np.float32))
  tf_fusion.callbacks.sync_moving_statistics(model, strategy)
  return [c.numpy().tolist() for c in moving_mean.value.values]


def fit_problem(steps=8, batch=64):
  """The model and data of the fit test: no batch norm (per-replica statistics would
  depend on how a global batch is split), so any split of a global batch gives the
  same mean gradient."""
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(1)
  model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                            keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
  model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.RandomState(0)
  x = rng.randn(batch * steps, 8).astype(np.float32)
  y = rng.randint(0, 4, batch * steps)
  return model, tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def mode_fit(strategy):
  """Keras model.fit across workers; the final weights of this worker."""
  with strategy.scope():
    model, ds = fit_problem()
  history = model.fit(ds, epochs=1, verbose=0)
  plan = tf_fusion.fused_ops_of(strategy).last_plan
  return {"weights": [w.numpy().tolist() for w in model.weights],
          "loss": history.history["loss"], "packs": len(plan),
          "cost_model": tf_fusion.fused_ops_of(strategy).cost_model(
              strategy.extended.worker_devices).to_json()}


# The differential cases run across workers (tests/training_cases.py): the no-merge-call
# path (accumulation), the cond-in-loop path (steps_per_execution) and a retrace.
MULTI_WORKER_CASES = (("accumulation", "sgd"), ("accumulation", "loss_scaled_lars"),
                      ("steps_per_execution", "loss_scaled_lars"), ("retrace", "lars"))


def mode_cases(strategy):
  """Trains each of MULTI_WORKER_CASES; this worker's final weights of each."""
  from tests import training_cases  # pylint: disable=g-import-not-at-top
  return {"weights": [[w.tolist() for w in training_cases.train(strategy, case, opt)]
                      for case, opt in MULTI_WORKER_CASES]}


def mode_mismatch(strategy):
  """Worker 1 reduces a tensor of another shape: both workers must say so, not hang."""
  task = strategy.cluster_resolver.task_id
  shapes = [(3, 5), (7,)] if task == 0 else [(3, 5), (8,)]
  values = [strategy.experimental_distribute_values_from_function(
      lambda ctx, s=s: tf.ones(s)) for s in shapes]
  ops = tf_fusion.fused_ops_of(strategy)
  try:
    with strategy.scope():
      ops.batch_reduce("SUM", [(v, v) for v in values])
  except ValueError as e:
    return {"error": str(e)}
  return {"error": None}


def mode_resume(strategy):
  """fit with BackupAndRestore; worker 1 SIGKILLs itself at the start of epoch 2 once
  (when TF_FUSION_TEST_KILL_MARKER names a file that does not exist yet)."""
  import keras  # pylint: disable=g-import-not-at-top
  task = strategy.cluster_resolver.task_id
  backup = os.path.join(os.environ["TF_FUSION_TEST_BACKUP_DIR"], f"worker{task}")
  marker = os.environ.get("TF_FUSION_TEST_KILL_MARKER")

  epochs_run = []

  def maybe_die(epoch, logs):
    del logs
    epochs_run.append(epoch)
    if task == 1 and epoch == 2 and marker and not os.path.exists(marker):
      open(marker, "w").close()
      os.kill(os.getpid(), signal.SIGKILL)

  with strategy.scope():
    model, ds = fit_problem(steps=4)
  model.fit(ds, epochs=4, verbose=0, callbacks=[
      keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False),
      keras.callbacks.LambdaCallback(on_epoch_begin=maybe_die)])
  return {"weights": [w.numpy().tolist() for w in model.weights],
          "iterations": int(model.optimizer.iterations.numpy()), "epochs_run": epochs_run}


def mode_dead_peer(strategy):
  """Worker 1 dies after one reduction; worker 0's reductions must fail, not hang.

  Worker 0 may see the death in its first reduction too: TF's collectives pull data
  (RecvBuf), so worker 1 can finish its half of the ring and die before it has served
  worker 0's last request. Either way is the behaviour under test.
  """
  import time  # pylint: disable=g-import-not-at-top
  task = strategy.cluster_resolver.task_id
  value = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.ones([1000]))
  ops = tf_fusion.fused_ops_of(strategy)
  start = time.monotonic()
  try:
    with strategy.scope():
      ops.batch_reduce("SUM", [(value, value)])
      if task == 1:
        os.kill(os.getpid(), signal.SIGKILL)
      ops.batch_reduce("SUM", [(value, value), (value, value)])
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"[:2000],
            "seconds": time.monotonic() - start}
  return {"error": None, "seconds": time.monotonic() - start}


def mode_plan_mismatch(strategy):
  """Each worker asks for another plan (the algorithm; then the pack thresholds): every
  worker must raise, naming what differs, within seconds, not hang."""
  import time  # pylint: disable=g-import-not-at-top
  task = strategy.cluster_resolver.task_id
  values = [strategy.experimental_distribute_values_from_function(
      lambda ctx, s=s: tf.ones(s)) for s in [(30,), (7,), (50,)]]
  tf_ops = tf_fusion.fused_ops_of(strategy).tf_ops
  settings = [dict(algorithm=("ring", "hierarchical")[task]),
              dict(algorithm="ring", pack_bytes=(64, 1 << 20)[task], first_pack_bytes=0)]
  out = []
  for extra in settings:
    ops = tf_fusion.MultiWorkerFusedAllReduce(
        tf_fusion.FusionOptions(timeout_seconds=30, **extra), tf_ops, 2, worker_index=task)
    start = time.monotonic()
    try:
      with strategy.scope():
        ops.batch_reduce("SUM", [(v, v) for v in values])
      out.append({"error": None})
    except ValueError as e:
      out.append({"error": str(e), "seconds": time.monotonic() - start})
  return {"cases": out}


def mode_retrace_alone(strategy):
  """Both workers reduce once under autotune="measure" (which measures and agrees
  across them); then worker 0 alone traces the reduction again. That retrace must run
  no collective: with worker 1 gone to sleep, one would wait until the timeout."""
  import time  # pylint: disable=g-import-not-at-top
  from tf_fusion import collectives as collectives_lib  # pylint: disable=g-import-not-at-top
  task = strategy.cluster_resolver.task_id
  value = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.ones([3000]))
  ops = tf_fusion.MultiWorkerFusedAllReduce(
      tf_fusion.FusionOptions(pack_bytes=None, autotune="measure", timeout_seconds=10),
      tf_fusion.fused_ops_of(strategy).tf_ops, 2, worker_index=task)

  def step():
    return ops.batch_reduce("SUM", [(value, value)] * 3)

  with strategy.scope():
    first = tf.function(step)()
  if task == 1:
    time.sleep(12)   # alive, but never joins again
    return {"error": None}
  device = strategy.extended.worker_devices[0]
  before = collectives_lib.collectives_run(device)
  start = time.monotonic()
  try:
    with strategy.scope():
      tf.function(step).get_concrete_function()   # a fresh trace, not run
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"[:2000]}
  return {"error": None, "seconds": time.monotonic() - start,
          "collectives": collectives_lib.collectives_run(device) - before,
          "first": float(strategy.experimental_local_results(first[0])[0].numpy()[0])}


def mode_stall(strategy):
  """Worker 1 stops itself (SIGSTOP) as batch 3 begins; worker 0's StallWatch (4 s)
  must end its fit with an error naming worker 1, well before TF's heartbeats would."""
  import time  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  task = strategy.cluster_resolver.task_id

  def maybe_stop(batch, logs):
    del logs
    if task == 1 and batch == 3:
      os.kill(os.getpid(), signal.SIGSTOP)

  watch = tf_fusion.StallWatch(timeout_seconds=4, answer_seconds=2)
  with strategy.scope():
    model, ds = fit_problem(steps=8)
  start = time.monotonic()
  try:
    model.fit(ds, epochs=1, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_train_batch_begin=maybe_stop), watch])
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"[:3000], "reports": watch.reports,
            "seconds": time.monotonic() - start}
  return {"error": None, "reports": watch.reports, "seconds": time.monotonic() - start}


def mode_call_timeout(strategy):
  """Only worker 0 reduces, with a per-call timeout of 1 s; worker 1 stays alive but
  never joins. Worker 0 must get DeadlineExceededError within the call's timeout plus a
  few seconds (the strategy's own timeout is 60 s)."""
  import time  # pylint: disable=g-import-not-at-top
  if strategy.cluster_resolver.task_id == 1:
    time.sleep(15)
    return {"error": None, "seconds": 0.0}
  value = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.ones([1000]))
  options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=1)
  start = time.monotonic()
  try:
    with strategy.scope():
      tf_fusion.fused_ops_of(strategy).batch_reduce("SUM", [(value, value)], options)
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"[:2000],
            "seconds": time.monotonic() - start}
  return {"error": None, "seconds": time.monotonic() - start}


def main(argv):
  mode, out_path = argv[1], argv[2]
  # fit and resume run "auto" with no cost model: the calibration runs across the
  # workers too (resume keeps it in TF_FUSION_COST_MODEL_FILE when the test sets it).
  algorithm = {"fit": "auto", "resume": "auto", "cases": "hierarchical"}.get(mode, "ring")
  timeout = 10 if mode == "dead_peer" else 60
  strategy = tf_fusion.multi_worker_strategy(tf_fusion.FusionOptions.from_env(
      timeout_seconds=timeout, algorithm=algorithm))
  result = {"reduce": mode_reduce, "fit": mode_fit, "cases": mode_cases,
            "mismatch": mode_mismatch, "resume": mode_resume,
            "dead_peer": mode_dead_peer, "call_timeout": mode_call_timeout,
            "plan_mismatch": mode_plan_mismatch, "stall": mode_stall,
            "retrace_alone": mode_retrace_alone}[mode](strategy)
  result["task"] = strategy.cluster_resolver.task_id
  with open(out_path.replace("{task}", str(result["task"])), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv)
