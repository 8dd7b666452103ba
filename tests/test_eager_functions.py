"""tf.config.run_functions_eagerly(True), as users switch it on to debug: training under
tf_fusion's strategy must still give one device's answer, not hang.

Run in a child process with a bound: a collective launched eagerly waits for ever.
"""

import json
import os
import subprocess
import sys

import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
import keras
import tf_fusion

def train(strategy):
  keras.utils.set_random_seed(3)
  with strategy.scope():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
  rng = np.random.RandomState(0)
  x, y = rng.randn(32, 6).astype("float32"), rng.randn(32, 3).astype("float32")
  model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  return [w.numpy() for w in model.weights]

tf.config.run_functions_eagerly(sys.argv[1] == "eager")
devices = [d.name for d in tf.config.list_logical_devices("CPU")]
want = train(tf.distribute.OneDeviceStrategy(devices[0]))
out = {}
for algorithm, update in (("ring", "replicated"), ("auto", "replicated"),
                          ("ring", "sharded")):   # auto: calibration runs collectives too
  got = train(tf_fusion.mirrored_strategy(devices, tf_fusion.FusionOptions(
      algorithm=algorithm, timeout_seconds=60, weight_update=update)))
  out[f"{algorithm} {update}"] = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
out["still_eager"] = tf.config.functions_run_eagerly()
print(json.dumps(out))
"""


def _run(mode):
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], cwd=ROOT, timeout=240,
                        capture_output=True, text=True, check=False,
                        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


class RunFunctionsEagerlyTest(tf.test.TestCase):

  def test_fit_matches_one_device_with_functions_run_eagerly(self):
    got = _run("eager")
    self.assertTrue(got.pop("still_eager"))   # the user's switch is left as it was
    for algorithm, error in got.items():
      self.assertLess(error, 1e-5, msg=algorithm)
