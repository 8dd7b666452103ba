"""tools/multi_worker_bench.py: the wire limit and ratios, by hand."""

import tensorflow as tf

from tools import multi_worker_bench


class WireLimitTest(tf.test.TestCase):

  def test_add_ratios(self):
    result = {"fp32_bytes": 100 * 2**20, "rows": [
        {"config": "tf MWMS default (bpp=0)", "median_ms": 400.0},
        {"config": "tf_fusion auto none", "median_ms": 250.0}]}
    multi_worker_bench.add_ratios(result, workers=4, bandwidth=1e9)
    # 2 (W - 1) / W * S / B = 1.5 * 104857600 B / 1e9 B/s = 157.2864 ms
    self.assertAllClose(result["wire_limit_ms"], 157.2864)
    auto = result["rows"][1]
    self.assertAllClose(auto["x_faster_than_tf_default"], 1.6)
    self.assertAllClose(auto["x_wire_limit"], 250.0 / 157.2864)

  def test_loopback_bandwidth_is_measured(self):
    rate = multi_worker_bench.loopback_bandwidth(nbytes=16 << 20, chunk=1 << 20)
    self.assertGreater(rate, 1e6)   # bytes/s: any working loopback beats 1 MB/s


if __name__ == "__main__":
  tf.test.main()
