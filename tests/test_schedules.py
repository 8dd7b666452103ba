"""WarmupPolyDecay against the formula, evaluated in NumPy."""

import keras
import tensorflow as tf

from official_recipes import schedules


class WarmupPolyDecayTest(tf.test.TestCase):

  def test_values(self):
    peak, warmup, total, end = 2.0, 10, 110, 0.01
    lr = schedules.WarmupPolyDecay(peak, warmup, total, power=2.0, end=end)
    for t in [0, 4, 9, 10, 35, 60, 109, 110, 500]:
      if t < warmup:
        want = peak * (t + 1) / warmup
      else:
        p = min((t - warmup) / (total - warmup), 1.0)
        want = end + (peak - end) * (1 - p) ** 2
      self.assertAllClose(float(lr(t)), want, rtol=1e-6, msg=f"step {t}")
    # Warm-up ends at the peak and decay starts from it: no jump.
    self.assertAllClose(float(lr(warmup - 1)), float(lr(warmup)))

  def test_no_warmup_and_config(self):
    lr = schedules.WarmupPolyDecay(1.0, 0, 4)
    self.assertAllClose([float(lr(t)) for t in range(5)], [1.0, 0.5625, 0.25, 0.0625, 0.0])
    clone = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(lr))
    self.assertEqual(clone.get_config(), lr.get_config())

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "warmup_steps < total_steps"):
      schedules.WarmupPolyDecay(1.0, 10, 10)
    with self.assertRaisesRegex(ValueError, "peak > 0"):
      schedules.WarmupPolyDecay(0.0, 0, 10)


if __name__ == "__main__":
  tf.test.main()
