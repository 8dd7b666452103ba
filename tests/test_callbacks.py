"""tf_fusion.callbacks: batch-norm moving statistics averaged over replicas, and a
strategy's gather through the fused ops."""

import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from tests.harness import helpers


def _bn_model():
  return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                           keras.layers.BatchNormalization(momentum=0.5), keras.layers.Dropout(0.1),
                           keras.layers.Dense(2)])


def _data():
  """Each replica's shard has its own offset, so their statistics diverge."""
  x = np.random.RandomState(0).randn(64, 4).astype(np.float32)
  x += np.repeat(np.arange(4, dtype=np.float32) * 3, 16)[:, None]
  return x, np.zeros((64, 2), np.float32)


def _components(variable):
  return np.stack([c.numpy() for c in variable.value.values])


class SyncMovingStatisticsTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    # fp16 on the wire: the average must not go through it.
    self.strategy = tf_fusion.mirrored_strategy(
        helpers.devices(4), tf_fusion.FusionOptions(compression="fp16", algorithm="ring"))
    with self.strategy.scope():
      self.model = _bn_model()
      self.model.compile("sgd", "mse")

  def _fit(self, callbacks=()):
    x, y = _data()
    self.model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0,
                   callbacks=list(callbacks))

  def test_statistics_are_the_batch_norm_ones(self):
    names = [v.path for v in tf_fusion.callbacks.moving_statistics(self.model)]
    self.assertLen(names, 2)
    self.assertTrue(all("moving_" in n for n in names), names)

  def test_sync_sets_every_replica_to_the_numpy_mean(self):
    self._fit()
    stats = tf_fusion.callbacks.moving_statistics(self.model)
    before = [_components(v) for v in stats]
    for b in before:   # the replicas did diverge: the test has something to fix
      self.assertGreater(np.ptp(b, axis=0).max(), 0.1)
    self.assertEqual(tf_fusion.callbacks.sync_moving_statistics(self.model), 2)
    for v, b in zip(stats, before):
      after = _components(v)
      want = b.astype(np.float64).mean(axis=0)
      for replica in after:
        self.assertAllClose(replica, want, rtol=1e-6, atol=1e-7)

  def test_callback_makes_evaluation_match_the_checkpoint(self):
    x, y = _data()
    self._fit([tf_fusion.callbacks.SyncMovingStatistics()])
    for v in tf_fusion.callbacks.moving_statistics(self.model):
      c = _components(v)
      self.assertAllEqual(c, np.broadcast_to(c[0], c.shape))
    path = self.create_tempfile(file_path="m.weights.h5").full_path
    self.model.save_weights(path)
    trained = self.model.evaluate(x, y, batch_size=64, verbose=0)
    with self.strategy.scope():
      restored = _bn_model()
      restored.compile("sgd", "mse")
    restored.load_weights(path)
    self.assertAllClose(restored.evaluate(x, y, batch_size=64, verbose=0), trained,
                        rtol=1e-6)

  def test_one_replica_is_a_no_op(self):
    model = _bn_model()
    self.assertEqual(tf_fusion.callbacks.sync_moving_statistics(
        model, tf.distribute.get_strategy()), 0)


class GatherTest(tf.test.TestCase):

  def test_strategy_gather_through_fused_ops_is_exact(self):
    strategy = tf_fusion.mirrored_strategy(
        helpers.devices(4), tf_fusion.FusionOptions(compression="fp16"))
    arrays = [np.full([3], 1 + 1e-4 * r, np.float32) for r in range(4)]
    gathered = strategy.gather(helpers.per_replica(strategy, arrays), axis=0)
    self.assertAllEqual(gathered, np.concatenate(arrays))


if __name__ == "__main__":
  tf.test.main()
