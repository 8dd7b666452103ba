"""Keras 3 model.fit under MirroredStrategy(cross_device_ops=FusedAllReduce)."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers


def _train(cross_device_ops, steps=8, initial=None):
  strategy = tf.distribute.MirroredStrategy(helpers.devices(4),
                                            cross_device_ops=cross_device_ops)
  with strategy.scope():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(4),
    ])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  if initial is not None:
    initial.extend(v.numpy() for v in model.weights)
  rng = np.random.RandomState(0)
  x = rng.randn(64 * steps, 8).astype(np.float32)
  y = rng.randint(0, 4, 64 * steps)
  model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
  return model


class KerasFitTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.initial = []
    reference = _train(tf.distribute.ReductionToOneDevice(), initial=cls.initial)
    cls.reference = [v.numpy() for v in reference.weights]

  @parameterized.named_parameters(
      # reduce_to_one sums left to right; TF's AddN may reorder (see algorithms.py),
      # so the comparison allows float32 rounding of the sum, compounded over 8 steps.
      dict(testcase_name="_reduce_to_one", algorithm="reduce_to_one",
           compression="none", tol=1e-5),
      dict(testcase_name="_ring", algorithm="ring", compression="none", tol=1e-5),
      # FP16 on the wire rounds each gradient to 11 bits (relative 2^-11 = 5e-4),
      # compounded by momentum: the check is relative to how far training moved.
      dict(testcase_name="_auto_fp16", algorithm="auto", compression="fp16", tol=None),
  )
  def test_same_weights_as_reduction_to_one_device(self, algorithm, compression, tol):
    ops = tf_fusion.FusedAllReduce(
        tf_fusion.FusionOptions(pack_bytes=512, first_pack_bytes=64,
                                algorithm=algorithm, compression=compression),
        cost_model=helpers.fixed_cost_model())
    model = _train(ops)
    for got, want, init in zip(model.weights, self.reference, self.initial):
      if tol is not None:
        self.assertAllClose(got.numpy(), want, rtol=tol, atol=tol)
      elif np.linalg.norm(want - init) > 0:
        moved = np.linalg.norm(want - init)
        self.assertLess(np.linalg.norm(got.numpy() - want) / moved, 0.05, got.path)
    # Replicas stay identical, to the bit. (BatchNormalization's moving statistics
    # are not: Keras updates them per replica from local batches, not via gradients.)
    for variable in model.trainable_variables:
      replicas = [t.numpy() for t in variable._value.values]  # pylint: disable=protected-access
      self.assertLen(replicas, 4)
      for r in replicas[1:]:
        self.assertAllEqual(r, replicas[0], variable.path)
    trainable = len(model.trainable_variables)
    self.assertEqual(sum(e.tensor_count for e in ops.last_plan), trainable)
    self.assertGreater(len(ops.last_plan), 1)
    if compression == "fp16":
      self.assertTrue(all(e.wire_dtype == tf.float16 for e in ops.last_plan))


if __name__ == "__main__":
  tf.test.main()
