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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--replicas", type=int, default=4)
  args = parser.parse_args()

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices("CPU")[0],
      [tf.config.LogicalDeviceConfiguration()] * args.replicas)
  import keras  # pylint: disable=g-import-not-at-top
  import tf_fusion  # pylint: disable=g-import-not-at-top

  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:args.replicas]

  def fused(compression="none"):
    return tf_fusion.mirrored_strategy(devices, tf_fusion.FusionOptions(
        algorithm="reduce_to_one", compression=compression))

  def stock():
    return tf_fusion.strategy.tf_mirrored_strategy(devices,
                                                   tf.distribute.ReductionToOneDevice())

  def data(n=64):
    rng = np.random.RandomState(0)
    x = rng.randn(n, 8).astype(np.float32)
    x[n // 4:n // 2] *= 8.0
    return x, (x[:, :3] * [1.0, -2.0, 0.5]).astype(np.float32)

  def mlp(sync_bn=None):
    keras.utils.set_random_seed(3)
    layers = [keras.Input((8,)), keras.layers.Dense(16)]
    if sync_bn is not None:
      layers.append(keras.layers.BatchNormalization(synchronized=sync_bn, momentum=0.5))
    layers += [keras.layers.Activation("relu"), keras.layers.Dense(3)]
    return keras.Sequential(layers)

  def fit(strategy, make_optimizer, x, y, batch_size=32, epochs=2, model_fn=mlp):
    if strategy is None:
      model = model_fn()
      model.compile(make_optimizer(), loss="mse")
    else:
      with strategy.scope():
        model = model_fn()
        model.compile(make_optimizer(), loss="mse")
    initial = [v.numpy() for v in model.weights]
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return initial, [v.numpy() for v in model.weights], model

  out = {}
  x, y = data()
  for name, make in (
      ("SGD(clipnorm=0.05)", lambda: keras.optimizers.SGD(0.1, momentum=0.9, clipnorm=0.05)),
      ("SGD(global_clipnorm=0.05)",
       lambda: keras.optimizers.SGD(0.1, momentum=0.9, global_clipnorm=0.05)),
      ("SGD(clipvalue=0.01)", lambda: keras.optimizers.SGD(0.1, momentum=0.9, clipvalue=0.01)),
      ("LARS(clipnorm=0.05)", lambda: tf_fusion.LARS(1.0, eta=0.05, clipnorm=0.05)),
      ("LARS(global_clipnorm=0.05)",
       lambda: tf_fusion.LARS(1.0, eta=0.05, global_clipnorm=0.05))):
    initial, want, _ = fit(None, make, x, y)
    row = {}
    for label, strategy in (("tf_fusion", fused()), ("tensorflow", stock())):
      _, got, _ = fit(strategy, make, x, y)
      row[label] = _relative(got, want, initial)
    out[f"clip {name}: from one device"] = row

  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_float16")
  try:
    x16, y16 = data(16)
    x16[4:8] = 3e4   # replica 1's examples overflow float16
    row = {}
    for label, strategy in (("tf_fusion", fused()), ("tensorflow", stock())):
      _, got, model = fit(strategy, lambda: tf_fusion.LARS(0.1, eta=0.05), x16, y16,
                          batch_size=16, epochs=1)
      row[label] = {"non_finite_weights": int(sum((~np.isfinite(w)).sum() for w in got)),
                    "loss_scale": float(model.optimizer.dynamic_scale.numpy())}
    out["mixed_float16 compile(LARS), overflow on replica 1"] = row
  finally:
    keras.config.set_dtype_policy(previous)

  xb, yb = data()
  xb += 5.0
  for sync in (True, False):
    def model_fn(sync=sync):
      return mlp(sync_bn=sync)
    reference = fit(fused("none"), lambda: keras.optimizers.SGD(0.05), xb, yb,
                    model_fn=model_fn)
    row = {}
    for wire in ("fp16", "bf16"):
      _, got, _ = fit(fused(wire), lambda: keras.optimizers.SGD(0.05), xb, yb,
                      model_fn=model_fn)
      row[wire] = _relative_all(got, reference[1], reference[0])
    out[f"{'SyncBN' if sync else 'BatchNorm'}: from no compression"] = row

  def accumulating():
    return tf_fusion.mixed_precision.loss_scale(
        tf_fusion.LARS(0.1, eta=0.05, gradient_accumulation_steps=2),
        initial_scale=2.0**10, dynamic_growth_steps=2)
  row = {}
  for label, strategy in (("one device", None), ("tf_fusion", fused())):
    _, _, model = fit(strategy, accumulating, x, y, batch_size=8, epochs=1)
    row[label] = float(model.optimizer.dynamic_scale.numpy())
  out["loss scale after 8 batches, accumulation 2, growth 2, from 2^10"] = row

  for key, value in out.items():
    print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":
  main()
