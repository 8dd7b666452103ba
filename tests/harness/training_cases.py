"""The ways Keras drives training, as small deterministic runs (one device or a strategy).

Shared by tests/test_training_equivalence.py (one host) and tests/test_multi_worker.py
(2 workers x 2 devices): the same case under a strategy and on one device, at the same
global batch, must end with the same weights.
"""

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf

import tf_fusion

CASES = ("plain", "retrace", "run_eagerly", "partial_batch", "frozen_layer", "no_gradient",
         "fit_evaluate_fit", "two_optimizers", "accumulation", "steps_per_execution")
OPTIMIZERS = ("sgd", "lars", "loss_scaled_lars")
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
ACCUMULATION_STEPS = 3
# A transformer's gradient mix, beside CASES: IndexedSlices (position and segment
# embeddings), a tied token embedding (its sparse and dense gradients summed), attention.
TRANSFORMER = "transformer"
VOCAB, LENGTH = 30, 6


def data(n=96):
  rng = np.random.RandomState(0)
  x = rng.randn(n, 8).astype(np.float32)
  y = (x[:, :3] * [1.0, -2.0, 0.5] + 0.1 * rng.randn(n, 3)).astype(np.float32)
  return x, y


def token_data(n=96):
  """Token ids and next-token labels of a fixed random sequence set."""
  rng = np.random.RandomState(0)
  ids = rng.randint(0, VOCAB, size=(n, LENGTH)).astype(np.int32)
  return ids, np.roll(ids, 1, axis=1)


def make_optimizer(name, accumulation=None):
  kwargs = {"gradient_accumulation_steps": accumulation} if accumulation else {}
  if name == "sgd":
    return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)
  if name == "lamb":
    return tf_fusion.LAMB(0.01, weight_decay=0.01, **kwargs)
  # eta = 0.05 instead of the paper's 0.001: the weights must move visibly in 6 steps.
  lars = tf_fusion.LARS(1.0, momentum=0.9, weight_decay=1e-3, eta=0.05, **kwargs)
  if name == "lars":
    return lars
  if name == "loss_scaled_lars":
    return tf_fusion.mixed_precision.loss_scale(lars, initial_scale=2.0**10)
  raise ValueError(f"unknown optimizer {name!r}; valid: {OPTIMIZERS + ('lamb',)}")


class WithUnusedLayer(keras.Model):
  """A model one of whose variables never reaches the loss: its gradient is None."""

  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(16, activation="relu")
    self.out = keras.layers.Dense(3)
    self.unused = keras.layers.Dense(2)

  def build(self, input_shape):
    self.hidden.build(input_shape)
    self.out.build((None, 16))
    self.unused.build(input_shape)
    self.built = True

  def call(self, x):
    return self.out(self.hidden(x))


class TwoOptimizers(keras.Model):
  """GAN-style: two parts, each with its own optimizer, in a custom train_step."""

  def __init__(self, optimizer_name):
    super().__init__()
    self.first = keras.layers.Dense(16, activation="relu")
    self.second = keras.layers.Dense(3)
    self.opt_first = make_optimizer(optimizer_name)
    self.opt_second = make_optimizer(optimizer_name)

  def call(self, x):
    return self.second(self.first(x))

  def train_step(self, batch):
    x, y = batch
    # Two passes, two tapes, two optimizers, as a GAN's discriminator then generator.
    for optimizer, variables in ((self.opt_first, self.first.trainable_variables),
                                 (self.opt_second, self.second.trainable_variables)):
      with tf.GradientTape() as tape:
        loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        scaled = optimizer.scale_loss(loss)
      optimizer.apply(tape.gradient(scaled, variables), variables)
    return {"loss": loss}


class TinyTransformer(keras.Model):
  """One encoder block with tied input/output token embeddings: the token table gets a
  sparse gradient (the lookup) and a dense one (the output projection); the position and
  segment embeddings get IndexedSlices only. No attention biases: the key bias's true
  gradient is zero (softmax ignores a constant per query), so it moves by rounding only
  and no comparison of its trajectory means anything."""

  def __init__(self, **kwargs):   # kwargs: as a .keras file revives it
    super().__init__(**kwargs)
    self.tokens = keras.layers.Embedding(VOCAB, 8)
    self.positions = keras.layers.Embedding(LENGTH, 8)
    self.segments = keras.layers.Embedding(2, 8)
    self.attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, use_bias=False)
    self.norm = keras.layers.LayerNormalization()
    self.hidden = keras.layers.Dense(8, activation="gelu")

  def call(self, ids):
    x = (self.tokens(ids) + self.positions(tf.range(tf.shape(ids)[1]))[None]
         + self.segments(tf.cast(ids >= VOCAB // 2, tf.int32)))
    x = self.norm(x + self.attention(x, x))
    x = self.hidden(x)
    table = keras.ops.cast(self.tokens.embeddings, x.dtype)
    return keras.ops.matmul(x, keras.ops.transpose(table))


def build(case, optimizer_name):
  """The compiled model of `case` (call inside the strategy's scope)."""
  keras.utils.set_random_seed(1)
  if case == TRANSFORMER:
    model = TinyTransformer()
    model(token_data(1)[0])
    model.compile(make_optimizer(optimizer_name),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
  if case == "no_gradient":
    model = WithUnusedLayer()
    model.build((None, 8))
  elif case == "two_optimizers":
    model = TwoOptimizers(optimizer_name)
    model(np.zeros((1, 8), np.float32))   # creates the variables the optimizers take
  else:
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
  if case == "frozen_layer":
    model.layers[1].trainable = False
  optimizer = (None if case == "two_optimizers" else make_optimizer(
      optimizer_name, ACCUMULATION_STEPS if case == "accumulation" else None))
  if case == "two_optimizers":
    # Built here, in the scope, like the compiled optimizer.
    model.opt_first.build(model.first.trainable_variables)
    model.opt_second.build(model.second.trainable_variables)
    optimizer = keras.optimizers.SGD(0.0)
  model.compile(optimizer, loss="mse", run_eagerly=case == "run_eagerly",
                steps_per_execution=4 if case == "steps_per_execution" else 1)
  return model


def train(strategy, case, optimizer_name, policy="float32"):
  """Trains `case` under `strategy` (None: one device); returns the final weights.
  One device's run is computed once per test process (`one_device`)."""
  if strategy is None:
    return [w.copy() for w in one_device(case, optimizer_name, policy)]
  return _train(strategy, case, optimizer_name, policy)


@functools.lru_cache(maxsize=None)
def one_device(case, optimizer_name, policy="float32"):
  """The reference: `case` trained with no strategy. Deterministic (fixed seed, data
  and order), so the suite's many comparisons against it share one run."""
  return tuple(_train(None, case, optimizer_name, policy))


def _train(strategy, case, optimizer_name, policy):
  x, y = token_data() if case == TRANSFORMER else data()
  with dtype_policy(policy):
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
      model = build(case, optimizer_name)
    fit = dict(epochs=1, shuffle=False, verbose=0)
    if case in ("retrace", "frozen_layer", "no_gradient"):
      model.fit(x, y, batch_size=32, **fit)
      model.fit(x, y, batch_size=16, **fit)   # another batch size: a new trace
      model.fit(x, y, batch_size=32, **fit)
    elif case == "partial_batch":
      model.fit(x, y, batch_size=40, epochs=2, shuffle=False, verbose=0)   # 40, 40, 16
    elif case == "fit_evaluate_fit":
      model.fit(x, y, batch_size=32, **fit)
      model.evaluate(x[:48], y[:48], batch_size=24, verbose=0)
      model.fit(x, y, batch_size=32, **fit)
    elif case == "steps_per_execution":
      # 3 steps an epoch, 4 per execution: the last execution ends with the data.
      model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    else:
      model.fit(x, y, batch_size=16 if case == "accumulation" else 32, epochs=2,
                shuffle=False, verbose=0)
  return [v.numpy() for v in model.weights]


@contextlib.contextmanager
def dtype_policy(name):
  """Keras's global dtype policy `name` inside the block, the previous one after."""
  old = keras.config.dtype_policy()
  keras.config.set_dtype_policy(name)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(old)
