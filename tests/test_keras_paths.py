"""Keras code as users write it, under tf_fusion's strategy, against one device.

Clipping (clipnorm / clipvalue / global_clipnorm), `compile` under mixed_float16 (Keras
wraps the optimizer in its own LossScaleOptimizer), loss-scale growth under gradient
accumulation, SyncBatchNorm on every wire. Each has a control case: TensorFlow's own
MirroredStrategy, which does what stock Keras does.
"""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers


def _fused(compression="none"):
  return tf_fusion.mirrored_strategy(
      helpers.devices(4), tf_fusion.FusionOptions(algorithm="reduce_to_one",
                                                  compression=compression),
      cost_model=helpers.fixed_cost_model())


def _stock():
  return tf_fusion.strategy.tf_mirrored_strategy(
      helpers.devices(4), tf.distribute.ReductionToOneDevice())


def _data(n=64):
  rng = np.random.RandomState(0)
  x = rng.randn(n, 8).astype(np.float32)
  # Replicas see different gradient norms: clipping each before the sum differs.
  x[n // 4:n // 2] *= 8.0
  y = (x[:, :3] * [1.0, -2.0, 0.5]).astype(np.float32)
  return x, y


def _mlp():
  keras.utils.set_random_seed(3)
  return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                           keras.layers.Dense(3)])


def _fit(strategy, make_optimizer, x, y, batch_size=32, epochs=1, model_fn=_mlp):
  """The weights after fit (one device if `strategy` is None) and the model."""
  scope = strategy.scope() if strategy is not None else _NoScope()
  with scope:
    model = model_fn()
    model.compile(make_optimizer(), loss="mse")
  model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
  return [v.numpy() for v in model.weights], model


class _NoScope:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _relative(got, want, initial):
  return max(np.linalg.norm(g - w) / max(np.linalg.norm(w - i), 1e-12)
             for g, w, i in zip(got, want, initial))


class ClippingTest(tf.test.TestCase, parameterized.TestCase):
  """Clipping acts on the reduced (global-batch) gradient, as on one device."""

  @parameterized.parameters(
      ("sgd", dict(clipnorm=0.05)), ("sgd", dict(global_clipnorm=0.05)),
      ("sgd", dict(clipvalue=0.01)), ("lars", dict(clipnorm=0.05)),
      ("lars", dict(global_clipnorm=0.05)))
  def test_clipping_matches_one_device(self, name, clip):
    def make():
      if name == "sgd":
        return keras.optimizers.SGD(0.1, momentum=0.9, **clip)
      return tf_fusion.LARS(1.0, momentum=0.9, eta=0.05, **clip)

    x, y = _data()
    initial = [v.numpy() for v in _mlp().weights]
    want, _ = _fit(None, make, x, y)
    got, _ = _fit(_fused(), make, x, y)
    self.assertLess(_relative(got, want, initial), 1e-4)
    if name == "sgd" and "clipnorm" in clip:
      # Control: TensorFlow's own MirroredStrategy clips each replica's gradient.
      stock, _ = _fit(_stock(), make, x, y)
      self.assertGreater(_relative(stock, want, initial), 1e-2)


class LossScaleTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.addCleanup(keras.config.set_dtype_policy, keras.config.dtype_policy())

  def _overflow_on_replica_1(self, strategy):
    """mixed_float16, compile(LARS): Keras wraps it in its LossScaleOptimizer. One step
    of 16 examples, 4 per replica; replica 1's overflow float16."""
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data(16)
    x[4:8] = 3e4   # replica 1's examples: its float16 gradients overflow
    with strategy.scope():
      model = _mlp()
      model.compile(tf_fusion.LARS(0.1, eta=0.05), loss="mse")
    initial = [v.numpy() for v in model.weights]
    self.assertIsInstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return initial, [v.numpy() for v in model.weights], model.optimizer

  def test_keras_loss_scaling_from_compile_skips_an_overflow_anywhere(self):
    initial, weights, lso = self._overflow_on_replica_1(_fused())
    for before, after in zip(initial, weights):
      self.assertAllEqual(before, after)   # skipped on every replica
    self.assertEqual(float(lso.dynamic_scale.numpy()), 2.0**14)   # and halved

  def test_control_stock_strategy_applies_replica_1s_overflow(self):
    _, weights, _ = self._overflow_on_replica_1(_stock())
    self.assertFalse(all(np.isfinite(w).all() for w in weights))

  def test_keras_loss_scaling_from_compile_matches_one_device(self):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data()

    def make():
      return tf_fusion.LARS(0.5, momentum=0.9, eta=0.05)

    initial = [v.numpy() for v in _mlp().weights]
    want, one = _fit(None, make, x, y, epochs=2)
    got, fused = _fit(_fused("fp16"), make, x, y, epochs=2)
    self.assertLess(_relative(got, want, initial), 3e-2)
    self.assertEqual(float(fused.optimizer.dynamic_scale.numpy()),
                     float(one.optimizer.dynamic_scale.numpy()))

  def test_growth_counts_batches_under_accumulation_as_on_one_device(self):
    def make():
      return tf_fusion.mixed_precision.loss_scale(
          tf_fusion.LARS(0.1, eta=0.05, gradient_accumulation_steps=2),
          initial_scale=2.0**10, dynamic_growth_steps=2)

    x, y = _data()
    want, one = _fit(None, make, x, y, batch_size=8)     # 8 batches, 4 updates
    got, fused = _fit(_fused(), make, x, y, batch_size=8)
    self.assertEqual(float(one.optimizer.dynamic_scale.numpy()), 2.0**14)
    self.assertEqual(float(fused.optimizer.dynamic_scale.numpy()), 2.0**14)
    initial = [v.numpy() for v in _mlp().weights]
    self.assertLess(_relative(got, want, initial), 1e-4)


def _sync_bn_model():
  keras.utils.set_random_seed(5)
  return keras.Sequential([
      keras.Input((8,)), keras.layers.Dense(16),
      keras.layers.BatchNormalization(synchronized=True, momentum=0.5),
      keras.layers.Activation("relu"), keras.layers.Dense(3)])


class SyncBatchNormTest(tf.test.TestCase, parameterized.TestCase):
  """SyncBN's moments are exact on every wire: only gradients ride the 16-bit one."""

  @parameterized.parameters("none", "fp16", "bf16")
  def test_moments_are_exact(self, wire):
    strategy = _fused(wire)
    rng = np.random.RandomState(1)
    # A mean of 10 and a spread of 0.1: E[x^2] - E[x]^2 keeps 3 digits in float32,
    # none in 16 bits (100 * 2^-11 = 0.05, five times the variance).
    x = (10.0 + 0.1 * rng.randn(4, 8, 5)).astype(np.float32)

    def step(local):
      return keras.ops.moments(local, axes=[0], synchronized=True)

    mean, var = strategy.run(step, args=(helpers.per_replica(strategy, list(x)),))
    flat = x.reshape(-1, 5).astype(np.float64)
    for r in range(4):
      self.assertAllClose(mean.values[r], flat.mean(0), rtol=1e-6)
      self.assertAllClose(var.values[r], flat.var(0), rtol=0.01)

  @parameterized.parameters("none", "fp16", "bf16")
  def test_moving_statistics_after_one_step_match_one_device(self, wire):
    x, y = _data(32)
    x += 5.0

    def make():
      return keras.optimizers.SGD(0.01)

    _, one = _fit(None, make, x, y, model_fn=_sync_bn_model)
    _, fused = _fit(_fused(wire), make, x, y, model_fn=_sync_bn_model)
    bn, bn_one = fused.layers[1], one.layers[1]
    self.assertAllClose(bn.moving_mean.numpy(), bn_one.moving_mean.numpy(), rtol=1e-5)
    self.assertAllClose(bn.moving_variance.numpy(), bn_one.moving_variance.numpy(),
                        rtol=1e-4)


if __name__ == "__main__":
  tf.test.main()
