"""Keras callbacks for data-parallel training with tf_fusion.

Batch-norm moving statistics are not gradients: Keras 3 creates them as mirrored
variables with aggregation "none", and under a tf.distribute strategy every replica
updates its own copy from its own shard of the batch. Left alone, the replicas evaluate
with different statistics, and a checkpoint (which saves the first replica's copy) holds
the statistics of 1/N of the data, so the restored model does not evaluate like the one
that was trained. `SyncMovingStatistics` averages the copies over all replicas of all
workers before each evaluation, at the end of each epoch (before a checkpoint is
written, when it comes first in the callback list) and at the end of training.

The average is exact: it gathers the copies through the strategy (TF's own gather,
never the FP16 wire), one collective for all variables.
"""

import json
from typing import List, Optional

import keras
import tensorflow as tf

from tf_fusion._internal import keras as keras_internal
from tf_fusion._internal import tf as tf_internal


def moving_statistics(model) -> List[keras.Variable]:
  """The model's floating non-trainable variables that have one copy per replica.

  Batch-norm moving mean and variance; not seed-generator states (integers) and not
  variables that the strategy already aggregates (sync-on-read metrics).
  """
  out = []
  for v in model.non_trainable_variables:
    tf_var = getattr(v, "value", None)
    if (tf_internal.is_mirrored_variable(tf_var) and tf_var.dtype.is_floating
        and tf_var.aggregation == tf.VariableAggregation.NONE):
      out.append(v)
  return out


def sync_moving_statistics(model, strategy: Optional[tf.distribute.Strategy] = None):
  """Sets every replica's copy of the moving statistics to their mean over replicas.

  Args:
    model: a Keras model built under `strategy`.
    strategy: defaults to the model's.

  Returns:
    The number of variables averaged (0 with one replica or no such variables).
  """
  strategy = strategy or model.distribute_strategy
  variables = moving_statistics(model)
  if strategy.num_replicas_in_sync < 2 or not variables:
    return 0
  sizes = [v.value.shape.num_elements() for v in variables]
  local = []
  for i in range(len(variables[0].value.values)):
    component = variables[0].value.values[i]
    with tf.device(component.device):
      local.append(tf.concat([tf.reshape(tf.cast(v.value.values[i], tf.float32), [-1])
                              for v in variables], 0))
  gathered = strategy.gather(tf_internal.per_replica(local), axis=0)
  mean = tf.reduce_mean(tf.reshape(gathered, [strategy.num_replicas_in_sync, -1]), 0)
  for v, part in zip(variables, tf.split(mean, sizes)):
    v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))
  return len(variables)


class SyncMovingStatistics(keras.callbacks.Callback):
  """Averages batch-norm moving statistics over replicas whenever they are used or saved.

  Put it before BackupAndRestore / ModelCheckpoint in the callback list, so that the
  checkpoint written at the end of an epoch holds the average.

  Example:
    >>> model.fit(ds, callbacks=[tf_fusion.callbacks.SyncMovingStatistics(),
    ...                          keras.callbacks.BackupAndRestore(backup_dir)])
  """

  def __init__(self):
    super().__init__()
    self._trained = True   # since the last average: nothing known yet

  def on_train_batch_end(self, batch, logs=None):
    self._trained = True

  def on_test_begin(self, logs=None):
    self._sync()

  def on_epoch_end(self, epoch, logs=None):
    self._sync()   # after a validation pass: nothing trained since, nothing to do

  def on_train_end(self, logs=None):
    self._sync()

  def _sync(self):
    if self._trained:
      sync_moving_statistics(self.model)
      self._trained = False


def batches_seen(model) -> int:
  """Training batches the model's optimizer has run. Under gradient accumulation the
  optimizer's `iterations` counts updates; this counts batches either way."""
  optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
  return int(keras.ops.convert_to_numpy(keras_internal.batches_seen(optimizer)))


def backup_epoch(backup: keras.callbacks.BackupAndRestore) -> Optional[int]:
  """The epoch `backup` will restore at the start of the next `fit`, or None when it
  holds no backup (its epoch overrides fit's initial_epoch)."""
  path = keras_internal.backup_metadata_path(backup)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return int(json.load(f)["epoch"])


def backup_now(model, backup: keras.callbacks.BackupAndRestore) -> None:
  """Writes `backup`'s checkpoint now (e.g. mid-epoch, on preemption) as it does at an
  epoch's end: the batch-norm statistics averaged over the replicas first."""
  sync_moving_statistics(model)
  keras_internal.backup_now(backup)
