"""MultiWorkerMirroredStrategy with tf_fusion: 2 worker processes x 2 logical CPUs each.

Each test starts real processes on 127.0.0.1 (tests/multi_worker.py); TensorFlow's
start-up makes each take ~5-25 s, so they are few.
"""

import json
import os

import numpy as np
import tensorflow as tf

import tf_fusion
from tests import helpers
from tests import multi_worker
from tests import multi_worker_job
from tests import training_cases


class MultiWorkerReduceTest(tf.test.TestCase):

  def test_every_algorithm_compression_and_op_against_numpy(self):
    workers = multi_worker.run_workers("reduce")
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
      self.assertLess(w["paths"]["_all_reduce"], 1e-3)
      # Replicas 0..3 held r + [0, .5, .25]: the mean over both workers is 1.5 + that.
      for replica in w["moving_statistics"]:
        self.assertAllClose(replica, [1.5, 2.0, 1.75], rtol=1e-7)

  def test_dead_peer_is_an_error_not_a_hang(self):
    # Worker 1 is SIGKILLed after one reduction; worker 0's next one (timeout 10 s)
    # fails, saying what that means; TF adds the dead task when its heartbeats
    # stopped before the timeout ran out.
    workers = multi_worker.run_workers("dead_peer", may_die=(1,))
    self.assertIsNone(workers[1])
    self.assertIsNotNone(workers[0]["error"])
    self.assertIn("an all-reduce across 2 worker(s) did not complete (timeout_seconds=10)"
                  ": a peer worker died", workers[0]["error"])
    self.assertLess(workers[0]["seconds"], 90)

  def test_different_plans_are_named_on_every_worker(self):
    workers = multi_worker.run_workers("plan_mismatch")
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
    first, _ = multi_worker.run_workers("retrace_alone")
    self.assertIsNone(first["error"])
    self.assertEqual(first["collectives"], 0)
    self.assertLess(first["seconds"], 5)
    self.assertEqual(first["first"], 4.0)   # 2 workers x 2 devices x ones

  def test_a_stopped_worker_is_named_within_the_stall_timeout(self):
    # Worker 1 SIGSTOPs itself at batch 3; worker 0's StallWatch has 4 s + 2 s to answer.
    first, stopped = multi_worker.run_workers("stall", may_hang=(1,))
    self.assertIsNone(stopped)
    self.assertIsNotNone(first["error"])
    self.assertStartsWith(first["error"], "DeadlineExceededError")
    self.assertIn("step 4 has not finished after 4 s on worker 0", first["error"])
    self.assertIn("worker 1 has not answered", first["error"])
    self.assertLen(first["reports"], 1)
    # 3 quick steps, then 4 s to notice and 2 s to ask; TF's heartbeats take longer.
    self.assertLess(first["seconds"], 15)

  def test_a_per_call_timeout_bounds_the_fused_reduction(self):
    (first, _) = multi_worker.run_workers("call_timeout")
    self.assertStartsWith(first["error"], "DeadlineExceededError")
    self.assertIn("did not complete (timeout_seconds=1)", first["error"])
    self.assertLess(first["seconds"], 8)

  def test_mismatched_gradients_are_named_on_every_worker(self):
    workers = multi_worker.run_workers("mismatch")
    for w, mine in zip(workers, ("float32[7]", "float32[8]")):
      self.assertIsNotNone(w["error"])
      self.assertIn("shapes or dtypes differ", w["error"])
      self.assertIn(mine, w["error"])


class MultiWorkerFitTest(tf.test.TestCase):

  def test_training_cases_equal_one_device(self):
    """2 workers x 2 devices: accumulation, steps_per_execution and a retrace end with
    one device's weights (float32; see tests/test_training_equivalence.py)."""
    workers = multi_worker.run_workers("cases")
    for i, (case, opt) in enumerate(multi_worker_job.MULTI_WORKER_CASES):
      want = training_cases.train(None, case, opt)
      for worker in workers:
        for got, w in zip(worker["weights"][i], want):
          self.assertAllClose(np.array(got, np.float32), w, rtol=2e-5, atol=2e-5,
                              msg=f"{case} {opt} worker {worker['task']}")

  def test_fit_equals_one_process_with_four_replicas(self):
    workers = multi_worker.run_workers("fit")
    # The calibrated cost model was averaged across workers: identical on both.
    models = [json.loads(w["cost_model"]) for w in workers]
    self.assertIn("2 worker(s) x 2 devices", models[0].pop("description"))
    models[1].pop("description")
    self.assertEqual(models[0], models[1])
    # The reference is TF's own reduction on one process, not tf_fusion's.
    strategy = tf.distribute.MirroredStrategy(
        helpers.devices(4), cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
      model, ds = multi_worker_job.fit_problem()
    model.fit(ds, epochs=1, verbose=0)
    for i, want in enumerate(model.weights):
      w0, w1 = (np.array(w["weights"][i], np.float32) for w in workers)
      self.assertAllEqual(w0, w1)          # the workers agree to the bit
      # Another summation order over 8 steps of SGD with momentum: float32 rounding.
      self.assertAllClose(w0, want.numpy(), rtol=1e-5, atol=1e-6, msg=want.path)


class KillAndResumeTest(tf.test.TestCase):

  def test_sigkill_one_worker_and_the_launcher_restarts_the_job(self):
    """Worker 1 SIGKILLs itself at the start of epoch 2 (of 4, 4 steps each); the
    launcher (--max_restarts 1) starts both again and BackupAndRestore resumes."""
    tmp = self.create_tempdir().full_path
    cost_model_file = os.path.join(tmp, "cost_model.json")
    marker = os.path.join(tmp, "killed")
    env = {"TF_FUSION_TEST_BACKUP_DIR": os.path.join(tmp, "backup"),
           "TF_FUSION_TEST_KILL_MARKER": marker,
           "TF_FUSION_COST_MODEL_FILE": cost_model_file,
           # The measured autotuner: the workers time the same candidates, average the
           # times and must pick the same thresholds, or the run hangs.
           "TF_FUSION_PACK_BYTES": "auto", "TF_FUSION_AUTOTUNE": "measure"}
    code, out = multi_worker.launch_job("resume", tmp, extra_env=env,
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
    strategy = tf_fusion.mirrored_strategy(
        helpers.devices(4), tf_fusion.FusionOptions(algorithm="reduce_to_one"))
    with strategy.scope():
      model, ds = multi_worker_job.fit_problem(steps=4)
    model.fit(ds, epochs=4, verbose=0)               # the same job, never interrupted
    for i, want in enumerate(model.weights):
      w0, w1 = (np.array(w["weights"][i], np.float32) for w in workers)
      self.assertAllEqual(w0, w1)
      self.assertAllClose(w0, want.numpy(), rtol=1e-5, atol=1e-6, msg=want.path)


if __name__ == "__main__":
  tf.test.main()
