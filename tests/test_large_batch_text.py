"""A short version of tools/large_batch_text.py: its baseline learns the generated
language through the fused all-reduce, and its table says what the runs measured."""

import tempfile

import tensorflow as tf

from tests.harness import helpers
from tools import large_batch_text


class LargeBatchTextTest(tf.test.TestCase):

  def test_the_baseline_learns_the_generated_language(self):
    """AdamW at batch 32 on 2 replicas (FP16 wire), 512 steps: at least 25% of the
    masked tokens right. Predicting the most frequent word gets about 3% (the large-batch
    runs sit there until they leave the plateau); the full run reaches about 85%."""
    corpus = large_batch_text.Corpus()
    run = next(r for r in large_batch_text.default_runs() if r.name == "baseline")
    with tempfile.TemporaryDirectory() as tmp:
      data_dir = large_batch_text.write_corpus(corpus, tmp)
      result = large_batch_text.train(run, seed=0, data_dir=data_dir, corpus=corpus,
                                      sequences=512 * run.batch, evals=2,
                                      devices=helpers.devices(2))
    self.assertEqual(result["steps"], 512)
    self.assertLen(result["masked_accuracy"], 2)
    self.assertGreaterEqual(result["final_accuracy"], 0.25)

  def test_sequences_must_divide_into_evaluations(self):
    run = large_batch_text.Run("lamb", 1024, "lamb", 1e-2)
    with self.assertRaisesRegex(ValueError, "not a multiple of batch 1024 x 8"):
      large_batch_text.train(run, 0, "unused", large_batch_text.Corpus(), 1000, 8, [])

  def test_summary_rows_and_table(self):
    runs = large_batch_text.default_runs()
    results = [{"run": "baseline", "final_accuracy": a, "steps": 4096} for a in (0.8, 0.9)]
    results += [{"run": "lamb", "final_accuracy": 0.84, "steps": 128}]
    rows = large_batch_text.summarize(results, runs)
    self.assertEqual([r["run"] for r in rows], ["baseline", "lamb"])
    self.assertAllClose([rows[0]["mean"], rows[0]["std"], rows[0]["min"]], [0.85, 0.05, 0.8])
    self.assertEqual(rows[0]["lr"], 1e-3)
    self.assertEqual(runs[1].lr, 1e-3 * 1024 / 32)   # adamw_linear: the linear rule
    table = large_batch_text.format_table(rows)
    self.assertIn("| lamb | 1024 | lamb | 0.02 | 128 | 84.00 ± 0.00 (1) | -1.00 pp |", table)


if __name__ == "__main__":
  tf.test.main()
