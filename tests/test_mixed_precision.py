"""Loss scaling that reduces first: global finiteness, FP16-wire overflow and underflow."""

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers


def _step(n, per_replica_grads, compression="none", keras_lso=False, scale=2.0**15,
          stock=False):
  """One apply_gradients of SGD(lr=1) on w = 0 with loss sum(w * c_r) on replica r.

  The gradient on replica r is c_r (times the loss scale), so the reduced, unscaled
  gradient is sum_r c_r and the new weight is -sum_r c_r (exact in float32 even for
  tiny gradients, which 1 - g would round away).

  `stock`: TensorFlow's MirroredStrategy and reduction (no tf_fusion anywhere).

  Returns:
    (weights on every replica, loss scale after, inner-optimizer iterations after).
  """
  if stock:
    strategy = tf_fusion.strategy.tf_mirrored_strategy(
        helpers.devices(n), tf.distribute.ReductionToOneDevice())
  else:
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(compression=compression,
                                                           algorithm="ring"))
    strategy = tf.distribute.MirroredStrategy(helpers.devices(n), cross_device_ops=ops)
  size = per_replica_grads[0].size
  with strategy.scope():
    w = keras.Variable(np.zeros(size, np.float32), name="w")
    inner = keras.optimizers.SGD(1.0)
    if keras_lso:
      opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=scale)
    else:
      opt = tf_fusion.mixed_precision.loss_scale(inner, initial_scale=scale)
    opt.build([w])
  _train_fn(strategy, opt, w)(helpers.per_replica(strategy, per_replica_grads))
  weights = [v.numpy() for v in w.value.values]
  return weights, float(opt.dynamic_scale.numpy()), int(opt.iterations.numpy())


def _train_fn(strategy, opt, w):
  """One step of `opt` on loss sum(w * c_r) on replica r, as a tf.function of c."""

  @tf.function
  def train(c):
    def replica_fn(c):
      with tf.GradientTape() as tape:
        loss = opt.scale_loss(tf.reduce_sum(w * c))
      opt.apply_gradients(zip(tape.gradient(loss, [w]), [w]))
    strategy.run(replica_fn, args=(c,))
  return train


class GlobalFinitenessTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("_2_replicas", 2), ("_4_replicas", 4))
  def test_inf_on_the_last_replica_alone_skips_every_replica(self, n):
    grads = [np.full(3, 0.25, np.float32) for _ in range(n)]
    grads[-1][1] = np.inf
    weights, scale, iterations = _step(n, grads)
    for w in weights:
      self.assertAllEqual(w, np.zeros(3))       # no replica applied the step
    self.assertEqual(scale, 2.0**14)            # the scale dropped once
    self.assertEqual(iterations, 0)

  def test_keras_loss_scale_optimizer_applies_it_under_tensorflows_strategy(self):
    """The control: Keras 3.15 decides from replica 0 and writes -inf into the weights.

    If this starts failing, Keras fixed its LossScaleOptimizer: keep ours (it also keeps
    the wire scaled) but update docs/keras.md.
    """
    grads = [np.full(3, 0.25, np.float32) for _ in range(2)]
    grads[1][1] = np.inf
    weights, _, _ = _step(2, grads, keras_lso=True, stock=True)
    self.assertFalse(np.all(np.isfinite(weights[0])))

  def test_keras_loss_scale_optimizer_skips_it_under_tf_fusion(self):
    """Keras's own LossScaleOptimizer (as compile adds it) over tf_fusion's reduction
    decides on the reduced gradients too."""
    grads = [np.full(3, 0.25, np.float32) for _ in range(2)]
    grads[1][1] = np.inf
    weights, scale, _ = _step(2, grads, keras_lso=True)
    for w in weights:
      self.assertAllEqual(w, np.zeros(3))
    self.assertEqual(scale, 2.0**14)

  def test_finite_step_applies_the_reduced_unscaled_mean(self):
    rng = np.random.RandomState(0)
    grads = [rng.randn(5).astype(np.float32) for _ in range(4)]
    weights, scale, iterations = _step(4, grads, scale=2.0**10)
    want = -helpers.reference([g * 2.0**10 for g in grads], "SUM") / 2.0**10
    for w in weights:
      self.assertAllClose(w, want, rtol=1e-6, atol=1e-6)
    self.assertEqual(scale, 2.0**10)
    self.assertEqual(iterations, 1)

  def test_fp16_wire_does_not_overflow_a_loss_scaled_sum(self):
    # Each replica's scaled gradient is 2^15 (fits FP16, max 65504); their sum, 2^16,
    # would not: the range scaling halves both on the wire and doubles the sum after,
    # so the step is applied as without compression and the loss scale stays.
    grads = [np.ones(4, np.float32), np.ones(4, np.float32)]
    for compression in ("fp16", "none"):
      weights, scale, iterations = _step(2, grads, compression=compression)
      self.assertAllEqual(weights[0], np.full(4, -2.0))
      self.assertEqual((scale, iterations), (2.0**15, 1))

  def test_a_real_inf_still_skips_under_the_fp16_wire(self):
    grads = [np.ones(4, np.float32), np.ones(4, np.float32)]
    grads[1][2] = np.inf
    weights, scale, iterations = _step(2, grads, compression="fp16")
    self.assertAllEqual(weights[0], np.zeros(4))
    self.assertEqual((scale, iterations), (2.0**14, 0))


class AccumulationFinitenessTest(tf.test.TestCase):
  """Gradient accumulation (2 micro-steps per update) under loss scaling, 4 replicas."""

  def _run(self, per_step_grads, steps=2, scale=2.0**10):
    n = len(per_step_grads[0])
    strategy = tf_fusion.mirrored_strategy(
        helpers.devices(n), tf_fusion.FusionOptions(algorithm="reduce_to_one"))
    with strategy.scope():
      w = keras.Variable(np.zeros(3, np.float32), name="w")
      inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=steps)
      opt = tf_fusion.mixed_precision.loss_scale(inner, initial_scale=scale)
      opt.build([w])
    train = _train_fn(strategy, opt, w)
    for grads in per_step_grads:
      train(helpers.per_replica(strategy, grads))
    accumulators = [a for a in inner._accumulated_gradients if a is not None]  # pylint: disable=protected-access
    return ([v.numpy() for v in w.value.values], float(opt.dynamic_scale.numpy()),
            [[t.numpy() for t in a.value.values] for a in accumulators])

  def test_inf_in_one_micro_batch_of_one_replica_skips_the_update_everywhere(self):
    ones = [np.full(3, 1.0, np.float32) for _ in range(4)]
    poisoned = [g.copy() for g in ones]
    poisoned[3][0] = np.inf                    # micro-batch 1, last replica only
    halves = [np.full(3, 0.5, np.float32) for _ in range(4)]
    # Window 1 (poisoned, ones): skipped. Window 2 (halves, ones): applied.
    weights, scale, accumulators = self._run([poisoned, ones, halves, ones])
    # SGD(1) on the window's mean of the replicas' sum: -(4 * 0.5 + 4 * 1) / 2 = -3.
    for w in weights:
      self.assertAllEqual(w, np.full(3, -3.0))
    self.assertEqual(scale, 2.0**9)            # lowered once, by the poisoned window
    for replicas in accumulators:              # the window restarted clean
      for a in replicas:
        self.assertAllEqual(a, np.zeros(3))

  def test_finite_windows_apply_the_mean_of_the_window(self):
    rng = np.random.RandomState(0)
    steps = [[rng.randn(3).astype(np.float32) for _ in range(4)] for _ in range(4)]
    weights, scale, _ = self._run(steps)
    sums = [np.sum(s, axis=0, dtype=np.float64) for s in steps]
    want = -((sums[0] + sums[1]) / 2 + (sums[2] + sums[3]) / 2)
    for w in weights:
      self.assertAllClose(w, want, rtol=1e-6, atol=1e-6)
    self.assertEqual(scale, 2.0**10)


class SmallGradientTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(("_1e-6", 1e-6), ("_1e-8", 1e-8))
  def test_small_gradient_survives_the_fp16_wire(self, g):
    grads = [np.full(4, g, np.float32) for _ in range(2)]
    weights, _, _ = _step(2, grads, compression="fp16")
    applied = -weights[0].astype(np.float64)
    # Loss-scaled on the wire: within FP16 rounding (2^-11 relative, twice: the cast and
    # the sum) of 2g.
    self.assertAllClose(applied, np.full(4, 2 * g), rtol=2.0**-10, atol=0)

  def test_keras_order_keeps_it_too(self):
    """Keras's LossScaleOptimizer unscales before the wire: 1e-8 is below FP16's
    smallest subnormal, and a raw cast would lose it; the range scaling keeps it."""
    self.assertEqual(np.float16(1e-8), 0)
    grads = [np.full(4, 1e-8, np.float32) for _ in range(2)]
    theirs, _, _ = _step(2, grads, compression="fp16", keras_lso=True)
    self.assertAllClose(-theirs[0], np.full(4, 2e-8), rtol=2.0**-10, atol=0)


class MisuseTest(tf.test.TestCase):

  def test_loss_scale_wants_an_optimizer_instance(self):
    with self.assertRaisesRegex(TypeError, "the class LARS"):
      tf_fusion.mixed_precision.loss_scale(tf_fusion.LARS)
    with self.assertRaisesRegex(TypeError, "got 'sgd'"):
      tf_fusion.mixed_precision.loss_scale("sgd")
    # The class was not touched: a LARS made afterwards still takes its own steps.
    w = keras.Variable(np.array([1.0], np.float32), name="bias")
    opt = tf_fusion.LARS(1.0, momentum=0.0)
    opt.apply([tf.constant([0.5])], [w])
    self.assertAllClose(w.numpy(), [0.5])


class PolicyTest(tf.test.TestCase):

  def tearDown(self):
    keras.mixed_precision.set_dtype_policy("float32")
    super().tearDown()

  def test_policies(self):
    self.assertTrue(tf_fusion.mixed_precision.needs_loss_scaling("mixed_float16"))
    self.assertFalse(tf_fusion.mixed_precision.needs_loss_scaling("mixed_bfloat16"))
    self.assertFalse(tf_fusion.mixed_precision.needs_loss_scaling("float32"))
    policy = tf_fusion.mixed_precision.set_policy("mixed_bfloat16")
    self.assertEqual((policy.compute_dtype, policy.variable_dtype), ("bfloat16", "float32"))
    with self.assertRaisesRegex(ValueError, "valid: float32, mixed_float16, mixed_bfloat16"):
      tf_fusion.mixed_precision.set_policy("float16")
    sgd = keras.optimizers.SGD(0.1)
    self.assertIs(tf_fusion.mixed_precision.optimizer_for_policy(sgd, "mixed_bfloat16"), sgd)
    wrapped = tf_fusion.mixed_precision.optimizer_for_policy(sgd, "mixed_float16")
    self.assertIsInstance(wrapped, tf_fusion.mixed_precision.LossScaleOptimizer)
    with self.assertRaisesRegex(ValueError, "already loss-scaled"):
      tf_fusion.mixed_precision.loss_scale(wrapped)

  def test_config_round_trip(self):
    opt = tf_fusion.mixed_precision.loss_scale(tf_fusion.LARS(0.2, eta=0.01),
                                               initial_scale=1024.0,
                                               dynamic_growth_steps=7)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    self.assertIsInstance(clone, tf_fusion.mixed_precision.LossScaleOptimizer)
    self.assertIsInstance(clone.inner_optimizer, tf_fusion.LARS)
    self.assertEqual(clone.get_config(), opt.get_config())

  def _fit(self, policy, compression):
    tf_fusion.mixed_precision.set_policy(policy)
    rng = np.random.RandomState(0)
    x = rng.randn(512, 8).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(compression=compression))
    strategy = tf.distribute.MirroredStrategy(helpers.devices(2), cross_device_ops=ops)
    with strategy.scope():
      keras.utils.set_random_seed(0)
      model = keras.Sequential([
          keras.Input((8,)),
          keras.layers.Dense(32, activation="relu"),
          keras.layers.BatchNormalization(),
          keras.layers.Dense(2),
          keras.layers.Activation("linear", dtype="float32"),
      ])
      opt = tf_fusion.mixed_precision.optimizer_for_policy(
          tf_fusion.LARS(2.0, momentum=0.9, weight_decay=1e-4, eta=0.01))
      model.compile(opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    history = model.fit(x, y, batch_size=128, epochs=6, verbose=0)
    self.assertNotEmpty(ops.last_plan)   # the gradients went through the fused path
    self.assertEqual({p.wire_dtype for p in ops.last_plan},
                     {tf.float16 if compression == "fp16" else tf.float32})
    return model, history.history

  def test_fit_mixed_float16_with_lars_and_fp16_wire(self):
    model, history = self._fit("mixed_float16", "fp16")
    self.assertIsInstance(model.optimizer, tf_fusion.mixed_precision.LossScaleOptimizer)
    self.assertEqual(model.layers[0].compute_dtype, "float16")
    for w in model.weights:
      self.assertEqual(w.dtype, "float32", msg=w.path)   # master weights stay FP32
      self.assertTrue(np.all(np.isfinite(w.numpy())), msg=w.path)
    self.assertLess(history["loss"][-1], 0.5 * history["loss"][0])
    self.assertGreater(history["accuracy"][-1], 0.9)

  def test_fit_mixed_bfloat16_needs_no_loss_scale(self):
    model, history = self._fit("mixed_bfloat16", "none")
    self.assertIsInstance(model.optimizer, tf_fusion.LARS)
    self.assertEqual(model.layers[0].compute_dtype, "bfloat16")
    self.assertGreater(history["accuracy"][-1], 0.9)


if __name__ == "__main__":
  tf.test.main()
