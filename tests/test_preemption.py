"""SIGTERM to any worker: every worker saves at one agreed batch and stops; the rerun
resumes from that step (tf_fusion.SaveOnPreemption, the recipe)."""

import json
import os
import re
import signal
import time

import keras
import numpy as np
import portpicker
import tensorflow as tf

import tf_fusion
from tests.harness import helpers
from tests.harness import multi_worker
from tf_fusion import launch


class SaveOnPreemptionTest(tf.test.TestCase):

  def test_one_process_saves_after_the_margin_and_stops(self):
    strategy = tf_fusion.mirrored_strategy(helpers.devices(2))
    with strategy.scope():
      model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
      model.compile("sgd", "mse")
    saved = []
    stop = tf_fusion.SaveOnPreemption(
        save=lambda: saved.append(int(model.optimizer.iterations.numpy())),
        margin_batches=3)
    before = signal.getsignal(signal.SIGTERM)

    def terminate(batch, logs):
      del logs
      if batch == 1:      # during the 2nd batch
        os.kill(os.getpid(), signal.SIGTERM)

    x = np.ones((64, 4), np.float32)
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_train_batch_begin=terminate), stop])
    self.assertEqual(saved, [5])                   # batch 2 + 3, once
    self.assertEqual(stop.preempted_at, 5)
    self.assertEqual(int(model.optimizer.iterations.numpy()), 5)   # stopped there
    self.assertIs(signal.getsignal(signal.SIGTERM), before)       # handler given back


class PreemptedRecipeTest(tf.test.TestCase):

  def test_sigterm_to_one_worker_saves_all_and_the_rerun_resumes(self):
    """2 workers (TF_CONFIG, 1 CPU replica each), 12 steps, 5 per epoch; worker 1 gets
    SIGTERM once step 5 is logged."""
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    envs = [(dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CONFIG=launch.tf_config(ports, i)),
             ["--num_devices=1"]) for i in range(2)]
    model_dir = self.create_tempdir().full_path
    flags = ["--train_steps=12", "--num_train_examples=40"]
    started = multi_worker.start_recipe(envs, model_dir, flags)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
      with open(started[1][1]) as f:
        if re.search(r"step 5/12", f.read()):
          break
      if any(p.poll() is not None for p, _ in started):
        break
      time.sleep(0.2)
    started[1][0].send_signal(signal.SIGTERM)
    first = multi_worker.finish_recipe(started, codes=(143,))
    saved = {s["final_step"] for s in first}
    self.assertLen(saved, 1)                        # the same step on both workers
    (saved,) = saved
    self.assertBetween(saved, 6, 11)                # the margin after step 5 ...
    self.assertNotEqual(saved, 10)                  # ... mid-epoch, not an epoch's end
    self.assertTrue(all(s["preempted"] for s in first))
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    envs = [(dict(env, TF_CONFIG=launch.tf_config(ports, i)), extra)
            for i, (env, extra) in enumerate(envs)]
    second = multi_worker.run_recipe(envs, model_dir, flags)
    for s in second:
      # ... and the rerun starts there: no step twice, none skipped.
      self.assertEqual((s["start_step"], s["final_step"], s["preempted"]),
                       (saved, 12, False))
    self.assertEqual(second[0]["train_loss"], second[1]["train_loss"])
    with open(os.path.join(model_dir, "stats.json")) as f:
      self.assertEqual(json.load(f)["updates"], 12)


if __name__ == "__main__":
  tf.test.main()
