"""What the layer-wise optimizers (LARS, LAMB) share: exclusion lists, argument checks.

Both papers leave some variables out: no weight decay on biases and normalisation
scales/offsets, and no trust ratio on them either (You et al. 2017 §4 for LARS, the
BERT code for LAMB). A variable is excluded by a regex searched in its path or by the
object itself; each variable's exclusions are fixed when the optimizer is built, so
every replica of a strategy and every retrace sees the same choice.
"""

import re

from keras import ops
import tensorflow as tf

from tf_fusion._internal import keras as keras_internal


def dense_gradient(gradient):
  """The gradient as one dense FP32 tensor. An embedding's gradient arrives as
  tf.IndexedSlices (rows, possibly repeated); the layer-wise norms need the whole
  table's gradient, so the rows are summed into it (Keras's ops.convert_to_tensor
  leaves IndexedSlices as they are)."""
  if isinstance(gradient, tf.IndexedSlices):
    gradient = tf.convert_to_tensor(gradient)
  return tf.cast(gradient, tf.float32)


def check_numbers(owner, numbers, below_one=()):
  """Raises a ValueError naming `owner`'s argument unless every value of `numbers`
  ({name: value}) is a number >= 0, and those named in `below_one` are < 1."""
  for arg, value in numbers.items():
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{owner} {arg} must be a number >= 0, got {value!r}.")
    if arg in below_one and value >= 1:
      raise ValueError(f"{owner} {arg} must be in [0, 1), got {value!r}.")


def patterns(owner, name, value):
  """Validates an exclusion argument of `owner` (a class name): a sequence of regex
  strings, or None."""
  if value is None:
    return None
  if isinstance(value, str):
    value = (value,)
  value = tuple(value)
  for item in value:
    if not isinstance(item, str):
      raise ValueError(
          f"{owner} {name} takes regexes matched against variable paths, got {item!r}; "
          f"to exclude variable objects call optimizer.{name}(var_list=[...]) "
          "before the optimizer is built.")
    try:
      re.compile(item)
    except re.error as e:
      raise ValueError(f"{owner} {name}: {item!r} is not a valid regex ({e}).") from None
  return value


class LayerExclusions:
  """Optimizer mixin: `exclude_from_weight_decay` / `exclude_from_layer_adaptation` by
  regex or object, fixed per variable at build time (`_fix_exclusions`).

  An adaptation list of None means "the weight-decay list", as in both papers' code.
  """

  def _init_exclusions(self, exclude_from_weight_decay, exclude_from_layer_adaptation):
    owner = type(self).__name__
    self._decay_patterns = patterns(owner, "exclude_from_weight_decay",
                                    exclude_from_weight_decay)
    self._adapt_patterns = patterns(owner, "exclude_from_layer_adaptation",
                                    exclude_from_layer_adaptation)
    self._decay_excluded_ids = set()
    self._adapt_excluded_ids = set()

  def exclude_from_weight_decay(self, var_list=None, var_names=None):
    """Adds variables (objects or name regexes) to the weight-decay exclusions."""
    self._decay_patterns = self._exclude("exclude_from_weight_decay",
                                         self._decay_excluded_ids, self._decay_patterns,
                                         var_list, var_names)

  def exclude_from_layer_adaptation(self, var_list=None, var_names=None):
    """Adds variables (objects or name regexes) to the trust-ratio exclusions."""
    self._adapt_patterns = self._exclude("exclude_from_layer_adaptation",
                                         self._adapt_excluded_ids, self._adapt_patterns,
                                         var_list, var_names)

  def _exclude(self, what, ids, current, var_list, var_names):
    """`current` with `var_names` added, `ids` updated in place. After the build only
    a repeat of what is already excluded is taken (every replica of a strategy makes
    the same call, as Keras's own exclusions allow); anything new is refused, since
    each variable's exclusions are fixed when the optimizer is built."""
    new_ids = {keras_internal.variable_key(self, v) for v in var_list or ()}
    new_patterns = patterns(type(self).__name__, what, var_names) or ()
    if self.built:
      if new_ids <= ids and set(new_patterns) <= set(current or ()):
        return current
      raise ValueError(f"{type(self).__name__}.{what}() must be called before the "
                       "optimizer is built (before the first step).")
    ids.update(new_ids)
    return (current or ()) + new_patterns if new_patterns else current

  @staticmethod
  def _matches(regexes, ids, variable, key):
    if key in ids:
      return True
    return any(re.search(p, keras_internal.variable_path(variable)) for p in regexes or ())

  def build(self, variables):
    """Builds Keras's part, the optimizer's slots (`_build_slots`) and, once, each
    variable's exclusions."""
    if self.built:
      return
    super().build(variables)
    self._fix_exclusions(variables)   # first: a sharded build reads them for its shards
    self._build_slots(variables)

  def _build_slots(self, variables):
    raise NotImplementedError

  def _fix_exclusions(self, variables):
    """Decides, once, which of `variables` get weight decay and a trust ratio."""
    self._use_decay, self._use_adaptation = [], []
    for v in variables:
      key = keras_internal.variable_key(self, v)
      no_decay = self._matches(self._decay_patterns, self._decay_excluded_ids, v, key)
      if self._adapt_patterns is None and not self._adapt_excluded_ids:
        no_adapt = no_decay
      else:
        no_adapt = self._matches(self._adapt_patterns, self._adapt_excluded_ids, v, key)
      self._use_decay.append(not no_decay)
      self._use_adaptation.append(not no_adapt)

  def set_exclusions(self, use_decay, use_adaptation):
    """Sets, per built variable, whether it gets weight decay and a trust ratio (a
    replica's shard of an optimizer takes the original's choices this way)."""
    self._use_decay, self._use_adaptation = list(use_decay), list(use_adaptation)

  def uses_weight_decay(self, variable):
    """Whether weight decay is applied to `variable` (after build)."""
    return self._use_decay[keras_internal.variable_index(self, variable)]

  def uses_layer_adaptation(self, variable):
    """Whether `variable`'s step is scaled by its trust ratio (after build)."""
    return self._use_adaptation[keras_internal.variable_index(self, variable)]

  def update_step(self, gradient, variable, learning_rate):
    """One step for one variable: `layerwise_begin`, then `layerwise_end` with the
    variable's own sums of squares (the sharded update adds them over its shards
    between the two)."""
    index = keras_internal.variable_index(self, variable)
    carry, squares = self.layerwise_begin(gradient, variable, index)
    self.layerwise_end(carry, squares, variable, index, learning_rate)

  def layerwise_begin(self, gradient, variable, index):
    """(carry, squares): what `layerwise_end` needs, and the float32 vector
    [sum w^2, sum u^2] of `variable` (w its weights, u the step the trust ratio
    scales), zeros where the variable has no trust ratio. Over a part of a variable,
    the sums are partial: adding them over all parts gives the whole variable's."""
    raise NotImplementedError

  def layerwise_end(self, carry, squares, variable, index, learning_rate):
    """Applies the step begun by `layerwise_begin`, scaled by the trust ratio that
    `squares` (the whole variable's sums) give."""
    raise NotImplementedError

  @staticmethod
  def norms(squares):
    """(||w||, ||u||) from `layerwise_begin`'s sums of squares."""
    return ops.sqrt(squares[0]), ops.sqrt(squares[1])

  @staticmethod
  def squares(w, u):
    """[sum w^2, sum u^2] as float32."""
    return ops.stack([ops.sum(ops.square(w)), ops.sum(ops.square(u))])

  def _exclusions_config(self):
    return {
        "exclude_from_weight_decay": list(self._decay_patterns or ()),
        "exclude_from_layer_adaptation": (None if self._adapt_patterns is None
                                          else list(self._adapt_patterns)),
    }
