"""LAMB: layer-wise adaptive moments for large batches, as a Keras 3 optimizer.

Adam's step with LARS's idea: each variable's update is scaled by its trust ratio
||w|| / ||u||, so a batch of 32K-64K sequences can use a learning rate that would make
plain Adam diverge on some layers. Weight decay is inside the update whose norm the
ratio divides by (You et al. 2019, Algorithm 2), unlike Keras's `Lamb`, which applies
its decay apart from the ratio and gives every variable the ratio.

Reference:
  You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh 2019,
  "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
  arXiv:1904.00962, Algorithm 2.
"""

import keras
from keras import ops

from tf_fusion._internal import keras as keras_internal
from tf_fusion.optimizers import layerwise

# BERT's list: biases and LayerNorm's scale/offset (Keras names them gamma/beta under a
# layer_normalization path; checkpoints converted from TF1 BERT say LayerNorm).
DEFAULT_EXCLUSIONS = ("bias", "beta", "gamma", "layer_norm", "LayerNorm")


@keras.saving.register_keras_serializable(package="tf_fusion")
class LAMB(layerwise.LayerExclusions, keras_internal.WithoutDecoupledWeightDecay,
           keras.optimizers.Optimizer):
  """Adam moments with a per-variable trust ratio (LAMB), computed in FP32.

  For each variable w with gradient g (after the all-reduce, after unscaling), at step
  t = iterations + 1:

      m = beta_1 * m + (1 - beta_1) * g          m_hat = m / (1 - beta_1^t)
      v = beta_2 * v + (1 - beta_2) * g^2        v_hat = v / (1 - beta_2^t)
      u = m_hat / (sqrt(v_hat) + epsilon) + wd * w
      w = w - lr * (||w|| / ||u||) * u           (ratio 1 if a norm is 0)

  Variables whose path matches `exclude_from_weight_decay` get wd = 0; those matching
  `exclude_from_layer_adaptation` get ratio 1 (by default the weight-decay list:
  biases and LayerNorm, as in BERT). Moments, norms and the update run in FP32 whatever
  the variable's dtype.

  Usage:
      schedule = keras.optimizers.schedules.PolynomialDecay(1e-3, 10000, power=1.0)
      opt = tf_fusion.LAMB(schedule, weight_decay=0.01)
      model.compile(opt, loss=...)

  Args:
    learning_rate: float or a keras LearningRateSchedule.
    beta_1: decay of the first moment, in [0, 1).
    beta_2: decay of the second moment, in [0, 1).
    epsilon: added to sqrt(v_hat) (1e-6 in the paper).
    weight_decay: float >= 0, coupled into the update; None: 0 (no decay).
    exclude_from_weight_decay: regexes searched in each variable's path.
    exclude_from_layer_adaptation: regexes; None means the weight-decay list.
    **kwargs: the base Keras optimizer arguments (clipnorm, use_ema,
      gradient_accumulation_steps, name, ...), except `weight_decay` semantics, which
      are LAMB's.
  """

  def __init__(self,
               learning_rate=0.001,
               beta_1=0.9,
               beta_2=0.999,
               epsilon=1e-6,
               weight_decay=0.01,
               exclude_from_weight_decay=DEFAULT_EXCLUSIONS,
               exclude_from_layer_adaptation=None,
               name=None,
               **kwargs):
    if weight_decay is None:
      weight_decay = 0.0
    super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name,
                     **kwargs)
    layerwise.check_numbers("LAMB", dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                                         weight_decay=weight_decay),
                            below_one=("beta_1", "beta_2"))
    self.beta_1 = float(beta_1)
    self.beta_2 = float(beta_2)
    self.epsilon = float(epsilon)
    self._init_exclusions(exclude_from_weight_decay, exclude_from_layer_adaptation)

  def _build_slots(self, variables):
    """The two moment slots per variable."""
    self.momentums, self.velocities = self.add_optimizer_variables(
        variables, ["momentum", "velocity"])

  def layerwise_begin(self, gradient, variable, index):
    """Updates the moments; (w, u) in FP32 and [||w||^2, ||u||^2] (zeros without a
    trust ratio)."""
    w = ops.cast(variable, "float32")
    g = layerwise.dense_gradient(gradient)
    t = ops.cast(self.iterations + 1, "float32")
    m_slot, v_slot = self.momentums[index], self.velocities[index]
    m = self.beta_1 * ops.cast(m_slot, "float32") + (1.0 - self.beta_1) * g
    v = self.beta_2 * ops.cast(v_slot, "float32") + (1.0 - self.beta_2) * ops.square(g)
    self.assign(m_slot, ops.cast(m, m_slot.dtype))
    self.assign(v_slot, ops.cast(v, v_slot.dtype))
    m_hat = m / (1.0 - ops.power(self.beta_1, t))
    v_hat = v / (1.0 - ops.power(self.beta_2, t))
    update = m_hat / (ops.sqrt(v_hat) + self.epsilon)
    if self._use_decay[index] and self.weight_decay:
      update = update + self.weight_decay * w
    squares = (self.squares(w, update) if self._use_adaptation[index]
               else ops.zeros([2], "float32"))
    return (w, update), squares

  def layerwise_end(self, carry, squares, variable, index, learning_rate):
    """w - lr * ratio * u for one variable (or a part of it); FP32."""
    w, update = carry
    lr = ops.cast(learning_rate, "float32")
    if self._use_adaptation[index]:
      w_norm, u_norm = self.norms(squares)
      safe = ops.logical_and(w_norm > 0, u_norm > 0)
      ratio = ops.where(safe, w_norm / ops.where(safe, u_norm, 1.0), 1.0)
      update = ratio * update
    self.assign(variable, ops.cast(w - lr * update, variable.dtype))

  def get_config(self):
    config = super().get_config()
    config.update({
        "beta_1": self.beta_1,
        "beta_2": self.beta_2,
        "epsilon": self.epsilon,
        **self._exclusions_config(),
    })
    return config
