"""Keras's internals that tf_fusion relies on, each behind one named function.

Tested with Keras 3.15 (TESTED_KERAS) on the TensorFlow backend. The optimizer's
private steps (clip, weight decay, update, accumulators) are the ones Keras's own
`apply` runs; tf_fusion's loss scaling runs them itself because it all-reduces in
between. tests/test_internal_seam.py holds one contract test per name below.
"""

from absl import logging
import keras

TESTED_KERAS = ("3.15",)

if not keras.__version__.startswith(TESTED_KERAS):
  logging.warning("tf_fusion is tested with Keras %s, not %s: it relies on some of "
                  "Keras's internals (tf_fusion/_internal/keras.py), which may have "
                  "changed.", ", ".join(TESTED_KERAS), keras.__version__)


# --- an optimizer's steps -------------------------------------------------------------

def has_all_reduce_step(optimizer) -> bool:
  """Whether `optimizer` all-reduces its gradients itself (Keras's TF backend)."""
  return hasattr(optimizer, "_all_reduce_sum_gradients")


def skip_all_reduce(optimizer, replacement) -> None:
  """Makes `optimizer` call `replacement(grads_and_vars)` where Keras's TF optimizer
  all-reduces its gradients (replica context, before the update)."""
  optimizer._all_reduce_sum_gradients = replacement  # pylint: disable=protected-access


def all_reduce_skipped(optimizer) -> bool:
  """Whether `skip_all_reduce` was applied to `optimizer` (a wrapper reduces for it)."""
  return "_all_reduce_sum_gradients" in vars(optimizer)


def clip_gradients(optimizer, grads):
  """`optimizer`'s clipnorm / clipvalue / global_clipnorm applied to `grads`."""
  return optimizer._clip_gradients(grads)  # pylint: disable=protected-access


def apply_weight_decay(optimizer, variables) -> None:
  """`optimizer`'s decoupled weight decay (its `weight_decay`) on `variables`."""
  optimizer._apply_weight_decay(variables)  # pylint: disable=protected-access


def update_step(optimizer, grads, variables) -> None:
  """`optimizer`'s update of `variables` by `grads` at its current learning rate."""
  optimizer._backend_update_step(grads, variables, optimizer.learning_rate)  # pylint: disable=protected-access


def overwrites_with_gradient(optimizer, variable) -> bool:
  """Whether `optimizer` sets `variable` to its "gradient" instead of updating it
  (Keras's `overwrite_with_gradient` variables, e.g. float8 scales)."""
  return optimizer._overwrite_variable_with_gradient(variable)  # pylint: disable=protected-access


def tracked_variables(optimizer):
  """The trainable variables `optimizer` was built for."""
  return optimizer._trainable_variables  # pylint: disable=protected-access


def batches_seen(optimizer):
  """The variable counting `optimizer`'s batches (micro-steps under gradient
  accumulation, where `iterations` counts updates)."""
  return optimizer._iterations  # pylint: disable=protected-access


def accumulators(optimizer, variables):
  """`optimizer`'s gradient accumulators of `variables` (gradient_accumulation_steps)."""
  return [optimizer._accumulated_gradients[optimizer._get_variable_index(v)]  # pylint: disable=protected-access
          for v in variables]


def add_to_accumulators(optimizer, grads, accumulators_) -> None:
  """Adds `grads` to `accumulators_` as Keras does between updates."""
  optimizer._backend_increment_gradient_accumulators(grads, accumulators_)  # pylint: disable=protected-access


def reset_accumulators(optimizer) -> None:
  """Sets every gradient accumulator of `optimizer` to zero."""
  optimizer._backend_reset_gradient_accumulators()  # pylint: disable=protected-access


def non_finite_step(loss_scale_optimizer):
  """The function Keras's LossScaleOptimizer runs on a non-finite step (halve the
  scale, reset the growth counter)."""
  return loss_scale_optimizer._stateful_handle_non_finite_grads  # pylint: disable=protected-access


def variable_key(optimizer, variable):
  """The key `optimizer` tracks `variable` by (its slots, exclusion sets)."""
  return optimizer._var_key(variable)  # pylint: disable=protected-access


def variable_index(optimizer, variable) -> int:
  """`variable`'s position among the variables `optimizer` was built for."""
  return optimizer._get_variable_index(variable)  # pylint: disable=protected-access


def variable_path(variable) -> str:
  """What Keras matches exclusion patterns against: a Keras variable's path, a raw
  tf.Variable's name (it has no path)."""
  return getattr(variable, "path", None) or variable.name


def decoupled_weight_decay(optimizer, variables) -> None:
  """Keras's decoupled weight decay of `optimizer` on plain (one-replica) `variables`,
  as its base optimizer computes it (w - w * wd * lr), without the strategy's
  merge_call that the TensorFlow backend adds around it."""
  if isinstance(optimizer, WithoutDecoupledWeightDecay):
    return
  keras.src.optimizers.base_optimizer.BaseOptimizer._apply_weight_decay(  # pylint: disable=protected-access
      optimizer, variables)


def same_update(cls, other) -> bool:
  """Whether optimizer class `cls` updates its variables with `other`'s code (its
  update_step, and the TensorFlow backend's `_backend_update_step` around it)."""
  return (cls.update_step is other.update_step
          and cls._backend_update_step is other._backend_update_step)  # pylint: disable=protected-access


def add_plain_slot(optimizer, reference, name=None, initializer="zeros"):
  """`optimizer.add_variable_from_reference` without the TensorFlow backend's
  colocation with a strategy's variable: for one replica's own (plain) variables."""
  return keras.src.optimizers.base_optimizer.BaseOptimizer.add_variable_from_reference(
      optimizer, reference, name=name, initializer=initializer)


def uses_weight_decay(optimizer, variable) -> bool:
  """Whether Keras's decoupled weight decay of `optimizer` applies to `variable`."""
  return optimizer._use_weight_decay(variable)  # pylint: disable=protected-access


def track_variable(optimizer, variable) -> None:
  """Adds `variable` to `optimizer.variables` (what Keras saves and loads, in order)."""
  optimizer._track_variable(variable)  # pylint: disable=protected-access


def raw_iterations(optimizer):
  """The variable counting `optimizer`'s batches (`iterations` divides it under
  gradient accumulation)."""
  return optimizer._iterations  # pylint: disable=protected-access


class WithoutDecoupledWeightDecay:
  """Optimizer mixin: Keras's decoupled weight decay (`weight_decay` applied apart from
  the update) is not applied; the optimizer couples its weight decay into its own
  update instead (LARS, LAMB after their papers)."""

  def _apply_weight_decay(self, variables):
    del variables


# --- Keras's steps, wrapped ----------------------------------------------------------

def _wrap(owner, name, wrapper):
  """Makes `owner.name(self, *args)` call `wrapper(original, self, *args)`; once."""
  original = getattr(owner, name)
  if getattr(original, "_tf_fusion_wrapper", None) is wrapper:
    return

  def method(self, *args, **kwargs):
    return wrapper(original, self, *args, **kwargs)

  method._tf_fusion_wrapper = wrapper  # pylint: disable=protected-access
  method.__doc__ = original.__doc__
  method.__name__ = name
  setattr(owner, name, method)


def wrap_clip_gradients(wrapper) -> None:
  """Every Keras optimizer's clipping (clipnorm, clipvalue, global_clipnorm) goes
  through `wrapper(original, optimizer, grads)`."""
  _wrap(keras.optimizers.Optimizer, "_clip_gradients", wrapper)


def wrap_all_reduce_gradients(wrapper) -> None:
  """Every Keras optimizer's own all-reduce of its gradients (replica context, before
  the update) goes through `wrapper(original, optimizer, grads_and_vars)`."""
  _wrap(keras.optimizers.Optimizer, "_all_reduce_sum_gradients", wrapper)


def wrap_loss_scale_apply(wrapper) -> None:
  """keras.optimizers.LossScaleOptimizer.apply (the one `compile` adds under
  mixed_float16) goes through `wrapper(original, lso, grads, trainable_variables)`."""
  _wrap(keras.optimizers.LossScaleOptimizer, "apply", wrapper)


def wrap_add_variable_from_reference(wrapper) -> None:
  """Every Keras optimizer's creation of a variable shaped like a model variable (its
  slots, in `build`) goes through `wrapper(original, optimizer, reference_variable,
  name=None, initializer="zeros")`."""
  _wrap(keras.optimizers.Optimizer, "add_variable_from_reference", wrapper)


def wrap_update_step(wrapper) -> None:
  """Every Keras optimizer's update of its variables by (clipped, decayed) gradients
  goes through `wrapper(original, optimizer, grads, trainable_variables,
  learning_rate)` (the TensorFlow backend's `_backend_update_step`, where it
  all-reduces and updates every replica)."""
  _wrap(keras.optimizers.Optimizer, "_backend_update_step", wrapper)


def wrap_weight_decay(wrapper) -> None:
  """Every Keras optimizer's decoupled weight decay goes through
  `wrapper(original, optimizer, variables)`."""
  _wrap(keras.optimizers.Optimizer, "_apply_weight_decay", wrapper)


# --- BackupAndRestore -----------------------------------------------------------------

def backup_metadata_path(backup) -> str:
  """The file where BackupAndRestore keeps the epoch and batch it will restore."""
  return backup._training_metadata_path  # pylint: disable=protected-access


def backup_now(backup) -> None:
  """Writes BackupAndRestore's checkpoint now, as it does at an epoch's end."""
  backup._save_model()  # pylint: disable=protected-access
