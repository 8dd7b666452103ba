"""Mixed precision for data-parallel training: FP32 master weights, loss-scaled FP16 wire.

Keras's LossScaleOptimizer (3.15) unscales each replica's gradients and tests them for
inf/NaN *before* the all-reduce, and under MirroredStrategy takes replica 0's answer for
everyone. Two things go wrong at scale:
- gradients cross the wire unscaled, so FP16 compression flushes the small ones to zero
  (FP16's smallest subnormal is 6e-8; many ResNet gradients are below it);
- an inf on replica 1 alone is applied: the all-reduced gradient is inf and the weights
  become -inf/NaN.
The optimizer here all-reduces the gradients while still loss-scaled, unscales once after
the reduction (in FP32), and decides finiteness on the reduced gradients, which every
replica holds identically: one inf anywhere (or an FP16 pack that overflowed on the wire)
skips the step on every replica and halves the scale.

Usage:
    tf_fusion.mixed_precision.set_policy("mixed_float16")
    with strategy.scope():
      model = build_model()
      opt = tf_fusion.mixed_precision.loss_scale(tf_fusion.LARS(...))
      model.compile(opt, ...)

References:
  Micikevicius et al. 2018, "Mixed Precision Training", arXiv:1710.03740.
  Jia et al. 2018, arXiv:1807.11205, §3 (FP16 forward/backward, FP32 LARS).
"""

import keras
from keras import ops
import tensorflow as tf

from tf_fusion import gradient_marker
from tf_fusion import shard_step
from tf_fusion._internal import keras as keras_internal
from tf_fusion._internal import tf as tf_internal

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def set_policy(name):
  """Sets Keras's global dtype policy; returns it.

  Args:
    name: "float32", "mixed_float16" (the paper: needs loss scaling) or
      "mixed_bfloat16" (same exponent range as FP32: no loss scaling).

  Raises:
    ValueError: for any other name.
  """
  if name not in POLICIES:
    raise ValueError(f"Unknown precision policy {name!r}; valid: {', '.join(POLICIES)}.")
  keras.mixed_precision.set_dtype_policy(name)
  return keras.mixed_precision.dtype_policy()


def needs_loss_scaling(policy=None):
  """True when `policy` (default: the global one) computes in float16."""
  policy = policy or keras.mixed_precision.dtype_policy()
  name = policy if isinstance(policy, str) else policy.compute_dtype
  return "float16" in name and "bfloat16" not in name


def loss_scale(optimizer, initial_scale=2.0**15, dynamic_growth_steps=2000):
  """Wraps `optimizer` in the all-reduce-aware dynamic loss scaling below.

  Raises:
    TypeError: `optimizer` is not a Keras optimizer instance (a class, a name).
  """
  if not isinstance(optimizer, keras.optimizers.Optimizer):
    what = (f"the class {optimizer.__name__}" if isinstance(optimizer, type)
            else repr(optimizer))
    raise TypeError(f"loss_scale takes a Keras optimizer instance, e.g. "
                    f"loss_scale(tf_fusion.LARS(0.1)), got {what}.")
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    raise ValueError(f"{optimizer.name} is already loss-scaled; wrap the inner optimizer.")
  return LossScaleOptimizer(optimizer, initial_scale=initial_scale,
                            dynamic_growth_steps=dynamic_growth_steps)


def optimizer_for_policy(optimizer, policy=None):
  """`loss_scale(optimizer)` under a float16 policy, else `optimizer` unchanged."""
  return loss_scale(optimizer) if needs_loss_scaling(policy) else optimizer


def _reduced_by_the_wrapper(grads_and_vars):
  """Stands in for the inner optimizer's `_all_reduce_sum_gradients`: the wrapper
  below has already all-reduced (loss-scaled) and unscaled these gradients."""
  return list(grads_and_vars)


def _never_reduce_again(optimizer):
  """Makes Keras's TF optimizer skip its own all-reduce, for good.

  The wrapper always reduces before it calls the inner optimizer, so "already reduced"
  is a fixed property of the pair, not something to switch on around each call: a
  per-call switch is undone while MirroredStrategy holds replica thread 0 suspended in
  the inner optimizer's merge_call, and the gradients are then reduced twice.
  """
  if not keras_internal.has_all_reduce_step(optimizer):
    raise TypeError(
        f"{type(optimizer).__name__} does not all-reduce its gradients itself: "
        "tf_fusion's loss scaling needs a Keras 3 optimizer on the TensorFlow backend.")
  keras_internal.skip_all_reduce(optimizer, _reduced_by_the_wrapper)


@keras.saving.register_keras_serializable(package="tf_fusion")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
  """Dynamic loss scaling with the all-reduce on scaled gradients, unscaled after.

  Same state, schedule and config as keras.optimizers.LossScaleOptimizer (it is one, so
  `compile` does not wrap it again); under a tf.distribute strategy, `apply` reduces
  first, then unscales and checks finiteness on the reduced values (`_ReducedFirst`).
  """

  def __init__(self, inner_optimizer, *args, **kwargs):
    super().__init__(inner_optimizer, *args, **kwargs)
    _never_reduce_again(self.inner_optimizer)

  def apply(self, grads, trainable_variables=None):
    if not tf.distribute.has_strategy():
      return super().apply(grads, trainable_variables)
    return _ReducedFirst(self).apply(grads, trainable_variables)

  def check_finite(self, grads):
    """Whether every gradient (the values of IndexedSlices too) is finite."""
    return _all_finite(grads)


def reduce_first(loss_scale_optimizer, grads, trainable_variables=None):
  """Keras's own LossScaleOptimizer stepped as tf_fusion's (under tf_fusion's
  strategies, the one `compile` adds under mixed_float16): reduce the scaled gradients,
  unscale, decide finiteness on the reduced values."""
  inner = loss_scale_optimizer.inner_optimizer
  if not keras_internal.all_reduce_skipped(inner):
    _never_reduce_again(inner)
  return _ReducedFirst(loss_scale_optimizer).apply(grads, trainable_variables)


def _all_finite(grads):
  values = [g.values if isinstance(g, tf.IndexedSlices) else g
            for g in grads if g is not None]
  return ops.all(ops.convert_to_tensor([ops.all(ops.isfinite(v)) for v in values]))


class _ReducedFirst:
  """One step of a LossScaleOptimizer `lso` under a strategy, reduced first.

  The scaled gradients are all-reduced (on the 16-bit wire, if any, while still scaled),
  unscaled once in FP32, and tested for inf/NaN after the reduction, which every replica
  holds identically: an overflow on any replica skips the step on all and halves the
  scale. The scale grows by one per batch whose step was finite, as on one device
  (under gradient accumulation, by the window's batches at its update).
  """

  def __init__(self, lso):
    self.lso = lso
    self.inner = lso.inner_optimizer

  def apply(self, grads, trainable_variables=None):
    """The step (replica context); None, as Keras's apply."""
    lso = self.lso
    if tf.distribute.in_cross_replica_context():
      raise ValueError("apply() must be called in a replica context.")
    if not lso.built:
      with keras.name_scope(lso.name, caller=lso):
        lso.build(trainable_variables)
      lso.built = True
    variables = list(trainable_variables or keras_internal.tracked_variables(lso))
    if self.inner.gradient_accumulation_steps:
      self._accumulating_apply(list(grads), variables)
      return None
    if shard_step.sharded_ops() is not None:
      self._sharded_step(list(grads), variables, batches=1, count_iteration=True)
      return None
    grads = self._unscale(self._all_reduce_scaled(list(grads)), variables)
    finite = _all_finite(grads)
    if tf_internal.strategy_reduces_without_merge_call():
      ops.cond(finite, lambda: self._finite_step(grads, trainable_variables),
               keras_internal.non_finite_step(lso))
      return None
    tf.distribute.get_replica_context().merge_call(
        self._cross_replica_apply, args=(grads, finite, trainable_variables))
    return None

  def _accumulating_apply(self, grads, variables):
    """Gradient accumulation: local sums per replica, one all-reduce per update.

    Micro-steps add their unscaled gradients to the inner optimizer's accumulators,
    on each replica, with no communication. The update step all-reduces the mean of
    the window, loss-scaled on the wire as every step here is, and decides finiteness
    on the reduced values: an inf or NaN in any micro-batch of any replica reached the
    accumulators, hence the reduced sum, so every replica skips the update and lowers
    the scale once (one device would lower it at that batch and still apply the
    window's finite batches: the one difference, since deciding per micro-batch would
    cost a collective per batch). Either way the accumulators restart at zero and the
    window goes on counting (the inner optimizer's `_iterations`, micro-steps; its
    `iterations` counts updates, and so do learning-rate schedules). A finite update
    grows the scale by the window's batches, as one device counts them.

    The all-reduce runs inside a cond of the replica function, where MirroredStrategy
    cannot merge_call; tf_fusion's strategies launch it per replica there.
    """
    inner = self.inner
    steps = inner.gradient_accumulation_steps
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    grads, variables = [g for g, _ in pairs], [v for _, v in pairs]
    local = self._unscale(grads, variables)
    accumulators = keras_internal.accumulators(inner, variables)

    def update():
      window = [(g + a) / steps for g, a in zip(local, accumulators)]
      scale = self.lso.dynamic_scale
      if shard_step.sharded_ops() is not None:
        self._sharded_step([w * ops.cast(scale, w.dtype) for w in window], variables,
                           batches=steps, count_iteration=False)
        keras_internal.reset_accumulators(inner)
        return
      reduced = self._unscale(self._all_reduce_scaled(
          [w * ops.cast(scale, w.dtype) for w in window]), variables)
      ops.cond(_all_finite(reduced),
               lambda: self._inner_update(reduced, variables, steps),
               keras_internal.non_finite_step(self.lso))
      keras_internal.reset_accumulators(inner)

    def accumulate():
      keras_internal.add_to_accumulators(inner, local, accumulators)

    batches = keras_internal.batches_seen(inner)
    ops.cond(ops.equal((batches + 1) % steps, 0), update, accumulate)
    batches.assign_add(1)

  def _sharded_step(self, grads, variables, batches, count_iteration):
    """The inner optimizer's sharded step (shard_step) on loss-scaled, unreduced
    `grads`: reduce-scattered scaled, unscaled on each shard, one finiteness decision
    for all; then, as `apply` would, the scale grows by `batches` and the inner
    optimizer counts the step (`count_iteration`; under accumulation the micro-steps
    are counted as they come), or the scale drops."""
    inner = self.inner

    def finite_step():
      self._grow_scale(batches)
      if count_iteration:
        keras_internal.raw_iterations(inner).assign_add(1)

    shard_step.apply(
        inner, grads, variables, inner.learning_rate,
        loss_scale=tf.convert_to_tensor(self.lso.dynamic_scale),
        after=lambda finite: ops.cond(finite, finite_step,
                                      keras_internal.non_finite_step(self.lso)))

  def _inner_update(self, grads, variables, batches):
    """The inner optimizer's update on reduced, unscaled gradients, as Keras runs it
    at the end of an accumulation window (clip, weight decay, update step)."""
    inner = self.inner
    grads = keras_internal.clip_gradients(inner, grads)
    keras_internal.apply_weight_decay(inner, variables)
    keras_internal.update_step(inner, grads, variables)
    self._grow_scale(batches)

  def _all_reduce_scaled(self, grads):
    """SUM all-reduce of the loss-scaled gradients (None entries kept)."""
    return gradient_marker.sum_gradients(grads)

  def _unscale(self, grads, variables):
    """Divides by the loss scale once, in at least FP32, after the reduction."""
    out = []
    scale = self.lso.dynamic_scale
    for g, v in zip(grads, variables):
      if g is None or keras_internal.overwrites_with_gradient(self.lso, v):
        out.append(g)
        continue
      dtype = g.dtype if g.dtype.size >= 4 else tf.float32
      if isinstance(g, tf.IndexedSlices):
        out.append(tf.IndexedSlices(tf.cast(g.values, dtype) / tf.cast(scale, dtype),
                                    g.indices, g.dense_shape))
      else:
        out.append(tf.cast(g, dtype) / tf.cast(scale, dtype))
    return out

  def _apply_reduced(self, grads, trainable_variables):
    """Replica context: the inner step on already-reduced, unscaled gradients."""
    self.inner.apply(grads, trainable_variables=trainable_variables)

  def _finite_step(self, grads, trainable_variables):
    self._apply_reduced(grads, trainable_variables)
    self._grow_scale(1)

  def _grow_scale(self, batches):
    """After `batches` finite batches: the scale doubles each time the count of finite
    batches reaches dynamic_growth_steps (Keras's rule, one batch at a time)."""
    lso = self.lso
    total = lso.step_counter + batches
    growth = lso.dynamic_growth_steps
    lso.step_counter.assign(total % growth)
    lso.dynamic_scale.assign(lso.dynamic_scale * ops.power(
        2.0, ops.cast(total // growth, "float32")))

  def _cross_replica_apply(self, distribution, grads, finite, trainable_variables):
    # The reduced gradients are the same on every replica, hence so is `finite`; the
    # AND over local replicas keeps the decision one even if a reduction were not
    # bit-identical across devices.
    finite = tf.reduce_all(tf.stack(distribution.experimental_local_results(finite)))

    def apply_fn():
      distribution.extended.call_for_each_replica(
          self._apply_reduced, args=(grads, trainable_variables))
      self._grow_scale(1)

    # The cond runs in cross-replica context: a branch that calls merge_call (the inner
    # optimizer does) cannot live in a replica-context cond.
    ops.cond(finite, apply_fn, keras_internal.non_finite_step(self.lso))
