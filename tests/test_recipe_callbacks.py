"""official_recipes/callbacks.py: the step logger's rates, on a real (small) fit."""

import keras
import numpy as np
import tensorflow as tf

from official_recipes import callbacks


def fit(steps, log_steps, writer_dir):
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  model.compile(keras.optimizers.SGD(0.1), loss="mse")
  logger = callbacks.StepLogger(8, log_steps, steps, writer_dir, unit="sequences")
  x = np.random.RandomState(0).randn(8 * steps, 4).astype(np.float32)
  model.fit(x, x[:, :2], batch_size=8, epochs=1, shuffle=False, verbose=0,
            callbacks=[logger])
  return logger


class StepLoggerTest(tf.test.TestCase):

  def test_a_run_shorter_than_two_windows_reports_its_speed(self):
    """20 steps logged every 100: one window only (dropped, it holds the tracing); the
    speed is taken over steps 1-20 after the first, and said."""
    with self.assertLogs(level="INFO") as logs:
      logger = fit(20, 100, self.create_tempdir().full_path)
    self.assertLen(logger.rates, 1)
    self.assertIsNotNone(logger.steady_rate)
    self.assertGreater(logger.steady_rate, 0)
    self.assertEqual(logger.steady_rate, logger.short_run_rate)
    self.assertTrue(any("fewer than two log windows" in line for line in logs.output))

  def test_longer_runs_keep_the_median_of_the_windows_after_the_first(self):
    logger = fit(12, 3, self.create_tempdir().full_path)
    self.assertLen(logger.rates, 4)
    self.assertEqual(logger.steady_rate,
                     float(np.median(logger.rates[1:])))

  def test_one_step_has_no_speed(self):
    self.assertIsNone(fit(1, 100, self.create_tempdir().full_path).steady_rate)


if __name__ == "__main__":
  tf.test.main()
