"""tf_fusion.LAMB against a float64 NumPy Algorithm 2 (You et al. 2019), Keras's own
Lamb where the two agree, and one device under tf_fusion's strategy."""

import os

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers
from tests.harness import training_cases


def numpy_lamb(weights, grads_per_step, lr, beta_1, beta_2, eps, wd, no_decay=(),
               no_adapt=()):
  """Algorithm 2 of You et al. 2019 in float64: {name: array} after all steps."""
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  m = {k: np.zeros_like(v) for k, v in w.items()}
  v2 = {k: np.zeros_like(v) for k, v in w.items()}
  for t, grads in enumerate(grads_per_step, start=1):
    for k in w:
      g = grads[k].astype(np.float64)
      m[k] = beta_1 * m[k] + (1 - beta_1) * g
      v2[k] = beta_2 * v2[k] + (1 - beta_2) * g * g
      r = (m[k] / (1 - beta_1**t)) / (np.sqrt(v2[k] / (1 - beta_2**t)) + eps)
      u = r + (0.0 if k in no_decay else wd) * w[k]
      ratio = 1.0
      wn, un = np.linalg.norm(w[k]), np.linalg.norm(u)
      if k not in no_adapt and wn > 0 and un > 0:
        ratio = wn / un
      w[k] = w[k] - lr * ratio * u
  return w


def _apply(opt, variables, grads):
  opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))


def _problem(seed=3, steps=6):
  rng = np.random.RandomState(seed)
  init = {"dense/kernel": rng.randn(6, 4).astype(np.float32),
          "dense/bias": rng.randn(4).astype(np.float32),
          "norm/gamma": (1 + 0.1 * rng.randn(4)).astype(np.float32),
          "conv/kernel": rng.randn(3, 3, 2).astype(np.float32)}
  grads = [{k: (rng.randn(*v.shape) * 0.1).astype(np.float32) for k, v in init.items()}
           for _ in range(steps)]
  return init, grads


class LambMathTest(tf.test.TestCase, parameterized.TestCase):

  def test_one_step_by_hand(self):
    # Step 1: m_hat = g, v_hat = g^2, r = g / (|g| + eps) = sign(g) (eps = 0).
    # w = [3, 4], g = [0.6, -0.8]: r = [1, -1]; u = r + 0.1 * w = [1.3, -0.6].
    # ||w|| = 5, ||u|| = sqrt(2.05): w - 0.1 * 5 / sqrt(2.05) * u.
    w = keras.Variable(np.array([3.0, 4.0], np.float32), name="kernel")
    opt = tf_fusion.LAMB(0.1, epsilon=0.0, weight_decay=0.1)
    _apply(opt, [w], [np.array([0.6, -0.8], np.float32)])
    ratio = 5.0 / np.sqrt(1.3**2 + 0.6**2)
    self.assertAllClose(w.numpy(), [3.0 - 0.1 * ratio * 1.3, 4.0 + 0.1 * ratio * 0.6],
                        rtol=0, atol=2e-6)   # float32 near 4: ulp 4.8e-7
    self.assertAllClose(opt.momentums[0].numpy(), [0.06, -0.08], atol=1e-7)
    self.assertAllClose(opt.velocities[0].numpy(), [0.00036, 0.00064], atol=1e-9)

  @parameterized.named_parameters(("_decay", 0.01), ("_no_decay", 0.0))
  def test_trajectory_against_numpy(self, wd):
    init, grads = _problem()
    hp = dict(lr=0.02, beta_1=0.9, beta_2=0.999, eps=1e-6, wd=wd)
    # Default exclusions by path: "bias" and "gamma" (a LayerNorm's scale).
    excluded = {"dense/bias", "norm/gamma"}
    want = numpy_lamb(init, grads, no_decay=excluded, no_adapt=excluded, **hp)
    variables = [keras.Variable(v, name=k.replace("/", "_")) for k, v in init.items()]
    opt = tf_fusion.LAMB(hp["lr"], beta_1=hp["beta_1"], beta_2=hp["beta_2"],
                         epsilon=hp["eps"], weight_decay=wd)
    for step in grads:
      _apply(opt, variables, [step[k] for k in init])
    for k, var in zip(init, variables):
      self.assertAllClose(var.numpy(), want[k], rtol=2e-5, atol=1e-6, msg=k)
    self.assertFalse(opt.uses_layer_adaptation(variables[1]))
    self.assertFalse(opt.uses_weight_decay(variables[2]))
    self.assertTrue(opt.uses_layer_adaptation(variables[3]))

  def test_separate_lists(self):
    init, grads = _problem(seed=5, steps=4)
    want = numpy_lamb(init, grads, lr=0.05, beta_1=0.9, beta_2=0.99, eps=1e-6, wd=0.1,
                      no_decay={"dense/bias"}, no_adapt={"conv/kernel"})
    variables = [keras.Variable(v, name=k.replace("/", "_")) for k, v in init.items()]
    opt = tf_fusion.LAMB(0.05, beta_2=0.99, weight_decay=0.1,
                         exclude_from_weight_decay=["bias"],
                         exclude_from_layer_adaptation=[])
    opt.exclude_from_layer_adaptation(var_list=[variables[3]])
    for step in grads:
      _apply(opt, variables, [step[k] for k in init])
    for k, var in zip(init, variables):
      self.assertAllClose(var.numpy(), want[k], rtol=2e-5, atol=1e-6, msg=k)

  def test_keras_lamb_is_the_control_without_decay_or_exclusions(self):
    # With no weight decay and no exclusions the two algorithms are the same: Keras's
    # Lamb is an independent implementation to agree with. With decay they part.
    init, grads = _problem(seed=7, steps=5)
    results = {}
    for wd in (0.0, 0.1):
      for name in ("ours", "keras"):
        variables = [keras.Variable(v) for v in init.values()]
        opt = (tf_fusion.LAMB(0.01, weight_decay=wd, exclude_from_weight_decay=[])
               if name == "ours" else keras.optimizers.Lamb(0.01, weight_decay=wd))
        for step in grads:
          _apply(opt, variables, list(step.values()))
        results[name, wd] = [v.numpy() for v in variables]
    # float32 against float32 by other arithmetic: a few units of 1e-5 after 5 steps.
    for a, b in zip(results["ours", 0.0], results["keras", 0.0]):
      self.assertAllClose(a, b, rtol=5e-5, atol=2e-5)
    differ = max(np.abs(a - b).max()
                 for a, b in zip(results["ours", 0.1], results["keras", 0.1]))
    self.assertGreater(differ, 1e-3)

  def test_zero_norm_guards(self):
    w0 = keras.Variable(np.zeros(3, np.float32), name="kernel")   # ||w|| = 0: ratio 1
    w1 = keras.Variable(np.array([1.0, -2.0], np.float32), name="kernel")
    opt = tf_fusion.LAMB(0.1, epsilon=1e-6, weight_decay=0.0)
    # ||u|| = 0 (zero gradient, no decay): ratio 1, step 0. (||w|| = 0 above: the step
    # is lr * r, r = g / (|g| + eps) = sign(g) to 1e-6.)
    _apply(opt, [w0, w1], [np.array([1.0, -2.0, 3.0], np.float32), np.zeros(2, np.float32)])
    self.assertAllClose(w0.numpy(), [-0.1, 0.1, -0.1])
    self.assertAllClose(w1.numpy(), [1.0, -2.0])

  def test_fp16_variable_in_fp32(self):
    # g = 1e-4: g^2 = 1e-8 underflows FP16 (smallest subnormal 6e-8): an FP16 second
    # moment would be 0 and the step 1 / eps times too large.
    w = keras.Variable(np.full(4, 0.5, np.float16), dtype="float16", name="kernel")
    g = np.full(4, 1e-4, np.float16)
    opt = tf_fusion.LAMB(0.01, weight_decay=0.0)
    _apply(opt, [w], [g])
    want = numpy_lamb({"k": np.full(4, 0.5)}, [{"k": g.astype(np.float64)}], lr=0.01,
                      beta_1=0.9, beta_2=0.999, eps=1e-6, wd=0.0)["k"]
    self.assertEqual(w.dtype, "float16")
    self.assertAllClose(w.numpy().astype(np.float64), want.astype(np.float16), rtol=0,
                        atol=0)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"LAMB beta_1 must be in \[0, 1\)"):
      tf_fusion.LAMB(beta_1=1.0)
    with self.assertRaisesRegex(ValueError, "LAMB epsilon must be a number >= 0"):
      tf_fusion.LAMB(epsilon=-1.0)
    with self.assertRaisesRegex(ValueError, "LAMB exclude_from_weight_decay takes regexes"):
      tf_fusion.LAMB(exclude_from_weight_decay=[3])
    self.assertEqual(tf_fusion.LAMB(weight_decay=None).weight_decay, 0.0)


class LambKerasTest(tf.test.TestCase, parameterized.TestCase):
  """Keras's optimizer behaviours: clipping, EMA, schedules, saving, accumulation."""

  def _data(self):
    rng = np.random.RandomState(0)
    return rng.randn(128, 8).astype(np.float32), rng.randint(0, 3, 128)

  def _model(self):
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.LayerNormalization(), keras.layers.Dense(3)])

  def _fit(self, opt, epochs=1):
    x, y = self._data()
    model = self._model()
    model.compile(opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False)
    return model

  def test_config_round_trip(self):
    schedule = keras.optimizers.schedules.PolynomialDecay(1e-3, 100, 0.0, power=1.0)
    opt = tf_fusion.LAMB(schedule, beta_1=0.8, beta_2=0.99, epsilon=1e-8,
                         weight_decay=0.02, exclude_from_weight_decay=["bias"],
                         exclude_from_layer_adaptation=["gamma"], clipnorm=1.0,
                         use_ema=True)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    self.assertIsInstance(clone, tf_fusion.LAMB)
    self.assertEqual(clone.get_config(), opt.get_config())
    self.assertEqual(clone.get_config()["exclude_from_layer_adaptation"], ["gamma"])

  def test_save_and_load_keras_file(self):
    model = self._fit(tf_fusion.LAMB(0.01))
    path = os.path.join(self.create_tempdir().full_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertIsInstance(loaded.optimizer, tf_fusion.LAMB)
    self.assertEqual(int(loaded.optimizer.iterations.numpy()), 4)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
      self.assertAllEqual(a.numpy(), b.numpy())
    x, y = self._data()
    model.fit(x, y, batch_size=32, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=32, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
      self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

  def test_schedule_is_followed(self):
    # A schedule that is 0 after the first step: the weights move once, then stop.
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.01, 0.0])
    w = keras.Variable(np.array([3.0, 4.0], np.float32), name="kernel")
    opt = tf_fusion.LAMB(schedule)
    _apply(opt, [w], [np.array([0.6, -0.8], np.float32)])
    after_one = w.numpy().copy()
    self.assertGreater(np.abs(after_one - [3.0, 4.0]).max(), 1e-3)
    _apply(opt, [w], [np.array([0.6, -0.8], np.float32)])
    self.assertAllEqual(w.numpy(), after_one)

  def test_clipvalue_reaches_the_moments(self):
    w = keras.Variable(np.array([3.0, 4.0], np.float32), name="kernel")
    opt = tf_fusion.LAMB(0.01, clipvalue=0.1)
    _apply(opt, [w], [np.array([5.0, -0.05], np.float32)])
    self.assertAllClose(opt.momentums[0].numpy(), [0.01, -0.005])

  def test_ema_overwrites_weights_with_the_average(self):
    model = self._fit(tf_fusion.LAMB(0.05, use_ema=True, ema_momentum=0.5,
                                     ema_overwrite_frequency=4))
    opt = model.optimizer
    ema = [opt._model_variables_moving_average[i].numpy()  # pylint: disable=protected-access
           for i in range(len(model.trainable_variables))]
    for var, avg in zip(model.trainable_variables, ema):
      self.assertAllClose(var.numpy(), avg, rtol=1e-6, atol=1e-7)

  # LAMB's own paths under a strategy: its accumulation, its eager apply (its plain
  # step with IndexedSlices: test_training_equivalence's transformer cases).
  @parameterized.parameters("accumulation", "run_eagerly")
  def test_under_strategy_matches_one_device(self, case):
    want = training_cases.train(None, case, "lamb")
    strategy = tf_fusion.mirrored_strategy(
        helpers.devices(4), tf_fusion.FusionOptions(pack_bytes=512, first_pack_bytes=64,
                                                    algorithm="ring"),
        cost_model=helpers.fixed_cost_model())
    got = training_cases.train(strategy, case, "lamb")
    with training_cases.dtype_policy("float32"):
      initial = [v.numpy() for v in training_cases.build(case, "lamb").weights]
    for g, w, i in zip(got, want, initial):
      moved = np.linalg.norm(w - i)
      self.assertGreater(moved, 0)
      self.assertLess(np.linalg.norm(g - w) / moved, 1e-4)


if __name__ == "__main__":
  tf.test.main()
