"""tools/scaling_model.py: its limiting cases, its layer tables, and the paper."""

import dataclasses
import json
import math
import os

import numpy as np
import tensorflow as tf

from official_recipes.imagenet import models
from tools import scaling_model as sm

P40 = sm.HARDWARE["p40_roce"]


class LayersTest(tf.test.TestCase):

  def test_parameter_counts(self):
    # ResNet-50 v1.5 (torchvision's resnet50 has the same tensors): 25,557,032.
    self.assertEqual(sum(sum(l.tensors) for l in sm.resnet50_layers()), 25_557_032)
    self.assertLen([t for l in sm.resnet50_layers() for t in l.tensors], 161)
    # AlexNet-BN: the recipe's Keras model, tensor by tensor (forward order).
    model = models.build("alexnet_bn", 1000, 224)
    want = [int(np.prod(v.shape)) for v in model.trainable_variables]
    self.assertEqual([t for l in sm.alexnet_bn_layers() for t in l.tensors], want)

  def test_resnet50_forward_flops(self):
    # ~4.1 G multiply-adds per 224-pixel image (He et al. 2016, table 1).
    gflops = sum(l.flops for l in sm.resnet50_layers()) / 1e9
    self.assertBetween(gflops, 2 * 4.0, 2 * 4.2)


class LimitingCasesTest(tf.test.TestCase):

  def test_one_gpu_is_compute_time(self):
    for model in sm.MODELS:
      flops = sum(l.flops for l in sm.MODELS[model]())
      want = 3 * flops * 32 / (P40.peak_flops["fp16"] * P40.efficiency)
      step = sm.step_seconds(model, P40, 1, 32)
      self.assertAlmostEqual(step["total"], want, delta=want * 1e-12)
      self.assertEqual(step["communication"], 0.0)

  def test_infinite_bandwidth_leaves_latency_only(self):
    hw = dataclasses.replace(P40, intra_bw=math.inf, inter_bw=math.inf)
    for nbytes in (4, 1 << 20, 1 << 30):
      self.assertAlmostEqual(sm.allreduce_seconds("ring", nbytes, hw, 64),
                             2 * 63 * P40.inter_alpha)
      # 8 nodes of 8: 2 x 7 steps inside, 2 x 7 across.
      self.assertAlmostEqual(sm.allreduce_seconds("hierarchical", nbytes, hw, 64),
                             2 * 7 * P40.intra_alpha + 2 * 7 * P40.inter_alpha)

  def test_hierarchical_is_ring_with_one_gpu_per_node(self):
    hw = dataclasses.replace(P40, gpus_per_node=1)
    for gpus in (2, 16, 2048):
      for nbytes in (1 << 10, 100 << 20):
        self.assertAlmostEqual(sm.allreduce_seconds("hierarchical", nbytes, hw, gpus),
                               sm.allreduce_seconds("ring", nbytes, hw, gpus))

  def test_ring_bandwidth_term(self):
    hw = dataclasses.replace(P40, inter_alpha=0.0)
    # 2 (N-1)/N S / B: 100 MB over 4 nodes' links at 12.5 GB/s.
    self.assertAlmostEqual(sm.allreduce_seconds("ring", 100e6, hw, 32),
                           2 * 31 / 32 * 100e6 / 12.5e9)

  def test_auto_is_tf_fusions_pick(self):
    # tf_fusion's hybrid rule: the cheaper scheme, unless the ring is within 15% of it
    # (a near-tie goes to the ring). The two lines by hand, 256 P40s, 32 nodes of 8.
    def ring(s):
      return 2 * 255 * P40.inter_alpha + 2 * 255 / 256 * s / P40.inter_bw

    def hierarchical(s):
      return (2 * 7 * P40.intra_alpha + 2 * 7 / 8 * s / P40.intra_bw
              + 2 * 31 * P40.inter_alpha + 2 * 31 / 32 * s / P40.inter_bw)

    near_ties = 0
    for s in np.geomspace(1 << 10, 1 << 30, 200):
      want = ring(s) if ring(s) <= 1.15 * hierarchical(s) else hierarchical(s)
      near_ties += hierarchical(s) < ring(s) <= 1.15 * hierarchical(s)
      self.assertAlmostEqual(sm.allreduce_seconds("auto", s, P40, 256), want,
                             delta=want * 1e-12)
    self.assertGreater(near_ties, 0)    # the rule was exercised

  def test_packs_and_overlap(self):
    layers = sm.resnet50_layers()
    done = list(range(len(layers)))
    params = sum(sum(l.tensors) for l in layers)
    self.assertLen(sm.packs(layers, sm.PER_TENSOR, 4, done), 161)
    self.assertEqual(sm.packs(layers, 0, 2, done), [(2.0 * params, 0)])
    fused = sm.packs(layers, 8 << 20, 2, done)
    self.assertEqual(sum(b for b, _ in fused), 2 * params)
    self.assertTrue(all(b <= 8 << 20 for b, _ in fused[:-1]))
    for gpus in (64, 2048):
      config = sm.Config("auto", 8 << 20, True, True)
      hidden = sm.step_seconds("resnet50", P40, gpus, 32, config)
      serial = sm.step_seconds("resnet50", P40, gpus, 32,
                               dataclasses.replace(config, overlap=False))
      self.assertLessEqual(hidden["total"], serial["total"])
      self.assertAlmostEqual(serial["total"], serial["compute"] + serial["communication"])


class PaperTest(tf.test.TestCase):

  def test_reproduces_the_papers_times_and_the_direction_of_its_speedups(self):
    checks = sm.reproduce()
    times = [c for c in checks if "paper_minutes" in c]
    self.assertLen(times, 2)
    for c in times:
      self.assertLess(abs(c["error"]), 0.10, c)
    speedups = {c["run"].split(":")[0]: c["model_speedup"] for c in checks
                if "model_speedup" in c}
    self.assertGreater(speedups["resnet50"], speedups["alexnet_bn"])
    self.assertGreater(speedups["alexnet_bn"], 1.0)

  def test_fitted_efficiency_is_plausible(self):
    # A fraction of the datasheet's FLOPS, not an arbitrary knob.
    self.assertBetween(sm.P40_EFFICIENCY_FITTED, 0.1, 0.8)


class ScalingModelRunTest(tf.test.TestCase):

  def test_cli_with_a_machine_profile(self):
    out = self.create_tempdir().full_path
    sweep = self.create_tempfile(content=json.dumps({
        "workers": 2, "devices_per_worker": 2,
        "cost_model": {"alpha": {"ring": 3e-4}, "beta": {"ring": 1e-9}}})).full_path
    rows, checks = sm.main(["--models", "alexnet_bn", "--out_dir", out,
                            "--machine_json", sweep, "--machine_images_per_sec", "100"])
    machine = [r for r in rows if r["hardware"].startswith("this machine")]
    self.assertLen(machine, len(sm.GPU_COUNTS) * 4)
    # 4 replicas' ring of 3e-4 s per all-reduce = 6 steps of 5e-5 s.
    hw = sm.machine_profile(sweep, 100, "alexnet_bn")
    self.assertAlmostEqual(hw.intra_alpha, 5e-5)
    self.assertAlmostEqual(sm.allreduce_seconds("ring", 0, hw, 2) / hw.intra_alpha, 2.0)
    self.assertNotEmpty(checks)
    self.assertTrue(os.path.exists(os.path.join(out, "scaling_model.png")))


if __name__ == "__main__":
  tf.test.main()
