"""A short version of tools/large_batch_digits.py: LARS at batch 1024, mixed precision."""

import tensorflow as tf

from tests.harness import helpers
from tools import large_batch_digits


class LargeBatchDigitsTest(tf.test.TestCase):

  def test_lars_mixed_float16_at_batch_1024(self):
    """LARS + warm-up + poly(2), mixed_float16, FP16 wire, 4 replicas, 40 steps.

    The full experiment (30 epochs, 3 seeds) is in README; this short one must still
    reach 95% test accuracy (chance is 10%).
    """
    run = next(r for r in large_batch_digits.default_runs() if r.name == "lars_mixed")
    result = large_batch_digits.train(run, seed=0, data=large_batch_digits.load_data(),
                                      epochs=10, samples_per_epoch=4096,
                                      devices=helpers.devices(4))
    self.assertEqual(result["steps"], 40)
    self.assertGreaterEqual(result["final_accuracy"], 0.95)
    self.assertGreater(result["final_loss_scale"], 1.0)


if __name__ == "__main__":
  tf.test.main()
