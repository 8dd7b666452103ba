"""tf_fusion.LARS against hand-computed values and an independent NumPy implementation."""

import os

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers


def numpy_lars(weights, grads_per_step, lr, momentum, wd, eta, eps, nesterov, excluded):
  """LARS as written in You et al. 2017, in float64 NumPy, one dict entry per variable.

  Args:
    weights: {name: initial array}.
    grads_per_step: list over steps of {name: gradient}.
    excluded: names with no weight decay and no trust ratio.
  Returns:
    {name: array} after all steps.
  """
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  vel = {k: np.zeros_like(v) for k, v in w.items()}
  for grads in grads_per_step:
    for k in w:
      g = grads[k].astype(np.float64)
      decay = 0.0 if k in excluded else wd
      trust = 1.0
      if k not in excluded:
        wn, gn = np.linalg.norm(w[k]), np.linalg.norm(g)
        if wn > 0 and gn > 0:
          trust = eta * wn / (gn + decay * wn + eps)
      step = lr * trust * (g + decay * w[k])
      vel[k] = momentum * vel[k] + step
      w[k] = w[k] - (momentum * vel[k] + step if nesterov else vel[k])
  return w


def _apply(opt, variables, grads):
  opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))


class LarsMathTest(tf.test.TestCase, parameterized.TestCase):

  def test_one_step_by_hand(self):
    # ||w|| = 5, ||g|| = 1: local_lr = 0.001 * 5 / (1 + 0.01 * 5) = 0.0047619...
    # lr * local_lr * (g + wd * w) = 0.1 * 0.0047619 * [0.63, 0.84] = [0.0003, 0.0004]
    w = keras.Variable(np.array([3.0, 4.0], np.float32), name="kernel")
    opt = tf_fusion.LARS(0.1, momentum=0.9, weight_decay=0.01, eta=0.001)
    _apply(opt, [w], [np.array([0.6, 0.8], np.float32)])
    self.assertAllClose(w.numpy(), [2.9997, 3.9996], rtol=0, atol=1e-7)
    self.assertAllClose(opt.momentums[0].numpy(), [0.0003, 0.0004], rtol=0, atol=1e-9)

  @parameterized.named_parameters(("_momentum", False), ("_nesterov", True))
  def test_five_step_trajectory(self, nesterov):
    rng = np.random.RandomState(3)
    init = {"dense/kernel": rng.randn(6, 4).astype(np.float32),
            "dense/bias": rng.randn(4).astype(np.float32),
            "conv/kernel": rng.randn(3, 3, 2).astype(np.float32)}
    grads = [{k: (rng.randn(*v.shape) * 0.1).astype(np.float32) for k, v in init.items()}
             for _ in range(5)]
    hp = dict(lr=0.5, momentum=0.9, wd=1e-3, eta=0.01, eps=1e-6)
    want = numpy_lars(init, grads, nesterov=nesterov, excluded={"dense/bias"}, **hp)

    variables = [keras.Variable(v, name=k.split("/")[1]) for k, v in init.items()]
    paths = list(init)
    opt = tf_fusion.LARS(hp["lr"], momentum=hp["momentum"], weight_decay=hp["wd"],
                         eta=hp["eta"], epsilon=hp["eps"], nesterov=nesterov)
    # Keras paths of free variables are their names; exclude by object, as a user would.
    opt.exclude_from_weight_decay(var_list=[variables[1]])
    for step in grads:
      _apply(opt, variables, [step[k] for k in paths])
    for k, var in zip(paths, variables):
      self.assertAllClose(var.numpy(), want[k], rtol=1e-5, atol=1e-6, msg=k)
    self.assertEqual(int(opt.iterations.numpy()), 5)

  def test_zero_norm_guards(self):
    # ||w|| = 0: local_lr = 1, so the step is lr * g.
    w0 = keras.Variable(np.zeros(3, np.float32), name="kernel")
    # ||g|| = 0: local_lr = 1, so the step is lr * wd * w.
    w1 = keras.Variable(np.array([1.0, -2.0], np.float32), name="kernel")
    opt = tf_fusion.LARS(0.1, momentum=0.0, weight_decay=0.5, eta=0.001)
    _apply(opt, [w0, w1], [np.array([1.0, 2.0, 3.0], np.float32), np.zeros(2, np.float32)])
    self.assertAllClose(w0.numpy(), [-0.1, -0.2, -0.3])
    self.assertAllClose(w1.numpy(), [1.0 - 0.05, -2.0 + 0.1])
    self.assertTrue(np.all(np.isfinite(w0.numpy())))

  def test_fp16_variable_norms_in_fp32(self):
    # g = 1e-4: g*g = 1e-8 is below FP16's smallest subnormal (6e-8), so an FP16 norm
    # would be 0 and the trust ratio would fall back to 1 (a 1000x larger step).
    w = keras.Variable(np.full(4, 0.5, np.float16), dtype="float16", name="kernel")
    g = np.full(4, 1e-4, np.float16)
    opt = tf_fusion.LARS(1.0, momentum=0.0, weight_decay=0.0, eta=0.001)
    _apply(opt, [w], [g])
    want = numpy_lars({"k": np.full(4, 0.5)}, [{"k": g.astype(np.float64)}], lr=1.0,
                      momentum=0.0, wd=0.0, eta=0.001, eps=0.0, nesterov=False,
                      excluded=set())["k"]
    self.assertEqual(w.dtype, "float16")
    self.assertAllClose(w.numpy().astype(np.float64), want.astype(np.float16), rtol=0,
                        atol=0)


class LarsExclusionTest(tf.test.TestCase):

  def _model(self):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, name="dense"),
        keras.layers.BatchNormalization(name="batch_normalization"),
        keras.layers.Dense(2, name="head"),
    ], name="net")

  def test_default_excludes_bias_and_batch_norm(self):
    model = self._model()
    opt = tf_fusion.LARS(0.1)
    opt.build(model.trainable_variables)
    decay = {v.path: opt.uses_weight_decay(v) for v in model.trainable_variables}
    adapt = {v.path: opt.uses_layer_adaptation(v) for v in model.trainable_variables}
    want = {"net/dense/kernel": True, "net/dense/bias": False,
            "net/batch_normalization/gamma": False, "net/batch_normalization/beta": False,
            "net/head/kernel": True, "net/head/bias": False}
    self.assertEqual(decay, want)
    self.assertEqual(adapt, want)

  def test_separate_lists_and_variable_objects(self):
    model = self._model()
    opt = tf_fusion.LARS(0.1, exclude_from_weight_decay=["head"],
                         exclude_from_layer_adaptation=["bias"])
    kernel = model.get_layer("dense").kernel
    opt.exclude_from_layer_adaptation(var_list=[kernel])
    opt.build(model.trainable_variables)
    self.assertTrue(opt.uses_weight_decay(kernel))
    self.assertFalse(opt.uses_layer_adaptation(kernel))
    self.assertFalse(opt.uses_weight_decay(model.get_layer("head").kernel))
    self.assertTrue(opt.uses_layer_adaptation(model.get_layer("head").kernel))
    self.assertFalse(opt.uses_layer_adaptation(model.get_layer("head").bias))
    with self.assertRaisesRegex(ValueError, "before the optimizer is built"):
      opt.exclude_from_weight_decay(var_names=["gamma"])

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "regexes matched against variable paths"):
      tf_fusion.LARS(0.1, exclude_from_weight_decay=[3])
    with self.assertRaisesRegex(ValueError, "not a valid regex"):
      tf_fusion.LARS(0.1, exclude_from_layer_adaptation=["("])
    with self.assertRaisesRegex(ValueError, r"momentum must be in \[0, 1\)"):
      tf_fusion.LARS(0.1, momentum=1.0)
    with self.assertRaisesRegex(ValueError, "eta must be a number >= 0"):
      tf_fusion.LARS(0.1, eta=-1.0)


class LarsOptimizerContractTest(tf.test.TestCase):
  """What Keras's optimizers do and LARS must too (as Keras's own optimizer tests ask)."""

  def test_raw_tf_variables_are_matched_by_name(self):
    # A raw tf.Variable has no .path; Keras matches it by name. "bias" is excluded, so
    # its step is plain momentum SGD: w - lr * g.
    bias = tf.Variable([1.0, 2.0], name="bias")
    kernel = tf.Variable([[3.0, 4.0]], name="kernel")
    opt = tf_fusion.LARS(0.1, momentum=0.0, weight_decay=0.0, eta=0.001)
    _apply(opt, [bias, kernel], [np.array([0.1, 0.2], np.float32),
                                 np.array([[0.6, 0.8]], np.float32)])
    self.assertFalse(opt.uses_layer_adaptation(bias))
    self.assertTrue(opt.uses_layer_adaptation(kernel))
    self.assertAllClose(bias.numpy(), [0.99, 1.98])
    # ||w|| = 5, ||g|| = 1: trust 0.005, step 0.1 * 0.005 * g.
    self.assertAllClose(kernel.numpy(), [[3.0 - 0.0003, 4.0 - 0.0004]], atol=1e-7)

  def test_names_are_numbered_as_keras_does(self):
    first, second = tf_fusion.LARS(), tf_fusion.LARS()
    self.assertNotEqual(first.name, second.name)
    self.assertTrue(first.name.startswith("lars"))
    self.assertEqual(tf_fusion.LARS(name="mine").name, "mine")

  def test_weight_decay_none_means_none(self):
    w = keras.Variable(np.array([3.0, 4.0], np.float32), name="kernel")
    opt = tf_fusion.LARS(0.1, momentum=0.0, weight_decay=None, eta=0.001)
    _apply(opt, [w], [np.array([0.6, 0.8], np.float32)])
    self.assertAllClose(w.numpy(), [3.0 - 0.0003, 4.0 - 0.0004], atol=1e-7)
    self.assertEqual(tf_fusion.LARS.from_config(opt.get_config()).weight_decay, 0.0)


class LarsKerasTest(tf.test.TestCase):

  def _data(self):
    rng = np.random.RandomState(0)
    return rng.randn(256, 8).astype(np.float32), rng.randint(0, 3, 256)

  def _model(self, batch_norm=True):
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.BatchNormalization() if batch_norm else keras.layers.Identity(),
        keras.layers.Dense(3),
    ])

  def _compile(self, model, **kwargs):
    schedule = keras.optimizers.schedules.PolynomialDecay(1.0, 100, 0.0, power=2.0)
    model.compile(tf_fusion.LARS(schedule, momentum=0.9, weight_decay=1e-4,
                                 eta=0.01, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **kwargs)

  def test_config_round_trip(self):
    opt = tf_fusion.LARS(0.3, momentum=0.8, weight_decay=1e-3, eta=0.002, epsilon=1e-9,
                         nesterov=True, exclude_from_weight_decay=["bias"],
                         exclude_from_layer_adaptation=["gamma", "beta"], clipnorm=2.0)
    config = keras.optimizers.serialize(opt)
    clone = keras.optimizers.deserialize(config)
    self.assertIsInstance(clone, tf_fusion.LARS)
    self.assertEqual(clone.get_config(), opt.get_config())
    for key, want in dict(momentum=0.8, weight_decay=1e-3, eta=0.002, epsilon=1e-9,
                          nesterov=True, exclude_from_weight_decay=["bias"],
                          exclude_from_layer_adaptation=["gamma", "beta"],
                          clipnorm=2.0).items():
      self.assertEqual(clone.get_config()[key], want, msg=key)

  def test_save_and_load_with_optimizer_state(self):
    x, y = self._data()
    model = self._model()
    self._compile(model)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = os.path.join(self.create_tempdir().full_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    self.assertIsInstance(loaded.optimizer, tf_fusion.LARS)
    self.assertEqual(int(loaded.optimizer.iterations.numpy()), 8)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
      self.assertAllEqual(a.numpy(), b.numpy())
    # Momentum carried over: one more epoch from either gives the same weights.
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
      self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

  def test_jit_compile_fit_matches_eager_graph(self):
    x, y = self._data()
    results = []
    for jit in (False, True):
      model = self._model()
      self._compile(model, jit_compile=jit)
      model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
      results.append([w.numpy() for w in model.weights])
    for a, b in zip(*results):
      self.assertAllClose(a, b, rtol=1e-4, atol=1e-5)

  def test_fit_under_mirrored_strategy_with_fused_all_reduce(self):
    """4 replicas through FusedAllReduce give the one-device weights (same global batch)."""
    x, y = self._data()
    # No batch norm: each replica would normalise by its own quarter-batch statistics.
    one = self._model(batch_norm=False)
    self._compile(one)
    one.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    ops = tf_fusion.FusedAllReduce(tf_fusion.FusionOptions(pack_bytes=256,
                                                           algorithm="ring"))
    strategy = tf.distribute.MirroredStrategy(helpers.devices(4), cross_device_ops=ops)
    with strategy.scope():
      model = self._model(batch_norm=False)
      self._compile(model)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    self.assertGreater(len(ops.last_plan), 1)
    for a, b in zip(one.weights, model.weights):
      self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, msg=a.path)


if __name__ == "__main__":
  tf.test.main()
