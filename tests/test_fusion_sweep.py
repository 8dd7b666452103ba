"""tools/fusion_sweep.py end to end (small), and the sweep's summary by hand."""

import json
import os

import tensorflow as tf

from tools import fusion_sweep


class SweepSummaryTest(tf.test.TestCase):

  def test_summary_by_hand(self):
    one, two = [["ring", [0, 1]]], [["ring", [0]], ["ring", [1]]]
    result = {"rows": [
        dict(algorithm="ring", pack_bytes=0, median_ms=30.0, plan=one),
        dict(algorithm="ring", pack_bytes=1 << 20, median_ms=20.0, plan=two),
        dict(algorithm="ring", pack_bytes=4 << 20, median_ms=25.0, plan=one),
        dict(algorithm="ring", pack_bytes=None, median_ms=21.0, plan=one,
             chosen_pack_bytes=4 << 20, chosen_first_pack_bytes=0)]}
    summary = fusion_sweep.summarize(result)["ring"]
    self.assertEqual((summary["best_pack_bytes"], summary["best_ms"]), (1 << 20, 20.0))
    self.assertAlmostEqual(summary["ratio"], 1.05)
    # The one-pack plan ran three times: 21, 25 and 30 ms.
    self.assertEqual(summary["same_plan_ms"], [21.0, 25.0, 30.0])
    self.assertAlmostEqual(summary["noise"], 30.0 / 21.0)


class SweepRunTest(tf.test.TestCase):

  def test_small_sweep_writes_table_json_and_png(self):
    out = self.create_tempdir().full_path
    report = fusion_sweep.main(["--sets", "alexnet_bn", "--algorithms", "reduce_to_one",
                                "--devices", "2", "--reps", "1", "--grid", "pow4",
                                "--out_dir", out])
    (result,) = report["results"]
    # One pack, 64 KiB ... 256 MiB by 4x, the model's and the measured autotuner's.
    self.assertLen(result["rows"], 10)
    summary = result["summary"]["reduce_to_one"]
    self.assertIn(summary["auto_pack_bytes"], (0,) + tuple(1 << s for s in range(16, 29)))
    self.assertIn(summary["measured_pack_bytes"],
                  (0,) + tuple(1 << s for s in range(16, 29)))
    self.assertGreater(summary["measured_ratio"], 0)
    self.assertGreater(summary["ratio"], 0)
    for name in ("sweep_1x2.json", "sweep_1x2.png", "cost_model_1x2.json"):
      self.assertTrue(os.path.exists(os.path.join(out, name)), name)
    with open(os.path.join(out, "sweep_1x2.json")) as f:
      self.assertEqual(json.load(f)["results"][0]["set"], "alexnet_bn")


if __name__ == "__main__":
  tf.test.main()
