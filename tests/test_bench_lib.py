"""tools/bench_lib.py and the multi-worker ratios of tools/allreduce_bench.py, by hand."""

import os
import time

import numpy as np
import tensorflow as tf

from absl import flags

from official_recipes.imagenet import recipe_flags
from tests.harness import helpers
from tools import allreduce_bench
from tools import bench_lib
from tools import profile_step
from tools import train_bench


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

  def test_every_config_can_be_picked_with_only(self):
    # --only is comma-separated: a name with a comma could never be selected.
    for configs in (allreduce_bench.configs(True), allreduce_bench.multi_worker_configs(True)):
      names = [n for n, _, _ in configs]
      self.assertEmpty([n for n in names if "," in n])
      self.assertLen(set(names), len(names))

  def test_the_sharded_exchange_row_gives_every_replica_the_sum(self):
    """What the benchmark times is a real reduction: reduce-scatter then all-gather by
    the sharded update's layout ends with the sum on every replica (NumPy)."""
    devices = helpers.devices(4)
    strategy, reduce = bench_lib.sharded_exchange(devices)
    shapes = [(10, 3), (7,), (33,), (2, 2)]
    arrays = [[np.random.RandomState(10 * r + i).randn(*s).astype(np.float32)
               for i, s in enumerate(shapes)] for r in range(4)]
    grads = [helpers.per_replica(strategy, [arrays[r][i] for r in range(4)])
             for i in range(len(shapes))]
    step = bench_lib.reduction_step(strategy, grads, reduce)
    with strategy.scope():
      out = step()
    flat = tf.nest.flatten(out)
    self.assertLen(flat, 4 * len(shapes))   # every tensor on every replica
    for t in flat:   # the shapes differ: each result is found by its shape
      i = shapes.index(tuple(t.shape))
      self.assertAllClose(t, sum(arrays[r][i] for r in range(4)), rtol=1e-6, atol=1e-6)

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

  def test_the_bert_set_has_its_embeddings_as_lookups(self):
    specs = bench_lib.gradient_set("bert_base")
    sparse = [s for s in specs if isinstance(s, bench_lib.Sparse)]
    self.assertLen(specs, 202)
    self.assertEqual(sparse, [bench_lib.Sparse((30522, 768), 4096),
                              bench_lib.Sparse((512, 768), 128),
                              bench_lib.Sparse((2, 768), 4096)])
    self.assertEqual(sum(bench_lib.num_elements(s) for s in specs), 109_514_298)
    self.assertIn("3 as IndexedSlices", bench_lib.describe(specs))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    (value,) = bench_lib.per_replica(strategy, [bench_lib.Sparse((10, 4), 50)], seed=0)
    slices = value.values[0] if hasattr(value, "values") else value
    self.assertIsInstance(slices, tf.IndexedSlices)
    self.assertEqual(slices.values.shape, (50, 4))
    indices = slices.indices.numpy()
    self.assertTrue(((indices >= 0) & (indices < 10)).all())
    self.assertLess(len(set(indices)), 50)   # repeats, as a batch's tokens have

  def test_result_row_and_plan_text(self):
    row = bench_lib.result_row("x", "fused", [0.003, 0.001, 0.002], first=1.5)
    self.assertEqual((row["median_ms"], row["min_ms"], row["max_ms"]), (2.0, 1.0, 3.0))
    self.assertEqual(bench_lib.plan_text(row), "")
    row.update(packs=3, algorithms={"ring": 2, "reduce_to_one": 1})
    self.assertEqual(bench_lib.plan_text(row), "3 packs ring:2,reduce_to_one:1")

  def test_time_reduction_gives_cpu_seconds_per_call(self):
    # Each call burns 20 ms of CPU per replica value in a py_function (2 replicas):
    # 40 ms a call, whatever the number of calls and however long the wall time.
    def burn(x):
      start = time.process_time()
      while time.process_time() - start < 0.02:
        pass
      return x

    strategy = tf.distribute.MirroredStrategy(helpers.devices(2))
    grads = bench_lib.per_replica(strategy, [(4,)], seed=1)
    reduce = lambda pairs: [tf.py_function(burn, [x], x.dtype) for v, _ in pairs
                            for x in strategy.experimental_local_results(v)]
    _, times, cpu = bench_lib.time_reduction(strategy, grads, reduce, reps=3, warmup=2)
    self.assertLen(times, 3)
    self.assertBetween(cpu, 0.038, 0.08)

  def test_without_flag(self):
    self.assertEqual(bench_lib.without_flag(["--a", "1", "--b=2", "--c", "3"], "--a"),
                     ["--b=2", "--c", "3"])
    self.assertEqual(bench_lib.without_flag(["--a", "1", "--b=2"], "--b"), ["--a", "1"])


class TrainBenchTest(tf.test.TestCase):

  def test_both_sides_run_the_same_recipe_but_for_the_reduction(self):
    configs = {}
    for side in train_bench.SIDES:
      argv = train_bench.recipe_argv("resnet50", side, 2, 2, 24, 4, "/tmp/m",
                                     extra=["--compression=bf16"])
      fv = flags.FlagValues()
      recipe_flags.define_all(fv)
      fv(["main"] + argv)            # the recipe accepts what the tool passes
      cfg = recipe_flags.resolve(fv)
      configs[side] = {k: getattr(cfg, k) for k in (
          "model", "batch_size", "train_steps", "num_devices", "strategy", "dtype",
          "compression", "image_size", "cross_device_ops", "weight_update")}
    for side in train_bench.SIDES:
      self.assertEqual(configs[side].pop("weight_update"),
                       "sharded" if side == "sharded" else "replicated")
      self.assertEqual(configs[side].pop("cross_device_ops"),
                       "tf_fusion" if side == "sharded" else side)
    self.assertEqual(configs["tf"], configs["tf_fusion"])
    self.assertEqual(configs["sharded"], configs["tf_fusion"])
    self.assertEqual(configs["none"], configs["tf_fusion"])
    self.assertEqual(configs["tf"]["strategy"], "multi_worker")

  def test_the_bert_runs_are_the_bert_recipe(self):
    from official_recipes.bert import recipe_flags as bert_flags  # pylint: disable=g-import-not-at-top
    argv = train_bench.recipe_argv("bert_tiny", "tf", 1, 4, 48, 4, "/tmp/m")
    fv = flags.FlagValues()
    bert_flags.define_all(fv)
    fv(["main"] + argv)
    cfg = bert_flags.resolve(fv)
    self.assertEqual((cfg.model, cfg.batch_size, cfg.train_steps, cfg.num_devices,
                      cfg.cross_device_ops, cfg.checkpoint_steps), ("tiny", 64, 48, 4, "tf", 48))
    self.assertTrue(os.path.exists(os.path.join(cfg.data_dir, "meta.json")))

  def test_summarize_takes_medians_the_ratio_and_the_efficiency(self):
    runs = [dict(layout="1x4", model="m", side=side, images_per_sec=v)
            for side, v in [("tf_fusion", 110.0), ("tf", 100.0), ("tf", 80.0),
                            ("tf_fusion", 90.0), ("tf_fusion", 100.0), ("tf", 90.0),
                            ("none", 120.0), ("none", 125.0), ("none", 130.0),
                            ("sharded", 115.0), ("sharded", 105.0)]]
    (row,) = train_bench.summarize(runs)
    self.assertEqual((row["tf_fusion"]["median"], row["tf"]["median"]), (100.0, 90.0))
    self.assertAllClose(row["ratio"], 100.0 / 90.0)
    self.assertAllClose(row["sharded_ratio"], 110.0 / 100.0)
    self.assertAllClose(row["efficiency"], {"tf_fusion": 0.8, "sharded": 0.88, "tf": 0.72})

  def test_tf_communication_ops_are_found(self):
    ops = [("replica_1/CollectiveReduceV2:CollectiveReduceV2", 0.1, 0.2),
           ("gradient_tape/conv/Conv2DBackpropFilter:Conv2DBackpropFilter", 0.0, 0.15),
           ("send_1:_Send", 0.25, 0.3)]
    (step,) = profile_step.analyze(ops, [(0.0, 0.4)], profile_step.TF_COMMUNICATION)
    self.assertAllClose((step["communication"], step["overlap"], step["compute"]),
                        (0.15, 0.05, 0.15))


if __name__ == "__main__":
  tf.test.main()
