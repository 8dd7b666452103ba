"""Learning-rate schedules for large-batch training: linear warm-up, then poly decay.

A large batch takes a learning rate scaled with the batch (Goyal et al. 2017), too large
for the first steps from a random start: ramp it up linearly over `warmup_steps`, then
decay it as (1 - p)^power (power 2 in the LARS paper and Jia et al. 2018).

References:
  Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677.
  You, Gitman, Ginsburg 2017, arXiv:1708.03888.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tf_fusion")
class WarmupPolyDecay(keras.optimizers.schedules.LearningRateSchedule):
  """lr(t) = peak * (t + 1) / warmup_steps for t < warmup_steps, then
  end + (peak - end) * (1 - (t - warmup_steps) / (total_steps - warmup_steps))^power,
  held at `end` after total_steps.

  Usage:
      lr = WarmupPolyDecay(peak=2.0, warmup_steps=500, total_steps=5000)
      opt = tf_fusion.LARS(lr)

  Args:
    peak: learning rate at the end of the warm-up.
    warmup_steps: steps of linear ramp (0: none).
    total_steps: step at which the decay reaches `end`.
    power: decay exponent.
    end: final learning rate.
  """

  def __init__(self, peak, warmup_steps, total_steps, power=2.0, end=0.0):
    if not 0 <= warmup_steps < total_steps:
      raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps="
                       f"{warmup_steps}, total_steps={total_steps}.")
    if peak <= 0 or end < 0 or power <= 0:
      raise ValueError(f"need peak > 0, end >= 0, power > 0; got peak={peak}, "
                       f"end={end}, power={power}.")
    self.peak = float(peak)
    self.warmup_steps = int(warmup_steps)
    self.total_steps = int(total_steps)
    self.power = float(power)
    self.end = float(end)

  def __call__(self, step):
    t = ops.cast(step, "float32")
    warm = self.peak * (t + 1.0) / max(self.warmup_steps, 1)
    progress = ops.clip((t - self.warmup_steps) / (self.total_steps - self.warmup_steps),
                        0.0, 1.0)
    decay = self.end + (self.peak - self.end) * ops.power(1.0 - progress, self.power)
    return ops.where(t < self.warmup_steps, warm, decay)

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "power": self.power, "end": self.end}
