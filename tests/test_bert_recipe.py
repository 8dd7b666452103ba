"""The BERT recipe: the generated language, masking, a few steps of the tiny encoder on 4
logical CPUs with every feature on (its loss falls), resume, bad input, 2 workers x 2."""

import os

from absl import flags
from absl.testing import parameterized
import keras
import numpy as np
import tensorflow as tf

import tf_fusion
from official_recipes.bert import input_pipeline
from official_recipes.bert import main
from official_recipes.bert import model as bert_model
from official_recipes.bert import recipe_flags
from tests.harness import multi_worker
from tools import make_fake_text

VOCAB, LENGTH = 40, 16


def parse(argv):
  fv = flags.FlagValues()
  recipe_flags.define_all(fv)
  fv(["main"] + argv)
  return fv


def _read(files):
  out = []
  spec = {"input_ids": tf.io.FixedLenFeature([LENGTH], tf.int64),
          "segment_ids": tf.io.FixedLenFeature([LENGTH], tf.int64)}
  for record in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(record, spec)
    out.append((ex["input_ids"].numpy(), ex["segment_ids"].numpy()))
  return out


class CorpusTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "fake_text_corpus")
    cls.meta = make_fake_text.make(cls.data_dir, vocab_size=VOCAB, seq_length=LENGTH,
                                   num_train=64, num_validation=16, log=lambda _: None)

  def test_layout_and_the_chain(self):
    files = input_pipeline.tfrecord_files(self.data_dir, True)
    self.assertEqual([os.path.basename(f) for f in files],
                     ["train-00000-of-00002", "train-00001-of-00002"])
    table = make_fake_text.successors(VOCAB, 0)
    rows = _read(files)
    self.assertLen(rows, 64)
    for ids, segments in rows:
      self.assertEqual((ids[0], ids[-1]), (make_fake_text.CLS, make_fake_text.SEP))
      seps = np.flatnonzero(ids == make_fake_text.SEP)
      self.assertLen(seps, 2)
      self.assertAllEqual(segments, (np.arange(LENGTH) > seps[0]).astype(np.int64))
      words = ids[ids >= make_fake_text.FIRST_WORD]
      self.assertTrue(all(b in table[a - make_fake_text.FIRST_WORD]
                          for a, b in zip(words[:-1], words[1:])))

  def test_masking(self):
    ids = tf.constant(_read(input_pipeline.tfrecord_files(self.data_dir, True))[0][0],
                      tf.int32)
    counts = np.zeros(3)
    for seed in range(200):
      masked, positions, labels, weights = (t.numpy() for t in input_pipeline.mask(
          ids, self.meta, max_predictions=4, seed=seed))
      n = int(weights.sum())
      words = int((ids.numpy() >= make_fake_text.FIRST_WORD).sum())
      self.assertEqual(n, min(4, max(1, round(0.15 * words))))
      picked = positions[:n]
      self.assertLen(set(picked), n)
      self.assertTrue(all(ids.numpy()[p] >= make_fake_text.FIRST_WORD for p in picked))
      self.assertAllEqual(labels, ids.numpy()[positions])
      untouched = np.setdiff1d(np.arange(LENGTH), picked)
      self.assertAllEqual(masked[untouched], ids.numpy()[untouched])
      for p in picked:
        counts[0 if masked[p] == make_fake_text.MASK else
               2 if masked[p] == ids.numpy()[p] else 1] += 1
    share = counts / counts.sum()
    # 80% [MASK], 10% another word, 10% kept (a random word may equal the original).
    self.assertAllClose(share, [0.8, 0.1, 0.1], atol=0.06)

  def test_missing_corpus_is_named(self):
    with self.assertRaisesRegex(ValueError, "make_fake_text"):
      input_pipeline.read_meta("/nonexistent")


class ModelTest(tf.test.TestCase):

  def test_bert_base_has_the_papers_size(self):
    model = bert_model.build("bert_base")
    # Devlin et al. 2019: BERT-base, 110M parameters (12 layers, 768 hidden, 12 heads).
    self.assertEqual(model.count_params(), 109_514_298)
    self.assertEqual(model.word_embeddings.embeddings.shape, (30522, 768))

  def test_tied_embeddings_and_sparse_gradients(self):
    model = bert_model.build("tiny", VOCAB)
    ids = tf.constant(np.random.RandomState(0).randint(4, VOCAB, (2, LENGTH)), tf.int32)
    with tf.GradientTape() as tape:
      logits = model({"input_ids": ids, "segment_ids": tf.zeros_like(ids),
                      "masked_positions": tf.constant([[1, 2], [3, 4]])})
      loss = tf.reduce_sum(logits)
    grads = dict(zip([v.path for v in model.trainable_variables],
                     tape.gradient(loss, model.trainable_variables)))
    self.assertEqual(logits.shape, (2, 2, VOCAB))
    # The word table is also the output projection: one dense gradient.
    self.assertNotIsInstance(grads["bert/word_embeddings/embeddings"], tf.IndexedSlices)
    for name in ("position_embeddings", "segment_embeddings"):
      self.assertIsInstance(grads[f"bert/{name}/embeddings"], tf.IndexedSlices)
    self.assertNotIn("bert/mlm_output/kernel", grads)   # no separate output matrix


class RecipeTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "fake_text_recipe")
    make_fake_text.make(cls.data_dir, vocab_size=VOCAB, seq_length=LENGTH, num_train=512,
                        num_validation=64, log=lambda _: None)

  def _argv(self, **extra):
    # One algorithm: "auto" would calibrate its cost model in each fresh model_dir
    # (seconds of collectives per run); test_every_feature_on... asks for it.
    argv = {"data_dir": self.data_dir, "batch_size": 32, "train_steps": 4,
            "num_devices": 4, "model_dir": self.create_tempdir().full_path,
            "log_steps": 2, "seed": 1, "max_predictions": 3, "all_reduce_alg": "ring"}
    argv.update(extra)
    return [f"--{k}={v}" for k, v in argv.items()]

  def test_every_feature_on_and_the_loss_falls(self):
    # bf16 compute, the fp16 wire, measured fusion thresholds, the hybrid algorithm,
    # sparse gradients in the plan, LAMB with warm-up and decay.
    stats = main.run(parse(self._argv(
        train_steps=120, log_steps=20, checkpoint_steps=20, learning_rate=1e-2,
        dropout=0, dtype="bf16", compression="fp16", pack_bytes="auto",
        autotune="measure", all_reduce_alg="auto")))
    self.assertEqual((stats["final_step"], stats["updates"]), (120, 120))
    self.assertEqual(stats["num_replicas"], 4)
    losses = stats["logged_losses"]
    self.assertLen(losses, 6)
    # Each logged loss is one 20-step window's mean; the last is well below the first.
    self.assertLess(losses[-1], losses[0] - 0.2, losses)
    self.assertTrue(np.isfinite(stats["eval_loss"]))
    self.assertGreater(stats["sequences_per_sec"], 0)
    # The position and segment tables' IndexedSlices, gathered or densified.
    self.assertEqual(stats["gathered"] + stats["densified"], 2)
    with open(os.path.join(stats["model_dir"], "plan.txt")) as f:
      self.assertIn("float32", f.read())

  def test_dense_embedding_gradients_then_a_sharded_resume(self):
    """--sparse=dense densifies the position and segment tables' IndexedSlices (gather:
    test_two_workers); the run resumes under --weight_update=sharded, LAMB's state read
    from the backup into shards (sharded to sharded: the ImageNet recipe's test). Under
    the sharded update an embedding's rows are summed into its table, as any gradient."""
    model_dir = self.create_tempdir().full_path
    first = main.run(parse(self._argv(model_dir=model_dir, sparse="dense",
                                      checkpoint_steps=2, train_steps=2)))
    self.assertEqual((first["gathered"], first["densified"]), (0, 2))
    again = main.run(parse(self._argv(model_dir=model_dir, weight_update="sharded",
                                      checkpoint_steps=2, train_steps=4)))
    self.assertEqual(again["weight_update"], "sharded")
    with open(os.path.join(model_dir, "plan.txt")) as f:
      self.assertIn("sharded_in_graph", f.read())
    self.assertEqual((again["gathered"], again["densified"]), (0, 0))
    self.assertEqual((again["start_step"], again["final_step"]), (2, 4))
    self.assertTrue(np.isfinite(again["train_loss"]))

  def test_masked_lm_loss_divides_by_the_weights_not_the_slots(self):
    """Against NumPy on a batch with padding slots (weight 0); Keras's default
    reduction (the control) divides by every slot."""
    rng = np.random.RandomState(0)
    logits = rng.randn(3, 4, 7).astype(np.float32)
    labels = rng.randint(0, 7, size=(3, 4))
    weights = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    want = (ce * weights).sum() / weights.sum()
    self.assertAllClose(main.masked_lm_loss()(labels, logits, sample_weight=weights), want,
                        rtol=1e-6)
    diluted = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        labels, logits, sample_weight=weights)
    self.assertAllClose(diluted, (ce * weights).sum() / weights.size, rtol=1e-6)

  def test_a_corrupt_shard_is_one_line_naming_it(self):
    """A truncated training shard: found while training (the validation split is
    skipped), named with TensorFlow's offset; the run stops with a ValueError, not a
    traceback through Keras; a corrupt validation shard is named before training."""
    d = self.create_tempdir().full_path
    make_fake_text.make(d, vocab_size=VOCAB, seq_length=LENGTH, num_train=64,
                        num_validation=16, log=lambda _: None)
    train = sorted(f for f in os.listdir(d) if f.startswith("train-"))[-1]
    path = os.path.join(d, train)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 40])   # its last record cut short
    with self.assertRaisesRegex(ValueError, f"{train} is corrupt: truncated record at "
                                r"\d+.*; training stopped at step"):
      main.run(parse(self._argv(data_dir=d, skip_eval=True, train_steps=8)))
    with self.assertLogs("absl", "WARNING") as logs:   # skipped on request, and counted
      stats = main.run(parse(self._argv(data_dir=d, skip_eval=True, train_steps=8,
                                        skip_corrupt_records=True,
                                        model_dir=self.create_tempdir().full_path)))
    self.assertEqual(stats["final_step"], 8)
    self.assertRegex("\n".join(logs.output), f"{train} is corrupt \\(truncated record at "
                     r"\d+.*\): its first \d+ records are read(.|\n)*1 of \d+ files damaged")
    validation = sorted(f for f in os.listdir(d) if f.startswith("validation-"))[0]
    path = os.path.join(d, validation)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 40])
    with self.assertRaisesRegex(ValueError, f"{validation} is corrupt"):
      main.run(parse(self._argv(data_dir=d, train_steps=1)))

  def test_bad_input_is_named(self):
    with self.assertRaisesRegex(ValueError, "does not split over 4 replicas"):
      main.run(parse(self._argv(batch_size=30)))
    with self.assertRaisesRegex(ValueError, "exceeds the corpus's sequence length"):
      main.run(parse(self._argv(max_predictions=LENGTH + 1)))
    with self.assertRaises(flags.IllegalFlagValueError):
      parse(self._argv(warmup_proportion=1.5))

  def test_schedule_presets(self):
    cfg = recipe_flags.resolve(parse(["--data_dir=/x", "--model_dir=/y",
                                      "--schedule_preset=lamb_64k_phase1",
                                      "--learning_rate=1e-3"]))
    self.assertEqual((cfg.batch_size, cfg.train_steps, cfg.optimizer), (65536, 7038, "lamb"))
    self.assertEqual(cfg.learning_rate, 1e-3)   # given explicitly: wins over the preset
    phase2 = recipe_flags.resolve(parse(["--data_dir=/x", "--model_dir=/y",
                                         "--schedule_preset=lamb_32k_phase2"]))
    self.assertEqual((phase2.batch_size, phase2.predictions), (32768, 80))
    # You et al. 2019 train the two phases in 8,599 updates; these presets in 8,601.
    self.assertEqual(cfg.train_steps + phase2.train_steps, 8601)
    # NVIDIA's LAMB whole: its schedule, the ratio on every variable, the clip at 1.0.
    for c in (cfg, phase2):
      opt = main.make_optimizer(c, 1e-3)
      opt = getattr(opt, "inner_optimizer", opt)   # fp16: loss-scaled
      self.assertEqual(opt.get_config()["exclude_from_layer_adaptation"], [])
      self.assertEqual(opt.get_config()["exclude_from_weight_decay"],
                       list(tf_fusion.optimizers.lamb.DEFAULT_EXCLUSIONS))
      self.assertEqual(opt.global_clipnorm, 1.0)
      self.assertEqual((c.warmup_proportion, c.poly_power), (
          (0.2843, 0.5) if c is cfg else (0.128, 0.5)))

  def test_two_workers(self):
    model_dir = self.create_tempdir().full_path
    code, out = multi_worker.launch_script(
        ["-m", "official_recipes.bert.main", "--strategy=multi_worker",
         f"--data_dir={self.data_dir}", "--batch_size=16", "--train_steps=3",
         "--max_predictions=3", f"--model_dir={model_dir}", "--compression=fp16",
         "--sparse=gather", "--seed=1", "--log_steps=1", "--stall_seconds=0",
         "--all_reduce_alg=ring"],   # no calibration: test_multi_worker's kill-and-resume has it
        timeout=300)
    stats = multi_worker.launched_stats(code, out)
    for s in stats:
      self.assertEqual((s["num_replicas"], s["final_step"]), (4, 3))
      self.assertEqual(s["gathered"], 2)
      self.assertIn("sequences_per_sec", s)
    self.assertEqual(stats[0]["train_loss"], stats[1]["train_loss"])


if __name__ == "__main__":
  tf.test.main()
