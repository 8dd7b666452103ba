"""tools/scaling_sharded.py against hand-computed figures."""

import unittest

from tools import scaling_model
from tools import scaling_sharded


class ScalingShardedTest(unittest.TestCase):

  def test_bert_large_has_its_published_size(self):
    # Devlin et al. 2019 report 340M for BERT-large (with its pooler, 1M); the
    # pre-training model here has none: 335M within 1%.
    self.assertAlmostEqual(scaling_sharded.parameters("bert_large") / 335e6, 1.0, delta=0.01)

  def test_update_is_bytes_over_bandwidth_and_state_divides(self):
    row = scaling_sharded.step("resnet50_lars", "p40_roce", 2048)
    params = sum(sum(l.tensors) for l in scaling_model.resnet50_layers())
    self.assertAlmostEqual(row["update_ms"], 1e3 * params * 28 / 346e9, places=6)
    self.assertAlmostEqual(row["state_mb_replicated"], params * 4 / 2**20, places=3)
    self.assertAlmostEqual(row["state_mb_sharded"] * 2048, row["state_mb_replicated"],
                           places=3)

  def test_it_pays_where_the_update_is_a_large_share_of_the_step(self):
    """The trade the model weighs: 1/N of the update against the weights' all-gather
    and copies. With a slow memory (the update dominates) sharding wins; with a fast
    one it costs; on one GPU there is nothing to shard."""
    saved = dict(scaling_sharded.HBM_BW)
    try:
      scaling_sharded.HBM_BW["h100_ib"] = 10e9
      slow = scaling_sharded.step("bert_large_lamb", "h100_ib", 64)
      scaling_sharded.HBM_BW["h100_ib"] = 1e15
      fast = scaling_sharded.step("bert_large_lamb", "h100_ib", 64)
    finally:
      scaling_sharded.HBM_BW.update(saved)
    self.assertGreater(slow["update_share"], 0.5)
    self.assertGreater(slow["speedup"], 1.5)
    self.assertLess(fast["speedup"], 1.0)
    self.assertLess(scaling_sharded.step("resnet50_lars", "h100_ib", 1)["speedup"], 1.0)


if __name__ == "__main__":
  unittest.main()
