"""MultiWorkerMirroredStrategy with tf_fusion: 2 worker processes x 2 logical CPUs each.

Each test starts real processes on 127.0.0.1 (tests/multi_worker.py) that run the
`*_in_worker` function defined just above it; TensorFlow's start-up makes each take
~5-25 s, so they are few.
"""

import json
import os
import signal

import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers
from tests.harness import multi_worker
from tests.harness import training_cases


# --- what each worker runs (the tests below assert on it) ---------------------------

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


@multi_worker.worker()
def reduce_in_worker(strategy):
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
  # strategy.reduce (reduce_implementation) and the no-merge-call path.
  want, _ = reference(n, "SUM")[0]
  reduced = strategy.reduce("SUM", values[0], axis=None)   # outside the scope, as users do
  paths = {"strategy.reduce": float(np.max(np.abs(reduced.numpy() - want)))}
  fused = tf_fusion.fused_ops_of(strategy)
  local = strategy.experimental_local_results(values[0])

  @tf.function
  def no_merge_call():
    out = []
    for rid, (device, v) in enumerate(zip(strategy.extended.worker_devices, local)):
      with tf.device(device):
        out.append(fused.all_reduce_in_replica(
            tf.distribute.ReduceOp.SUM, [v], rid,
            tf.distribute.experimental.CommunicationOptions())[0])
    return out

  paths["all_reduce_in_replica"] = max(float(np.max(np.abs(r.numpy() - want)))
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

@multi_worker.worker(timeout_seconds=10)
def dead_peer_in_worker(strategy):
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

@multi_worker.worker()
def plan_mismatch_in_worker(strategy):
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

@multi_worker.worker()
def retrace_alone_in_worker(strategy):
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

@multi_worker.worker()
def stall_in_worker(strategy):
  """Worker 1 gets stuck outside the step as batch 3 begins (a sleep, as in a blocked
  input pipeline: alive, so TF's heartbeats go on and never report it); worker 0's
  StallWatch (4 s) must end its fit with an error naming worker 1. (A SIGSTOPped worker
  races TF's heartbeats, which may report it first, from 5 s on.)"""
  import time  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  task = strategy.cluster_resolver.task_id

  def maybe_stop(batch, logs):
    del logs
    if task == 1 and batch == 3:
      time.sleep(600)   # the harness kills it once worker 0 has answered

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

@multi_worker.worker()
def call_timeout_in_worker(strategy):
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

@multi_worker.worker()
def mismatch_in_worker(strategy):
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

# The differential cases run across workers (tests/training_cases.py): the no-merge-call
# path (accumulation), the cond-in-loop path (steps_per_execution) and a retrace.
MULTI_WORKER_CASES = (("accumulation", "sgd"), ("accumulation", "loss_scaled_lars"),
                      ("steps_per_execution", "loss_scaled_lars"), ("retrace", "lars"))

@multi_worker.worker(algorithm="hierarchical", sparse="gather")
def cases_in_worker(strategy):
  """Trains each of MULTI_WORKER_CASES; this worker's final weights of each."""
  from tests.harness import training_cases  # pylint: disable=g-import-not-at-top
  return {"weights": [[w.tolist() for w in training_cases.train(strategy, case, opt)]
                      for case, opt in MULTI_WORKER_CASES]}

@multi_worker.worker(algorithm="hierarchical", sparse="gather")
def transformer_in_worker(strategy):
  """The transformer case with LAMB, its IndexedSlices gathered across the workers
  beside the dense packs; this worker's final weights and its plan's algorithms. (The
  fp16 wire with gathered rows across workers: test_bert_recipe's two workers.)"""
  from tests.harness import training_cases  # pylint: disable=g-import-not-at-top
  weights = training_cases.train(strategy, training_cases.TRANSFORMER, "lamb")
  return {"weights": [w.tolist() for w in weights],
          "algorithms": [e.algorithm for e in tf_fusion.fused_ops_of(strategy).last_plan]}

@multi_worker.worker(algorithm="auto")
def resume_in_worker(strategy):
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
  fused = tf_fusion.fused_ops_of(strategy)
  return {"weights": [w.numpy().tolist() for w in model.weights],
          "iterations": int(model.optimizer.iterations.numpy()), "epochs_run": epochs_run,
          "cost_model": fused.cost_model(strategy.extended.worker_devices).to_json()}


# --- the tests -------------------------------------------------------------------------

class MultiWorkerReduceTest(tf.test.TestCase):
  """The worker functions that leave the cluster healthy, in one pair of processes
  (each pair costs TensorFlow's start-up twice); the retrace last, as worker 1 then
  sleeps through it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workers = dict(zip(
        ("reduce", "mismatch", "plan_mismatch", "retrace"),
        multi_worker.run_workers((reduce_in_worker, mismatch_in_worker,
                                  plan_mismatch_in_worker, retrace_alone_in_worker))))

  def test_every_algorithm_compression_and_op_against_numpy(self):
    workers = self.workers["reduce"]
    self.assertEqual([w["task"] for w in workers], [0, 1])
    for w in workers:
      self.assertEqual(w["num_replicas"], 4)
      self.assertLen(w["results"], 18)
      for r in w["results"]:
        name = f"worker {w['task']} {r['algorithm']} {r['compression']} {r['reduce_op']}"
        # Relative to the sum of the magnitudes added: float32 ring order, or 16-bit
        # rounding of the cast and of every partial sum (4 replicas: 4 x 2^-11 for
        # float16, 4 x 2^-8 for bfloat16).
        tol = {"fp16": 2.0**-9, "bf16": 2.0**-6, "none": 1e-6}[r["compression"]]
        self.assertLess(r["max_error"], tol, msg=name)
        # The int32 tensor took TF's CollectiveAllReduce: 1+2+3+4 needs both workers.
        want = [10] * 3 if r["reduce_op"] == "SUM" else [2.5] * 3
        self.assertEqual(r["int_result"], want, msg=name)
        want_algs = {"ring": ["ring"], "hierarchical": ["hierarchical"],
                     "auto": ["hierarchical", "ring"]}[r["algorithm"]]
        self.assertEqual(r["algorithms_used"], want_algs, msg=name)
    self.assertEqual(workers[0]["results"], workers[1]["results"])
    for w in workers:   # absolute error on values of ~100 summed over 4 replicas
      self.assertLess(w["paths"]["strategy.reduce"], 1e-3)
      self.assertLess(w["paths"]["all_reduce_in_replica"], 1e-3)
      # Replicas 0..3 held r + [0, .5, .25]: the mean over both workers is 1.5 + that.
      for replica in w["moving_statistics"]:
        self.assertAllClose(replica, [1.5, 2.0, 1.75], rtol=1e-7)

  def test_different_plans_are_named_on_every_worker(self):
    workers = self.workers["plan_mismatch"]
    for w in workers:
      algorithm, packs = w["cases"]
      self.assertIn("different all-reduce plans", algorithm["error"])
      self.assertIn("algorithms (worker(s) 1 differ from worker 0)", algorithm["error"])
      self.assertIn("number of packs (worker(s) 1 differ", packs["error"])
      for case in (algorithm, packs):
        self.assertLess(case["seconds"], 10)

  def test_a_retrace_on_one_worker_runs_no_collective(self):
    # autotune="measure" agreed once; a later trace on worker 0 alone must not ask
    # worker 1 anything (it would wait out the 10 s timeout and fail).
    first, _ = self.workers["retrace"]
    self.assertIsNone(first["error"])
    self.assertEqual(first["collectives"], 0)
    self.assertLess(first["seconds"], 5)
    self.assertEqual(first["first"], 4.0)   # 2 workers x 2 devices x ones

  def test_mismatched_gradients_are_named_on_every_worker(self):
    workers = self.workers["mismatch"]
    for w, mine in zip(workers, ("float32[7]", "float32[8]")):
      self.assertIsNotNone(w["error"])
      self.assertIn("shapes or dtypes differ", w["error"])
      self.assertIn(mine, w["error"])


class MultiWorkerFailureTest(tf.test.TestCase):
  """A peer that dies, stops or never joins: each in processes of its own, as TF's
  collectives fail for the rest of the process after a timeout."""

  def test_dead_peer_is_an_error_not_a_hang(self):
    # Worker 1 is SIGKILLed after one reduction; worker 0's next one (timeout 10 s)
    # fails, saying what that means; TF adds the dead task when its heartbeats
    # stopped before the timeout ran out.
    workers = multi_worker.run_workers(dead_peer_in_worker, may_die=(1,))
    self.assertIsNone(workers[1])
    self.assertIsNotNone(workers[0]["error"])
    self.assertIn("an all-reduce across 2 worker(s) did not complete (timeout_seconds=10)"
                  ": a peer worker died", workers[0]["error"])
    self.assertLess(workers[0]["seconds"], 90)

  def test_a_stuck_worker_is_named_within_the_stall_timeout(self):
    # Worker 1 sleeps at batch 3; worker 0's StallWatch has 4 s + 2 s to answer.
    first, stuck = multi_worker.run_workers(stall_in_worker, may_hang=(1,))
    self.assertIsNone(stuck)
    self.assertIsNotNone(first["error"])
    self.assertStartsWith(first["error"], "DeadlineExceededError")
    self.assertIn("step 4 has not finished after 4 s on worker 0", first["error"])
    self.assertIn("worker 1 has not answered", first["error"])
    self.assertLen(first["reports"], 1)
    # 3 quick steps, then 4 s to notice and 2 s to ask.
    self.assertLess(first["seconds"], 15)

  def test_a_per_call_timeout_bounds_the_fused_reduction(self):
    (first, _) = multi_worker.run_workers(call_timeout_in_worker)
    self.assertStartsWith(first["error"], "DeadlineExceededError")
    self.assertIn("did not complete (timeout_seconds=1)", first["error"])
    self.assertLess(first["seconds"], 8)


class MultiWorkerFitTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # One pair of processes for both bodies (the same options).
    cls.cases, cls.transformer = multi_worker.run_workers(
        (cases_in_worker, transformer_in_worker))

  def test_training_cases_equal_one_device(self):
    """2 workers x 2 devices: accumulation, steps_per_execution and a retrace end with
    one device's weights (float32; see tests/test_training_equivalence.py)."""
    for i, (case, opt) in enumerate(MULTI_WORKER_CASES):
      want = training_cases.train(None, case, opt)
      for worker in self.cases:
        for got, w in zip(worker["weights"][i], want):
          self.assertAllClose(np.array(got, np.float32), w, rtol=2e-5, atol=2e-5,
                              msg=f"{case} {opt} worker {worker['task']}")

  def test_transformer_with_gathered_sparse_gradients_equals_one_device(self):
    want = training_cases.train(None, training_cases.TRANSFORMER, "lamb")
    for worker in self.transformer:
      self.assertIn("gather", worker["algorithms"])
      for got, w in zip(worker["weights"], want):
        self.assertAllClose(np.array(got, np.float32), w, rtol=2e-5, atol=2e-5,
                            msg=f"worker {worker['task']}")


class KillAndResumeTest(tf.test.TestCase):

  def test_sigkill_one_worker_and_the_launcher_restarts_the_job(self):
    """Keras model.fit across workers under "auto" (the cost model calibrated across
    them): worker 1 SIGKILLs itself at the start of epoch 2 (of 4, 4 steps each); the
    launcher (--max_restarts 1) starts both again and BackupAndRestore resumes; both
    end with the weights of one process that was never stopped."""
    tmp = self.create_tempdir().full_path
    cost_model_file = os.path.join(tmp, "cost_model.json")
    marker = os.path.join(tmp, "killed")
    env = {"TF_FUSION_TEST_BACKUP_DIR": os.path.join(tmp, "backup"),
           "TF_FUSION_TEST_KILL_MARKER": marker,
           "TF_FUSION_COST_MODEL_FILE": cost_model_file,
           # The measured autotuner: the workers time the same candidates, average the
           # times and must pick the same thresholds, or the run hangs.
           "TF_FUSION_PACK_BYTES": "auto", "TF_FUSION_AUTOTUNE": "measure"}
    code, out = multi_worker.launch_job(resume_in_worker, tmp, extra_env=env,
                                        launcher_args=("--max_restarts", "1"))
    self.assertEqual(code, 0, msg=out[-3000:])
    self.assertIn("[launch] worker 1 was killed by SIGKILL; stopping the others", out)
    self.assertIn("[launch] restart 1 of 1: starting all 2 workers again", out)
    self.assertIn("[launch] all 2 workers finished", out)
    # Calibrated across both workers before the kill, and kept: the restarted workers
    # read the file and agreed on it, no second calibration, no rewrite.
    with open(cost_model_file) as f:
      kept = json.load(f)
    self.assertIn("2 worker(s) x 2 CPU device(s)", kept["topology"])
    self.assertLen(kept["tuned"], 1)
    self.assertLess(os.stat(cost_model_file).st_mtime_ns, os.stat(marker).st_mtime_ns)
    workers = multi_worker.read_results(tmp)
    for w in workers:
      self.assertEqual(w["epochs_run"], [2, 3])     # resumed, not restarted
      self.assertEqual(w["iterations"], 16)         # 4 epochs x 4 steps in all
    # The restarted workers hold the same cost model (read back, not measured again).
    models = [json.loads(w["cost_model"]) for w in workers]
    self.assertIn("2 worker(s) x 2 devices", models[0].pop("description"))
    models[1].pop("description")
    self.assertEqual(models[0], models[1])
    # The reference: the same job, never interrupted, on one process with 4 replicas
    # reduced by TF's own ReductionToOneDevice, not by tf_fusion.
    strategy = tf.distribute.MirroredStrategy(
        helpers.devices(4), cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
      model, ds = fit_problem(steps=4)
    model.fit(ds, epochs=4, verbose=0)
    for i, want in enumerate(model.weights):
      w0, w1 = (np.array(w["weights"][i], np.float32) for w in workers)
      self.assertAllEqual(w0, w1)          # the workers agree to the bit
      # Another summation order over 16 steps of SGD with momentum: float32 rounding.
      self.assertAllClose(w0, want.numpy(), rtol=1e-5, atol=1e-6, msg=want.path)


if __name__ == "__main__":
  tf.test.main()
