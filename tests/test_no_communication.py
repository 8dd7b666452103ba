"""The no-communication floor: each replica keeps its own value, trains on its own
gradients, and the recipe refuses to checkpoint it."""

import os

import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion.no_communication import NoCommunication
from tests.harness import helpers


class NoCommunicationTest(tf.test.TestCase):

  def test_an_all_reduce_hands_each_replica_its_own_value(self):
    strategy = tf_fusion.strategy.no_communication_strategy(helpers.devices(4))
    arrays = [np.full(3, float(r + 1), np.float32) for r in range(4)]
    value = helpers.per_replica(strategy, arrays)
    for op in (tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN):
      (reduced,) = NoCommunication().batch_reduce(op, [(value, value)])
      for r, got in enumerate(reduced.values):
        self.assertAllEqual(got, arrays[r])
    # In a replica step too, merge_call or not.
    got = strategy.run(lambda v: tf.distribute.get_replica_context().all_reduce("sum", v),
                       args=(value,))
    for r, part in enumerate(got.values):
      self.assertAllEqual(part, arrays[r])

  def test_a_reduction_to_the_host_sums_this_workers_replicas(self):
    strategy = tf_fusion.strategy.no_communication_strategy(helpers.devices(2))
    value = helpers.per_replica(strategy, [np.ones(2, np.float32), np.ones(2, np.float32)])
    self.assertAllEqual(strategy.reduce("SUM", value, axis=None), [2.0, 2.0])

  def test_replicas_train_apart(self):
    strategy = tf_fusion.strategy.no_communication_strategy(helpers.devices(2))
    rng = np.random.RandomState(0)
    x = rng.randn(32, 4).astype(np.float32)
    y = rng.randn(32, 1).astype(np.float32)
    with strategy.scope():
      keras.utils.set_random_seed(1)
      model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
      model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    kernel = model.layers[0].kernel.value
    first, second = (v.numpy() for v in kernel.values)
    self.assertGreater(np.abs(first - second).max(), 1e-4)   # no all-reduce happened


class RecipeFloorTest(tf.test.TestCase):

  def test_the_floor_writes_no_checkpoint(self):
    from absl import flags  # pylint: disable=g-import-not-at-top
    from official_recipes.imagenet import main  # pylint: disable=g-import-not-at-top
    from official_recipes.imagenet import recipe_flags  # pylint: disable=g-import-not-at-top
    fv = flags.FlagValues()
    recipe_flags.define_all(fv)
    model_dir = self.create_tempdir().full_path
    fv(["main", "--model=alexnet_bn", "--synthetic", "--image_size=64", "--num_classes=6",
        "--batch_size=8", "--train_steps=2", "--num_train_examples=32",
        "--num_eval_examples=8", "--warmup_epochs=0", "--num_devices=2",
        "--cross_device_ops=none", f"--model_dir={model_dir}", "--log_steps=1"])
    with self.assertLogs("absl", "WARNING") as logs:
      stats = main.run(fv)
    self.assertIn("MEASUREMENT ONLY", "\n".join(logs.output))
    self.assertEqual((stats["cross_device_ops"], stats["final_step"], stats["packs"]),
                     ("none", 2, []))
    self.assertNotIn("backup", os.listdir(model_dir))


if __name__ == "__main__":
  tf.test.main()
