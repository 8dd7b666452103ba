"""tf_fusion.planner: one calibration per process and devices, shared by every
FusedAllReduce; and repeatable plans: under `tf.config.experimental.enable_op_determinism()` two runs of
one fit, in two processes, make the same plan and end with the same bits, whatever a
calibration would have measured in each.

Each child process stands for a run on another day: its calibration is replaced by a
model in which one algorithm is far cheaper (the ring in one process, the trip to one
device in the other), the largest difference timing noise could make. The control, the
same fit without op determinism, shows that this does reach the plan (the algorithm
differs) and the bits (three replicas: the ring and the trip to one device add in
different orders); with op determinism nothing measured may decide, so neither may differ.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import calibration
from tf_fusion import collectives as collectives_lib
from tf_fusion import planner
from tests.harness import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
import keras
import tf_fusion
from tf_fusion import calibration

CHEAP = sys.argv[1]


def measured(devices, algorithms, **kwargs):
  # This "day"'s calibration: CHEAP a thousand times faster than the rest.
  return tf_fusion.CostModel({a: 1e-6 if a == CHEAP else 1e-3 for a in algorithms},
                             {a: 1e-12 if a == CHEAP else 1e-9 for a in algorithms},
                             copy_beta=1e-12, description=f"{CHEAP} cheap")


calibration.calibrate = measured
devices = [d.name for d in tf.config.list_logical_devices("CPU")]


def fit():
  keras.utils.set_random_seed(7)
  strategy = tf_fusion.mirrored_strategy(devices, tf_fusion.FusionOptions(
      pack_bytes=None, algorithm="auto", sparse="auto", timeout_seconds=60))
  with strategy.scope():
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"), keras.layers.Embedding(50, 8),
        keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
  rng = np.random.RandomState(0)
  x = rng.randint(0, 50, (96, 5)).astype("int32")
  y = rng.randn(96, 3).astype("float32")
  model.fit(x, y, batch_size=24, epochs=2, shuffle=False, verbose=0)
  plan = [[list(p.tensor_indices), p.algorithm, bool(p.densified)]
          for p in tf_fusion.fused_ops_of(strategy).last_plan]
  bits = hashlib.sha256(b"".join(w.numpy().tobytes() for w in model.weights))
  return {"plan": plan, "bits": bits.hexdigest()}


out = {"measured": fit()}
tf.config.experimental.enable_op_determinism()
out["deterministic"] = fit()
print(json.dumps(out))
"""


def _runs(*cheap):
  """One child process per entry of `cheap`, run side by side."""
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, c], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c in cheap]
  out = []
  for proc in procs:
    try:
      stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
    assert proc.returncode == 0, stderr[-3000:]
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


class CostModelPerProcessTest(tf.test.TestCase):
  """Calibration runs seconds of collectives: once per process and devices."""

  def test_a_new_fused_all_reduce_for_the_same_devices_does_not_calibrate_again(self):
    devices = collectives_lib.canonical_devices(helpers.devices(3))
    with mock.patch.dict(planner._COST_MODELS, clear=True), mock.patch.object(  # pylint: disable=protected-access
        calibration, "calibrate", wraps=calibration.calibrate) as measured:
      first = tf_fusion.FusedAllReduce().cost_model(devices)
      again = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(compression="fp16")
                                       ).cost_model(devices)
      self.assertEqual(measured.call_count, 1)
      tf_fusion.FusedAllReduce().cost_model(devices[1:])   # other devices: measured
      self.assertEqual(measured.call_count, 2)
    self.assertIs(again, first)
    self.assertIn(f"TensorFlow {tf.__version__}", first.topology)

  def test_auto_calibrates_once_on_first_use(self):
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(algorithm="auto"))
    devices = helpers.devices(2)
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
    value = helpers.per_replica(strategy, [np.full([64], r + 1.0, np.float32)
                                           for r in range(2)])

    @tf.function
    def reduce():
      return ops.batch_reduce(tf.distribute.ReduceOp.SUM, [(value, value)])[0].values

    with strategy.scope():
      first = reduce()
      model = ops.cost_model(devices)
      reduce()  # Same trace: no second calibration.
    self.assertAllEqual(first[1], np.full([64], 3.0))
    self.assertIs(ops.cost_model(devices), model)
    self.assertIn(ops.last_plan[0].algorithm, model.algorithms)
    self.assertIsNotNone(ops.last_plan[0].predicted_seconds)


class RepeatablePlanTest(tf.test.TestCase):

  def test_two_processes_same_plan_and_bits_under_op_determinism(self):
    ring_day, one_day = _runs("ring", "reduce_to_one")
    # Control: what was measured decides the plan when timing may decide.
    self.assertNotEqual(ring_day["measured"]["plan"], one_day["measured"]["plan"])
    self.assertNotEqual(ring_day["measured"]["bits"], one_day["measured"]["bits"])
    self.assertEqual(ring_day["deterministic"]["plan"], one_day["deterministic"]["plan"])
    self.assertEqual(ring_day["deterministic"]["bits"], one_day["deterministic"]["bits"])


if __name__ == "__main__":
  tf.test.main()
