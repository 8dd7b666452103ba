"""LARS: layer-wise adaptive rate scaling, as a Keras 3 optimizer.

Large batches need large learning rates, and one global rate is too large for some
layers and too small for others. LARS scales each variable's step by its trust ratio
||w|| / ||g||, so every layer moves by about the same fraction of its norm.

References:
  You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks",
  arXiv:1708.03888.
  Jia et al. 2018, "Highly Scalable Deep Learning Training System with
  Mixed-Precision: Training ImageNet in Four Minutes", arXiv:1807.11205, §3.
"""

import keras
from keras import ops

from tf_fusion._internal import keras as keras_internal
from tf_fusion.optimizers import layerwise

DEFAULT_EXCLUSIONS = ("bias", "beta", "gamma", "batch_norm")


@keras.saving.register_keras_serializable(package="tf_fusion")
class LARS(layerwise.LayerExclusions, keras_internal.WithoutDecoupledWeightDecay,
           keras.optimizers.Optimizer):
  """Momentum SGD with a per-variable trust ratio (LARS), computed in FP32.

  For each variable w with gradient g (after the all-reduce, after unscaling):

      local_lr = eta * ||w|| / (||g|| + wd * ||w|| + epsilon)   (1 if a norm is 0)
      v = momentum * v + lr * local_lr * (g + wd * w)
      w = w - v                       (Nesterov: w - (momentum * v + lr * local_lr * (g + wd * w)))

  Variables whose path matches `exclude_from_weight_decay` get wd = 0; those matching
  `exclude_from_layer_adaptation` get local_lr = 1 (by default the same list: bias and
  batch-norm beta/gamma, which the paper found worth +1.3% top-1 on AlexNet). Norms and
  the update run in FP32 whatever the variable's dtype, so FP16 weights cannot
  underflow the step (Jia et al. §3).

  Weight decay here is LARS's own (inside the trust ratio and the update), not Keras's
  decoupled decay, which this optimizer never applies.

  Usage:
      opt = tf_fusion.LARS(schedule, momentum=0.9, weight_decay=5e-5, eta=0.001)
      opt.exclude_from_layer_adaptation(var_list=[model.embedding.embeddings])
      model.compile(opt, loss=...)

  Args:
    learning_rate: float or a keras LearningRateSchedule.
    momentum: float in [0, 1).
    weight_decay: float >= 0, the L2 coefficient used by LARS; None: 0 (no decay).
    eta: trust coefficient (0.001 in the paper).
    epsilon: added to the trust-ratio denominator.
    nesterov: Nesterov momentum.
    exclude_from_weight_decay: regexes searched in each variable's path.
    exclude_from_layer_adaptation: regexes; None means the weight-decay list.
    **kwargs: the base Keras optimizer arguments (clipnorm, use_ema, name, ...),
      except `weight_decay` semantics, which are LARS's.
  """

  def __init__(self,
               learning_rate=0.1,
               momentum=0.9,
               weight_decay=5e-5,
               eta=0.001,
               epsilon=0.0,
               nesterov=False,
               exclude_from_weight_decay=DEFAULT_EXCLUSIONS,
               exclude_from_layer_adaptation=None,
               name=None,
               **kwargs):
    if weight_decay is None:   # as Keras's SGD, Lion and Lamb take it: no decay
      weight_decay = 0.0
    # name None: Keras numbers it, "lars", "lars_1", ...
    super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name,
                     **kwargs)
    layerwise.check_numbers("LARS", dict(momentum=momentum, weight_decay=weight_decay,
                                         eta=eta, epsilon=epsilon), below_one=("momentum",))
    self.momentum = float(momentum)
    self.eta = float(eta)
    self.epsilon = float(epsilon)
    self.nesterov = bool(nesterov)
    self._init_exclusions(exclude_from_weight_decay, exclude_from_layer_adaptation)

  def _build_slots(self, variables):
    """A momentum slot per variable (none without momentum)."""
    self.momentums = (self.add_optimizer_variables(variables, "momentum")
                      if self.momentum else [])

  def layerwise_begin(self, gradient, variable, index):
    """(w, g) in FP32, and [||w||^2, ||g||^2] (zeros without a trust ratio)."""
    w = ops.cast(variable, "float32")
    g = layerwise.dense_gradient(gradient)
    squares = (self.squares(w, g) if self._use_adaptation[index]
               else ops.zeros([2], "float32"))
    return (w, g), squares

  def layerwise_end(self, carry, squares, variable, index, learning_rate):
    """The LARS step for one variable (or a part of it); all arithmetic in FP32."""
    w, g = carry
    lr = ops.cast(learning_rate, "float32")
    wd = self.weight_decay if self._use_decay[index] else 0.0
    if self._use_adaptation[index]:
      w_norm, g_norm = self.norms(squares)
      denominator = g_norm + wd * w_norm + self.epsilon
      safe = ops.logical_and(w_norm > 0, g_norm > 0)
      trust = ops.where(safe, self.eta * w_norm / ops.where(safe, denominator, 1.0), 1.0)
      step = lr * trust * (g + wd * w) if wd else lr * trust * g
    else:
      step = lr * (g + wd * w) if wd else lr * g
    if self.momentum:
      v = self.momentums[index]
      v_new = self.momentum * ops.cast(v, "float32") + step
      self.assign(v, ops.cast(v_new, v.dtype))
      delta = self.momentum * v_new + step if self.nesterov else v_new
    else:
      delta = step
    self.assign(variable, ops.cast(w - delta, variable.dtype))

  def get_config(self):
    config = super().get_config()
    config.update({
        "momentum": self.momentum,
        "eta": self.eta,
        "epsilon": self.epsilon,
        "nesterov": self.nesterov,
        **self._exclusions_config(),
    })
    return config
