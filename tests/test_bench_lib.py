"""tools/bench_lib.py and the multi-worker ratios of tools/allreduce_bench.py, by hand."""

import numpy as np
import tensorflow as tf

from tools import allreduce_bench
from tools import bench_lib


class WireLimitTest(tf.test.TestCase):

  def test_add_wire_ratios(self):
    result = {"fp32_bytes": 100 * 2**20, "rows": [
        {"config": "tf MWMS default (bpp=0)", "median_ms": 400.0},
        {"config": "tf_fusion auto none", "median_ms": 250.0}]}
    allreduce_bench.add_wire_ratios(result, workers=4, bandwidth=1e9)
    # 2 (W - 1) / W * S / B = 1.5 * 104857600 B / 1e9 B/s = 157.2864 ms
    self.assertAllClose(result["wire_limit_ms"], 157.2864)
    auto = result["rows"][1]
    self.assertAllClose(auto["x_faster_than_tf_default"], 1.6)
    self.assertAllClose(auto["x_wire_limit"], 250.0 / 157.2864)

  def test_loopback_bandwidth_is_measured(self):
    rate = bench_lib.loopback_bandwidth(nbytes=16 << 20, chunk=1 << 20)
    self.assertGreater(rate, 1e6)   # bytes/s: any working loopback beats 1 MB/s


class BenchLibTest(tf.test.TestCase):

  def test_gradient_sets_are_the_recipe_models(self):
    # ResNet-50 v1.5 without conv biases (a BN follows each conv): 25.56M parameters,
    # 161 tensors (53 convs + 53 BN gamma/beta pairs + the FC kernel and bias).
    shapes = bench_lib.gradient_shapes("resnet50")
    self.assertLen(shapes, 161)
    self.assertEqual(sum(int(np.prod(s)) for s in shapes), 25_557_032)
    self.assertEqual(shapes[-2:], [(2048, 1000), (1000,)])
    with self.assertRaisesRegex(ValueError, "unknown gradient set 'vgg'"):
      bench_lib.gradient_shapes("vgg")

  def test_result_row_and_plan_text(self):
    row = bench_lib.result_row("x", "fused", [0.003, 0.001, 0.002], first=1.5)
    self.assertEqual((row["median_ms"], row["min_ms"], row["max_ms"]), (2.0, 1.0, 3.0))
    self.assertEqual(bench_lib.plan_text(row), "")
    row.update(packs=3, algorithms={"ring": 2, "reduce_to_one": 1})
    self.assertEqual(bench_lib.plan_text(row), "3 packs ring:2,reduce_to_one:1")

  def test_without_flag(self):
    self.assertEqual(bench_lib.without_flag(["--a", "1", "--b=2", "--c", "3"], "--a"),
                     ["--b=2", "--c", "3"])
    self.assertEqual(bench_lib.without_flag(["--a", "1", "--b=2"], "--b"), ["--a", "1"])


if __name__ == "__main__":
  tf.test.main()
