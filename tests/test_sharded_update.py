"""FusionOptions(weight_update="sharded") trains to one device's weights, each replica
holding 1/N of the optimizer's state, and its state saves and loads whole.

The reference is the same model at the same global batch with no strategy (plain
Keras); the model (tests/training_cases.TinyTransformer) has embeddings with
IndexedSlices gradients, a tied token table, attention and a LayerNormalization.

One departure: the sharded update sums an embedding's rows into its table before the
optimizer sees them, as for any dense weight, so Adam's second moment and a clipping
norm are those of the summed gradient. Keras on one device squares an IndexedSlices
gradient row by row (`ops.square` of its values) and so counts repeated rows (and the
tied table's lookup and projection parts) apart. The reference is therefore one device
with its embedding gradients made dense first (`dense_embedding_gradients`); the
controls `test_keras_*_rows_apart` show that this, and nothing else, is the
difference: for SGD and the layer-wise optimizers, which sum rows anyway, both agree.
"""

import contextlib
import os

from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import shard_state
from tests.harness import helpers
from tests.harness import multi_worker
from tests.harness import training_cases

# float32: replicas add their gradients in another order than one device's batch sum.
TOLERANCE = 1e-4


def optimizer(name):
  """The optimizers the sharded update is held to."""
  if name == "sgd":
    return keras.optimizers.SGD(0.05, momentum=0.9)
  if name == "adam":
    return keras.optimizers.Adam(0.01)
  if name == "adamw":
    return keras.optimizers.AdamW(0.01, weight_decay=0.1)
  if name == "lars":
    return tf_fusion.LARS(1.0, momentum=0.9, weight_decay=1e-3, eta=0.05)
  if name == "lamb":
    return tf_fusion.LAMB(0.01, weight_decay=0.01)
  if name == "loss_scaled_lamb":
    return tf_fusion.mixed_precision.loss_scale(tf_fusion.LAMB(0.01), initial_scale=2.0**10)
  if name == "lars_accumulation":
    return tf_fusion.LARS(1.0, momentum=0.9, weight_decay=1e-3, eta=0.05,
                          gradient_accumulation_steps=3)
  if name == "sgd_global_clipnorm":
    return keras.optimizers.SGD(0.5, global_clipnorm=0.05)
  if name == "sgd_clipnorm":
    return keras.optimizers.SGD(0.5, momentum=0.9, clipnorm=0.02)
  raise ValueError(name)


OPTIMIZERS = ("sgd", "adam", "adamw", "lars", "lamb", "loss_scaled_lamb",
              "lars_accumulation", "sgd_global_clipnorm", "sgd_clipnorm")
# Across workers, one of each thing the shards must agree on over the network:
# layer-wise norms summed over the shards (LAMB, LARS), the loss scale's finiteness
# (LAMB's), accumulation with momentum's state (LARS), the global norm of clipping (SGD,
# an elementwise update). Plain SGD, LARS and LAMB, Adam(W) and per-variable clipping add
# nothing there that one host x 4 (all of OPTIMIZERS) does not check.
MULTI_WORKER_OPTIMIZERS = ("loss_scaled_lamb", "lars_accumulation", "sgd_global_clipnorm")


@contextlib.contextmanager
def dense_embedding_gradients():
  """Every Keras optimizer sees an IndexedSlices gradient summed into a dense one."""
  original = keras.optimizers.Optimizer.apply

  def apply(self, grads, trainable_variables=None):
    grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
             for g in grads]
    return original(self, grads, trainable_variables)

  keras.optimizers.Optimizer.apply = apply
  try:
    yield
  finally:
    keras.optimizers.Optimizer.apply = original


def one_device(name, epochs=2):
  """The reference run of optimizer `name` (see the module doc)."""
  with dense_embedding_gradients():
    return train(None, name, epochs=epochs)


def sharded_strategy(n=4, **options):
  options = dict(dict(pack_bytes=512, first_pack_bytes=64, algorithm="reduce_to_one",
                      weight_update="sharded"), **options)
  return tf_fusion.mirrored_strategy(helpers.devices(n), tf_fusion.FusionOptions(**options),
                                     cost_model=helpers.fixed_cost_model())


def build(name):
  keras.utils.set_random_seed(1)
  model = training_cases.TinyTransformer()
  model(training_cases.token_data(1)[0])
  model.compile(optimizer(name),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  return model


def train(strategy, name, epochs=2, model=None):
  """Trains the transformer with optimizer `name`; returns the model."""
  ids, labels = training_cases.token_data()
  if model is None:
    with strategy.scope() if strategy else tf.name_scope("one_device"):
      model = build(name)
  batch = 16 if name == "lars_accumulation" else 32
  model.fit(ids, labels, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
  return model


class ShardedUpdateTest(tf.test.TestCase, parameterized.TestCase):

  def assert_same_training(self, got, want, initial):
    moved_any = False
    for g, w, i in zip(got, want, initial):
      moved = np.linalg.norm(w - i)
      moved_any |= moved > 0
      self.assertAllClose(g, w, rtol=2e-5, atol=2e-5)
      if moved:
        self.assertLess(np.linalg.norm(g - w) / moved, TOLERANCE)
    self.assertTrue(moved_any)

  @parameterized.parameters(*OPTIMIZERS)
  def test_same_weights_and_state_as_one_device(self, name):
    strategy = sharded_strategy()
    got = train(strategy, name)
    want = one_device(name)
    with tf.name_scope("initial"):
      initial = [v.numpy() for v in build(name).weights]
    self.assert_same_training([v.numpy() for v in got.weights],
                              [v.numpy() for v in want.weights], initial)
    # The whole optimizer state, read through the views, is one device's.
    got_state = [np.asarray(v.numpy()) for v in got.optimizer.variables]
    want_state = [np.asarray(v.numpy()) for v in want.optimizer.variables]
    self.assertEqual([s.shape for s in got_state], [s.shape for s in want_state])
    for g, w in zip(got_state, want_state):
      self.assertAllClose(g, w, rtol=1e-4, atol=1e-6)
    plan = tf_fusion.fused_ops_of(strategy).last_plan
    # Under accumulation the update runs in a cond, where each replica launches alone:
    # an all-to-all over the group (TensorFlow has no reduce-scatter off NCCL).
    self.assertEqual({e.algorithm for e in plan},
                     {"sharded_all_to_all" if "accumulation" in name else "sharded_in_graph"})

  @parameterized.parameters(("fp16", "sgd"), ("bf16", "lamb"))
  def test_gradients_on_a_16_bit_wire(self, compression, name):
    """The reduce-scatter carries 16-bit gradients (fp16 range-scaled); the weights come
    back exact. Within the 16-bit tolerance of the suite (3%: 11 or 8 mantissa bits)."""
    strategy = sharded_strategy(compression=compression)
    got = train(strategy, name)
    want = one_device(name)
    with tf.name_scope("initial"):
      initial = [v.numpy() for v in build(name).weights]
    for g, w, i in zip(got.weights, want.weights, initial):
      moved = np.linalg.norm(w.numpy() - i)
      if moved:
        self.assertLess(np.linalg.norm(g.numpy() - w.numpy()) / moved, 3e-2)
    wire = {e.wire_dtype for e in tf_fusion.fused_ops_of(strategy).last_plan}
    self.assertEqual(wire, {tf.float16 if compression == "fp16" else tf.bfloat16})

  @parameterized.parameters(("adam", 1e-3), ("sgd_global_clipnorm", 1e-4), ("sgd", 0.0),
                            ("lamb", 0.0))
  def test_keras_rows_apart(self, name, gap):
    """Control: Keras on one device, with the embeddings' IndexedSlices as they are,
    ends elsewhere than with them summed first (the reference above) where rows are
    squared (Adam, clipping), and not where they are summed (SGD, LAMB)."""
    rows = [v.numpy() for v in train(None, name).weights]
    summed = [v.numpy() for v in one_device(name).weights]
    diff = max(np.abs(a - b).max() for a, b in zip(rows, summed))
    if gap:
      self.assertGreater(diff, gap)
    else:
      self.assertLess(diff, 1e-5)

  def test_clipping_is_on_and_matters(self):
    """Control: without the clip the weights end elsewhere (so the test above checks
    the clip)."""
    clipped = train(None, "sgd_global_clipnorm")
    with tf.name_scope("plain"):
      keras.utils.set_random_seed(1)
      plain = training_cases.TinyTransformer()
      plain(training_cases.token_data(1)[0])
      plain.compile(keras.optimizers.SGD(0.5),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train(None, None, model=plain)
    diff = max(np.abs(a.numpy() - b.numpy()).max()
               for a, b in zip(clipped.weights, plain.weights))
    self.assertGreater(diff, 1e-2)

  def test_each_replica_holds_a_quarter_of_the_state(self):
    strategy = sharded_strategy()
    with strategy.scope():
      model = build("adam")
    train(strategy, "adam", epochs=1, model=model)
    state = shard_state.of(model.optimizer)
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    per_replica = state.state_elements()
    self.assertEqual(sum(per_replica), total)
    for count, part in zip(per_replica, state.parts):
      # Two Adam slots of that many elements, on the replica's own device, nothing
      # whole.
      slots = list(part.slots.values())
      self.assertEqual(sum(int(np.prod(s.shape)) for s in slots), 2 * count)
      self.assertTrue(all(s.value.device == part.device for s in slots))
      self.assertLessEqual(count, total / 4 + 16 * len(state.layout.packs))

  def test_an_optimizer_that_cannot_be_sharded_is_refused_by_name(self):
    class NormSGD(keras.optimizers.SGD):
      def update_step(self, gradient, variable, learning_rate):
        norm = tf.norm(gradient)
        self.assign_sub(variable, learning_rate * gradient / norm)

    strategy = sharded_strategy()
    with strategy.scope():
      model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
      model.compile(NormSGD(0.1), loss="mse")
    x, y = training_cases.data(32)
    with self.assertRaisesRegex(ValueError, r"weight_update='sharded'.*NormSGD"):
      model.fit(x, y, batch_size=32, verbose=0)
    NormSGD.tf_fusion_elementwise = True   # the user's word that it is elementwise
    self.assertIsNone(shard_state.check_shardable(NormSGD(0.1)))

  def test_keras_lamb_and_ema_are_refused(self):
    with self.assertRaisesRegex(ValueError, "cannot shard Lamb"):
      shard_state.check_shardable(keras.optimizers.Lamb())
    with self.assertRaisesRegex(ValueError, "use_ema"):
      shard_state.check_shardable(keras.optimizers.SGD(use_ema=True))


@multi_worker.worker(algorithm="hierarchical", weight_update="sharded", pack_bytes=512,
                     first_pack_bytes=64)
def sharded_in_worker(strategy):
  """Each optimizer of MULTI_WORKER_OPTIMIZERS, sharded over 2 workers x 2 devices;
  this worker's final weights of each, and the plan's algorithms."""
  weights = {}
  for name in MULTI_WORKER_OPTIMIZERS:
    with dense_embedding_gradients():
      weights[name] = [w.numpy().tolist() for w in train(strategy, name).weights]
  # Eager: the step's collectives launched from one function (shard_step.apply).
  weights["run_eagerly"] = [w.tolist() for w in training_cases.train(
      strategy, "run_eagerly", "loss_scaled_lars")]
  return {"weights": weights,
          "algorithms": sorted({e.algorithm for e in
                                tf_fusion.fused_ops_of(strategy).last_plan})}


class ClippingWhateverTheSparseChoiceTest(tf.test.TestCase):
  """The replicated update clips the summed gradient too, so that clipping does not
  depend on FusionOptions.sparse (before, "gather" clipped over the rows, "dense" over
  the summed table, and "auto" chose between them from a timing)."""

  def test_gather_dense_and_sharded_clip_alike(self):
    want = [v.numpy() for v in one_device("sgd_global_clipnorm").weights]
    for sparse in ("gather", "dense"):
      strategy = sharded_strategy(weight_update="replicated", sparse=sparse)
      got = train(strategy, "sgd_global_clipnorm")
      self.assertIn(f"sparse='{sparse}'", " ".join(e.note for e in
                                     tf_fusion.fused_ops_of(strategy).last_plan))
      for g, w in zip(got.weights, want):
        self.assertAllClose(g.numpy(), w, rtol=2e-5, atol=2e-5, msg=sparse)


class ShardedMultiWorkerTest(tf.test.TestCase):

  def test_two_workers_of_two_equal_one_device(self):
    workers = multi_worker.run_workers(sharded_in_worker, timeout=400)
    for name in MULTI_WORKER_OPTIMIZERS:
      want = [v.numpy() for v in one_device(name).weights]
      for worker in workers:
        self.assertEqual(worker["algorithms"], ["sharded_hierarchical"])
        for got, w in zip(worker["weights"][name], want):
          self.assertAllClose(np.array(got, np.float32), w, rtol=2e-5, atol=2e-5,
                              msg=f"{name} worker {worker['task']}")
    want = training_cases.train(None, "run_eagerly", "loss_scaled_lars")
    for worker in workers:
      for got, w in zip(worker["weights"]["run_eagerly"], want):
        self.assertAllClose(np.array(got, np.float32), w, rtol=2e-5, atol=2e-5)
    # Both workers hold the same weights, bit for bit (each shard was updated once).
    self.assertEqual(workers[0]["weights"], workers[1]["weights"])


class ShardedCheckpointTest(tf.test.TestCase):
  """A `.keras` file of a sharded run holds the whole optimizer state: saved on 4
  sharded replicas, it resumes on 2 sharded replicas, on one device, and a replicated
  run's file resumes sharded, each as if training had not stopped."""

  def _resume(self, path, strategy):
    ids, labels = training_cases.token_data()
    with strategy.scope() if strategy else tf.name_scope("one_device"):
      model = keras.saving.load_model(
          path, custom_objects={"TinyTransformer": training_cases.TinyTransformer})
    model.fit(ids, labels, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.weights]

  def test_saved_sharded_resumes_anywhere(self):
    name = "adam"
    want = [v.numpy() for v in one_device(name, epochs=2).weights]
    first = train(sharded_strategy(4), name, epochs=1)
    path = os.path.join(self.create_tempdir().full_path, "sharded.keras")
    first.save(path)
    replicated = tf_fusion.mirrored_strategy(helpers.devices(4), tf_fusion.FusionOptions(
        algorithm="reduce_to_one"))
    for strategy in (sharded_strategy(2), None, replicated):
      with dense_embedding_gradients():   # for the one-device and replicated resumes
        got = self._resume(path, strategy)
      for g, w in zip(got, want):
        self.assertAllClose(g, w, rtol=2e-5, atol=2e-5)

  def test_saved_replicated_resumes_sharded(self):
    name = "lamb"
    want = [v.numpy() for v in train(None, name, epochs=2).weights]
    replicated = tf_fusion.mirrored_strategy(helpers.devices(4), tf_fusion.FusionOptions(
        algorithm="reduce_to_one"))
    with dense_embedding_gradients():
      first = train(replicated, name, epochs=1)
    path = os.path.join(self.create_tempdir().full_path, "replicated.keras")
    first.save(path)
    with dense_embedding_gradients():
      got = self._resume(path, sharded_strategy(4))
    for g, w in zip(got, want):
      self.assertAllClose(g, w, rtol=2e-5, atol=2e-5)

  def test_save_weights_holds_the_state_for_backup_and_restore(self):
    """BackupAndRestore's files (save_weights / load_weights): the optimizer state read
    back into another sharded run, over 2 replicas, is the one saved from 4."""
    first = train(sharded_strategy(4), "adam", epochs=1)
    path = os.path.join(self.create_tempdir().full_path, "backup.weights.h5")
    first.save_weights(path)
    strategy = sharded_strategy(2)
    with strategy.scope():
      second = build("adam")
      second.optimizer.build(second.trainable_variables)
    second.load_weights(path)
    for a, b in zip(first.optimizer.variables, second.optimizer.variables):
      self.assertAllEqual(a.numpy(), b.numpy())
    self.assertGreater(np.abs(second.optimizer.variables[3].numpy()).max(), 0)

  def test_the_saved_state_is_whole(self):
    """Control for the resumes above: without the optimizer state (a fresh optimizer),
    the resumed run ends elsewhere."""
    first = train(sharded_strategy(4), "adam", epochs=1)
    self.assertEqual([tuple(v.shape) for v in first.optimizer.variables[2:]],
                     [tuple(v.shape) for v in first.trainable_variables for _ in (0, 1)])
    self.assertGreater(np.abs(first.optimizer.variables[2].numpy()).max(), 0)


if __name__ == "__main__":
  tf.test.main()
