"""What tf_fusion's strategies change in Keras's own training step, so that the code
Keras users write trains as on one device.

Keras (3.15) on the TensorFlow backend does three things per replica, before the
all-reduce, that one device does on the whole batch:
- it clips each replica's gradient (`clipnorm`, `clipvalue`, `global_clipnorm`) and
  then sums the clipped parts (tensorflow#33929 calls that "usually wrong");
- under `mixed_float16`, `compile` wraps the optimizer in Keras's LossScaleOptimizer,
  which unscales before the reduction (small gradients then underflow a 16-bit wire)
  and decides on overflow from replica 0's gradients alone (an inf on replica 1 is
  applied, and poisons the weights);
- nothing tells the cross-device ops which reductions are gradients, so the 16-bit
  wire would carry SyncBatchNorm's moment sums too.

Under a strategy that reduces with tf_fusion (`fused_ops_of(strategy)` is not None),
`install()` makes Keras's optimizers reduce first and clip the reduced gradient,
steps Keras's LossScaleOptimizer as `tf_fusion.mixed_precision` does (reduce scaled,
unscale, one decision for all), and marks gradient reductions for the wire. Under any
other strategy, and with no strategy, Keras's steps run unchanged.

Under `FusionOptions(weight_update="sharded")`, an optimizer built in the strategy's
scope gets its slots as views over per-replica shards (shard_state), and its update
(clip, decoupled weight decay, update step) runs sharded (shard_step) instead of
all-reduce-then-update on every replica.
"""

import tensorflow as tf

from tf_fusion import gradient_marker
from tf_fusion import mixed_precision
from tf_fusion import shard_state
from tf_fusion import shard_step
from tf_fusion import strategy as strategy_lib
from tf_fusion._internal import keras as keras_internal


def install() -> None:
  """Routes Keras's clip, all-reduce and loss-scaled apply through this module (once
  per process; `import tf_fusion` does it)."""
  keras_internal.wrap_clip_gradients(_clip)
  keras_internal.wrap_all_reduce_gradients(_all_reduce)
  keras_internal.wrap_loss_scale_apply(_loss_scaled_apply)
  keras_internal.wrap_add_variable_from_reference(_add_slot)
  keras_internal.wrap_update_step(_update_step)
  keras_internal.wrap_weight_decay(_weight_decay)


def under_fused_strategy() -> bool:
  """Whether this is a replica context of a strategy that reduces with tf_fusion."""
  if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
    return False
  return strategy_lib.fused_ops_of(tf.distribute.get_strategy()) is not None


def _clips(optimizer) -> bool:
  return bool(optimizer.clipnorm or optimizer.clipvalue or optimizer.global_clipnorm)


def _reduces_before_clipping(optimizer) -> bool:
  """Whether `optimizer` should sum its gradients in `_clip`: it clips, under a fused
  strategy, and no wrapper (tf_fusion's loss scaling) has reduced them already."""
  return (_clips(optimizer) and not keras_internal.all_reduce_skipped(optimizer)
          and under_fused_strategy())


def _clip(original, optimizer, grads):
  if shard_step.sharded_ops() is not None:
    return list(grads)   # clipped on the reduced shards, in shard_step
  if not _reduces_before_clipping(optimizer):
    return original(optimizer, grads)
  # The summed gradient is clipped: an embedding's rows, gathered or not, summed into
  # its table, as FusionOptions(sparse="dense") and the sharded update give it. So the
  # clip does not depend on the sparse choice (Keras on one device squares the rows
  # apart; docs/sparse.md).
  return original(optimizer, [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices)
                              else g for g in gradient_marker.sum_gradients(grads)])


def _all_reduce(original, optimizer, grads_and_vars):
  if _reduces_before_clipping(optimizer):
    return list(grads_and_vars)   # summed in _clip, before clipping
  with gradient_marker.gradient_reduction():
    return original(optimizer, grads_and_vars)


def _loss_scaled_apply(original, lso, grads, trainable_variables=None):
  if not under_fused_strategy():
    return original(lso, grads, trainable_variables)
  return mixed_precision.reduce_first(lso, grads, trainable_variables)


def _sharding(optimizer) -> bool:
  """Whether `optimizer` (not a replica's shard of one) steps sharded here."""
  return not shard_state.is_shard(optimizer) and shard_step.sharded_ops() is not None


def _add_slot(original, optimizer, reference_variable, name=None, initializer="zeros"):
  # Keras's own parameter names: callers pass them by keyword too (Adafactor).
  if shard_state.is_shard(optimizer):
    variable = keras_internal.add_plain_slot(optimizer, reference_variable, name,
                                             initializer)
    shard_state.record_slot(optimizer, reference_variable, name, variable)
    return variable
  ops = _building_sharded()
  if ops is None or not shard_state.is_slot_name(name):
    return original(optimizer, reference_variable, name=name, initializer=initializer)
  return shard_state.slot_for(optimizer, reference_variable, name, ops)


def _building_sharded():
  """The ops of a sharding strategy in scope (cross-replica context: where Keras
  builds optimizers), else None."""
  if not tf.distribute.has_strategy():
    return None
  ops = strategy_lib.fused_ops_of(tf.distribute.get_strategy())
  return ops if ops is not None and ops.options.weight_update == "sharded" else None


def _update_step(original, optimizer, grads, trainable_variables, learning_rate):
  if not _sharding(optimizer):
    return original(optimizer, grads, trainable_variables, learning_rate)
  shard_step.apply(optimizer, grads, trainable_variables, learning_rate)
  return None


def _weight_decay(original, optimizer, variables):
  if _sharding(optimizer):
    return None   # on each replica's shard, in shard_step
  return original(optimizer, variables)
