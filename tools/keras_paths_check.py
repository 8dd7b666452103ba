"""Keras code as users write it, under tf_fusion's strategy and TensorFlow's, against one
device: the figures docs/keras.md quotes.

    python -m tools.keras_paths_check [--replicas 4]

Prints, for each case, how far the weights under a strategy are from one device's
(relative to how far one device moved them), or from uncompressed training:
- clipping (SGD / LARS with clipnorm, global_clipnorm, clipvalue);
- mixed_float16 + compile(LARS) with an overflow on replica 1 alone: non-finite weights;
- SyncBatchNorm and ordinary BatchNorm on the fp16 and bf16 wires against no
  compression;
- the loss scale after 8 batches under gradient accumulation.
"""

import argparse
import contextlib
import functools
import json

import numpy as np


def _relative(got, want, initial):
  """The largest, over variables, of |got - want| / |want - initial|."""
  return max(float(np.linalg.norm(g - w) / max(np.linalg.norm(w - i), 1e-12))
             for g, w, i in zip(got, want, initial))


def _relative_all(got, want, initial):
  """|got - want| / |want - initial| over all variables at once (a variable that
  barely moves, as a bias before a BatchNorm, does not dominate it)."""
  flat = [np.concatenate([a.ravel() for a in arrays]) for arrays in (got, want, initial)]
  return float(np.linalg.norm(flat[0] - flat[1]) / np.linalg.norm(flat[1] - flat[2]))


class _Cases:
  """The four kinds of case, on `replicas` logical CPUs (TensorFlow imported late, after
  the devices are set)."""

  def __init__(self, replicas):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * replicas)
    import keras  # pylint: disable=g-import-not-at-top
    import tf_fusion  # pylint: disable=g-import-not-at-top
    self.tf, self.keras, self.tf_fusion = tf, keras, tf_fusion
    self.devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]

  def fused(self, compression="none"):
    return self.tf_fusion.mirrored_strategy(self.devices, self.tf_fusion.FusionOptions(
        algorithm="reduce_to_one", compression=compression))

  def stock(self):
    return self.tf_fusion.strategy.tf_mirrored_strategy(
        self.devices, self.tf.distribute.ReductionToOneDevice())

  @staticmethod
  def data(n=64):
    rng = np.random.RandomState(0)
    x = rng.randn(n, 8).astype(np.float32)
    x[n // 4:n // 2] *= 8.0
    return x, (x[:, :3] * [1.0, -2.0, 0.5]).astype(np.float32)

  def mlp(self, sync_bn=None):
    keras = self.keras
    keras.utils.set_random_seed(3)
    layers = [keras.Input((8,)), keras.layers.Dense(16)]
    if sync_bn is not None:
      layers.append(keras.layers.BatchNormalization(synchronized=sync_bn, momentum=0.5))
    layers += [keras.layers.Activation("relu"), keras.layers.Dense(3)]
    return keras.Sequential(layers)

  def fit(self, strategy, make_optimizer, x, y, batch_size=32, epochs=2, model_fn=None):
    model_fn = model_fn or self.mlp
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
      model = model_fn()
      model.compile(make_optimizer(), loss="mse")
    initial = [v.numpy() for v in model.weights]
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return initial, [v.numpy() for v in model.weights], model

  def clipping(self, out):
    keras, tf_fusion = self.keras, self.tf_fusion
    x, y = self.data()
    for name, make in (
        ("SGD(clipnorm=0.05)", lambda: keras.optimizers.SGD(0.1, momentum=0.9, clipnorm=0.05)),
        ("SGD(global_clipnorm=0.05)",
         lambda: keras.optimizers.SGD(0.1, momentum=0.9, global_clipnorm=0.05)),
        ("SGD(clipvalue=0.01)",
         lambda: keras.optimizers.SGD(0.1, momentum=0.9, clipvalue=0.01)),
        ("LARS(clipnorm=0.05)", lambda: tf_fusion.LARS(1.0, eta=0.05, clipnorm=0.05)),
        ("LARS(global_clipnorm=0.05)",
         lambda: tf_fusion.LARS(1.0, eta=0.05, global_clipnorm=0.05))):
      initial, want, _ = self.fit(None, make, x, y)
      row = {}
      for label, strategy in (("tf_fusion", self.fused()), ("tensorflow", self.stock())):
        _, got, _ = self.fit(strategy, make, x, y)
        row[label] = _relative(got, want, initial)
      out[f"clip {name}: from one device"] = row

  def overflow(self, out):
    previous = self.keras.config.dtype_policy()
    self.keras.config.set_dtype_policy("mixed_float16")
    try:
      x16, y16 = self.data(16)
      x16[4:8] = 3e4   # replica 1's examples overflow float16
      row = {}
      for label, strategy in (("tf_fusion", self.fused()), ("tensorflow", self.stock())):
        _, got, model = self.fit(strategy, lambda: self.tf_fusion.LARS(0.1, eta=0.05),
                                 x16, y16, batch_size=16, epochs=1)
        row[label] = {"non_finite_weights": int(sum((~np.isfinite(w)).sum() for w in got)),
                      "loss_scale": float(model.optimizer.dynamic_scale.numpy())}
      out["mixed_float16 compile(LARS), overflow on replica 1"] = row
    finally:
      self.keras.config.set_dtype_policy(previous)

  def batch_norm(self, out):
    xb, yb = self.data()
    xb += 5.0
    sgd = lambda: self.keras.optimizers.SGD(0.05)
    for sync in (True, False):
      model_fn = functools.partial(self.mlp, sync_bn=sync)
      reference = self.fit(self.fused("none"), sgd, xb, yb, model_fn=model_fn)
      row = {}
      for wire in ("fp16", "bf16"):
        _, got, _ = self.fit(self.fused(wire), sgd, xb, yb, model_fn=model_fn)
        row[wire] = _relative_all(got, reference[1], reference[0])
      out[f"{'SyncBN' if sync else 'BatchNorm'}: from no compression"] = row

  def accumulation(self, out):
    x, y = self.data()

    def accumulating():
      return self.tf_fusion.mixed_precision.loss_scale(
          self.tf_fusion.LARS(0.1, eta=0.05, gradient_accumulation_steps=2),
          initial_scale=2.0**10, dynamic_growth_steps=2)
    row = {}
    for label, strategy in (("one device", None), ("tf_fusion", self.fused())):
      _, _, model = self.fit(strategy, accumulating, x, y, batch_size=8, epochs=1)
      row[label] = float(model.optimizer.dynamic_scale.numpy())
    out["loss scale after 8 batches, accumulation 2, growth 2, from 2^10"] = row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--replicas", type=int, default=4)
  args = parser.parse_args()
  cases = _Cases(args.replicas)
  out = {}
  for case in (cases.clipping, cases.overflow, cases.batch_norm, cases.accumulation):
    case(out)
  for key, value in out.items():
    print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":
  main()
