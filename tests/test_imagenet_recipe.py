"""official_recipes.imagenet.main.run: a few steps of each model, each data source,
resume, bad input, presets."""

import json
import os
import re
import subprocess
import sys

from absl import flags
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from official_recipes.imagenet import main
from official_recipes.imagenet import recipe_flags
from tests.harness import multi_worker
from tools import make_fake_imagenet
from tools import profile_step

NUM_CLASSES = 6


def parse(argv):
  """A fresh FlagValues of the recipe, parsed from argv (no global state)."""
  fv = flags.FlagValues()
  recipe_flags.define_all(fv)
  fv(["main"] + argv)
  return fv


class RecipeTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "fake_imagenet_recipe")
    make_fake_imagenet.make(cls.data_dir, num_train=64, num_validation=16,
                            num_classes=NUM_CLASSES, train_shards=4, validation_shards=2,
                            min_size=40, max_size=100, log=lambda _: None)

  def _argv(self, model="alexnet_bn", **extra):
    argv = {"model": model, "image_size": 64 if model == "alexnet_bn" else 32,
            "num_classes": NUM_CLASSES, "batch_size": 8, "train_steps": 2,
            "warmup_epochs": 0, "num_devices": 2, "all_reduce_alg": "ring",
            "model_dir": self.create_tempdir().full_path, "log_steps": 1, "seed": 1}
    argv.update(extra)
    if "tfds_data_dir" not in argv and "synthetic" not in argv:
      argv.setdefault("data_dir", self.data_dir)
    return [f"--{k}={v}" for k, v in argv.items()]

  def _check(self, stats, steps=2):
    self.assertEqual(stats["final_step"], steps)
    self.assertEqual(stats["num_replicas"], 2)
    for key in ("train_loss", "eval_loss", "eval_top_1", "eval_top_5"):
      self.assertTrue(np.isfinite(stats[key]), (key, stats[key]))
    # Top-5 of 6 classes counts more than top-1.
    self.assertGreaterEqual(stats["eval_top_5"], stats["eval_top_1"])
    self.assertNotEmpty(stats["packs"])
    self.assertTrue(all(p["algorithm"] in ("ring", "reduce_to_one")
                        for p in stats["packs"]))

  # ResNet-50 once (~60 s a run here), under fp16 and its loss scaling (the networks
  # themselves, in every policy, are checked in tests/test_imagenet_input.py); AlexNet-BN
  # in fp32 (bf16: test_synthetic_with_profile).
  @parameterized.parameters(("resnet50", "fp16"), ("alexnet_bn", "fp32"))
  def test_fake_tfrecords(self, model, dtype):
    stats = main.run(parse(self._argv(model, dtype=dtype, compression="fp16")))
    self._check(stats)
    self.assertEqual(stats["loss_scale"] is not None, dtype == "fp16")
    logs = os.listdir(stats["model_dir"])
    self.assertContainsSubset(["train", "validation", "steps", "backup"], logs)

  def test_tfds_mock_data(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=16):
      stats = main.run(parse(self._argv(tfds_data_dir=self.create_tempdir().full_path,
                                        num_classes=1000)))
    self._check(stats)

  def test_accumulation_and_steps_per_execution(self):
    # 4 batches, 2 per update, 2 steps per call.
    argv = dict(synthetic=True, num_train_examples=32, num_eval_examples=16,
                train_steps=4, accumulation_steps=2, all_reduce_alg="reduce_to_one")
    stats = main.run(parse(self._argv(steps_per_execution=2, **argv)))
    self._check(stats, steps=4)
    self.assertEqual((stats["updates"], stats["accumulation_steps"]), (2, 2))
    with self.assertRaisesRegex(ValueError, "--steps_per_execution=3 must divide"):
      main.run(parse(self._argv(steps_per_execution=3, **argv)))

  def test_quick_run_with_the_default_warm_up_and_a_short_evaluation(self):
    # 5 warm-up epochs by default: longer than 3 steps, so shortened (and logged).
    # Synthetic data and no --num_eval_examples: 3 eval steps (as many as training's),
    # not 50,000 images, and the evaluation says how long it is and how far it got.
    argv = [a for a in self._argv(synthetic=True, num_train_examples=64, train_steps=3)
            if not a.startswith("--warmup_epochs")]
    with self.assertLogs("absl", "INFO") as logs:
      stats = main.run(parse(argv))
    self._check(stats, steps=3)
    self.assertEqual(stats["eval_steps"], 3)
    # 3 windows of one step: the two after the first give a CPU time per step.
    self.assertGreater(stats["cpu_seconds_per_step"], 0.0)
    said = "\n".join(logs.output)
    self.assertIn("evaluating: 3 steps, 24 images", said)
    self.assertRegex(said, r"eval step 3/3: [\d.]+ images/s, 0 s left")
    self.assertEqual(stats["fit_epochs"], [0, 1])   # Keras shows "Epoch 1/1"
    # The plan is a table in a file, not a log line; the full stats sit beside it.
    with open(os.path.join(stats["model_dir"], "plan.txt")) as f:
      self.assertLen(f.read().splitlines(), len(stats["packs"]) + 2)   # header, total
    with open(os.path.join(stats["model_dir"], "stats.json")) as f:
      self.assertEqual(json.load(f)["final_step"], 3)

  def test_tf_baseline_on_one_host(self):
    """--cross_device_ops=tf: TensorFlow's MirroredStrategy reduces, on the same devices;
    the stats work without a tf_fusion plan."""
    stats = main.run(parse(self._argv(synthetic=True, num_train_examples=64,
                                      num_eval_examples=16, cross_device_ops="tf")))
    self.assertEqual((stats["final_step"], stats["num_replicas"]), (2, 2))
    self.assertEqual((stats["cross_device_ops"], stats["packs"]), ("tf", []))
    self.assertTrue(np.isfinite(stats["eval_loss"]))
    with self.assertRaisesRegex(ValueError, "accumulation_steps > 1 fails under"):
      main.run(parse(self._argv(synthetic=True, cross_device_ops="tf",
                                accumulation_steps=2)))

  def test_bad_input_on_the_command_line_is_one_line_not_a_traceback(self):
    proc = subprocess.run(
        [sys.executable, "-m", "official_recipes.imagenet.main", "--data_dir=/nonexistent",
         f"--model_dir={self.create_tempdir().full_path}", "--train_steps=1"],
        capture_output=True, text=True, timeout=120, cwd=multi_worker.ROOT)
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertIn("error: ", proc.stderr)
    self.assertIn("/nonexistent", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)

  def test_synthetic_with_profile(self):
    stats = main.run(parse(self._argv(synthetic=True, num_train_examples=64,
                                      num_eval_examples=16, dtype="bf16",
                                      profile_steps="2,2")))
    self._check(stats)
    traces = tf.io.gfile.glob(os.path.join(stats["model_dir"], "plugins", "profile",
                                           "*", "*.xplane.pb"))
    self.assertLen(traces, 1)
    # tools/profile_step.py finds the profiled step and the packs of the plan in it.
    ops, steps = profile_step.read_trace(traces[0])
    self.assertLen(steps, 1)
    (summary,) = profile_step.analyze(ops, steps)
    scopes = {f"tf_fusion_pack_{p['index']:03d}_{p['algorithm']}_{p['wire_bytes']}B"
              for p in stats["packs"]}
    self.assertNotEmpty(summary["packs"])
    self.assertContainsSubset(summary["packs"], scopes)
    self.assertGreater(summary["compute"], 0)
    # The parts agree with each other: overlap is time both ran, within each of them.
    self.assertGreater(summary["communication"], 0)
    self.assertLessEqual(summary["overlap"], min(summary["compute"],
                                                 summary["communication"]) + 1e-9)
    self.assertLessEqual(summary["communication"], summary["step"] + 1e-9)
    self.assertAlmostEqual(summary["overlap_fraction"],
                           summary["overlap"] / summary["communication"])
    # Time in flight: the ring's packs, from their data to their results, without the
    # instance-key ops (their own scope) that run at the start of the step.
    self.assertTrue(any(profile_step.INSTANCE_KEY.search(name) for name, _, _ in ops))
    self.assertGreater(summary["in_flight"], 0)
    self.assertLessEqual(summary["in_flight"], summary["step"] + 1e-9)
    self.assertAlmostEqual(summary["exposed"] + summary["in_flight_overlap"],
                           summary["in_flight"])

  def test_resume_continues_the_step_count(self):
    model_dir = self.create_tempdir().full_path
    first = main.run(parse(self._argv(model_dir=model_dir, train_steps=3,
                                      pack_bytes="auto")))
    self.assertEqual((first["start_step"], first["final_step"]), (0, 3))
    # The autotuner's cost model is kept with the run.
    self.assertIn("1 worker(s) x 2 CPU device(s)",
                  json.load(open(os.path.join(model_dir, "cost_model.json")))["topology"])
    second = main.run(parse(self._argv(model_dir=model_dir, train_steps=5)))
    self.assertEqual((second["start_step"], second["final_step"]), (3, 5))
    # 8 steps per epoch: the first run ended in epoch 1 of 1, the second is epoch 2 of 2.
    self.assertEqual((first["fit_epochs"], second["fit_epochs"]), ([0, 1], [1, 2]))
    # Already there: nothing to train, evaluation only.
    third = main.run(parse(self._argv(model_dir=model_dir, train_steps=5)))
    self.assertEqual((third["start_step"], third["final_step"]), (5, 5))
    # The batch-norm statistics were averaged over the replicas before the evaluation
    # and the checkpoint: the restored model evaluates as the trained one did.
    self.assertAllClose(third["eval_loss"], second["eval_loss"], rtol=1e-5)
    self.assertAllClose(third["eval_top_5"], second["eval_top_5"], rtol=1e-6)

  def test_sharded_update_trains_and_resumes(self):
    """--weight_update=sharded with LARS and fp16 (loss scaling): trains, and a
    resumed run continues from the backup (the sharded state saved whole)."""
    model_dir = self.create_tempdir().full_path
    argv = dict(model_dir=model_dir, weight_update="sharded", dtype="fp16",
                optimizer="lars")
    first = main.run(parse(self._argv(train_steps=3, **argv)))
    self.assertEqual(first["weight_update"], "sharded")
    self.assertEqual({p["algorithm"] for p in first["packs"]}, {"sharded_in_graph"})
    second = main.run(parse(self._argv(train_steps=5, **argv)))
    self.assertEqual((second["start_step"], second["final_step"]), (3, 5))
    self.assertTrue(np.isfinite(second["train_loss"]))

  def test_bad_input_names_it(self):
    cases = [
        ({"data_dir": "/no/such/imagenet"}, "'/no/such/imagenet' is not a directory"),
        ({"data_dir": self.create_tempdir().full_path}, "No file matches"),
        ({"batch_size": 6, "num_devices": 4}, "does not split over 4 replicas"),
        ({"batch_size": 128}, "fewer than one global batch"),
        ({"train_steps": 4, "warmup_epochs": 1}, "--warmup_epochs=1.0 is 8 steps"),
    ]
    for extra, message in cases:
      with self.subTest(message), self.assertRaisesRegex(ValueError, message):
        main.run(parse(self._argv(**extra)))

  def test_corrupt_record_during_training(self):
    d = self.create_tempdir().full_path
    make_fake_imagenet.make(d, num_train=16, num_validation=8, num_classes=NUM_CLASSES,
                            train_shards=1, validation_shards=1, log=lambda _: None)
    path = os.path.join(d, "train-00000-of-00001")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64   # the first record is fine
    open(path, "wb").write(bytes(data))
    # Found while counting the examples, naming the file...
    with self.assertRaisesRegex(ValueError, "train-00000-of-00001 is corrupt"):
      main.run(parse(self._argv(data_dir=d, train_steps=4)))
    # ... or, when the size is given, while training: the checkpoint is kept.
    model_dir = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, r"train-00000-of-00001 is corrupt: corrupted "
                                r"record at \d+; training stopped at step \d+, "
                                "checkpoint kept in"):
      main.run(parse(self._argv(data_dir=d, train_steps=4, num_train_examples=16,
                                model_dir=model_dir)))
    # --skip_corrupt_records: trained on the records before the damage, the damage
    # named and counted in the log.
    with self.assertLogs("absl", "WARNING") as logs:
      stats = main.run(parse(self._argv(data_dir=d, train_steps=4, skip_corrupt_records=True,
                                        batch_size=4,
                                        model_dir=self.create_tempdir().full_path)))
    self.assertEqual(stats["final_step"], 4)
    log = "\n".join(logs.output)
    self.assertRegex(log, r"train-00000-of-00001 is corrupt \(corrupted record at \d+\): "
                     r"its first \d+ records are read")
    kept = int(re.search(r"1 of 1 files damaged, (\d+) records readable", log).group(1))
    self.assertTrue(0 < kept < 16, kept)


class MultiWorkerRecipeTest(tf.test.TestCase):
  """The recipe on 2 worker processes x 2 logical CPUs, through the launcher. (TF's own
  reduction across workers, --cross_device_ops=tf: test_cluster's TFJob.)"""

  def test_two_workers(self):
    tmp = self.create_tempdir().full_path
    data_dir = os.path.join(tmp, "data")
    make_fake_imagenet.make(data_dir, num_train=64, num_validation=16,
                            num_classes=NUM_CLASSES, train_shards=4, validation_shards=2,
                            log=lambda _: None)
    model_dir = os.path.join(tmp, "model")
    code, out = multi_worker.launch_script(
        ["-m", "official_recipes.imagenet.main", "--strategy=multi_worker",
         "--model=alexnet_bn", "--image_size=64", f"--data_dir={data_dir}",
         f"--num_classes={NUM_CLASSES}", "--batch_size=16", "--train_steps=3",
         "--warmup_epochs=0", f"--model_dir={model_dir}", "--compression=fp16",
         "--seed=1",
         # One algorithm: "auto" would calibrate across the workers first (~20-40 s);
         # test_multi_worker.py's kill-and-resume keeps that path.
         "--all_reduce_alg=ring"],
        timeout=300)
    stats = multi_worker.launched_stats(code, out)
    for s in stats:
      self.assertEqual((s["num_replicas"], s["final_step"]), (4, 3))
      self.assertEqual(s["cross_device_ops"], "tf_fusion")
      with open(os.path.join(s["model_dir"], "stats.json")) as f:
        self.assertNotEmpty(json.load(f)["packs"])
    # Same all-reduced model on both workers; each wrote its own logs and checkpoint.
    self.assertEqual(stats[0]["train_loss"], stats[1]["train_loss"])
    self.assertEqual(stats[1]["model_dir"], os.path.join(model_dir, "worker1"))
    for d in (model_dir, stats[1]["model_dir"]):
      self.assertTrue(os.path.exists(os.path.join(d, "backup", "latest.weights.h5")), d)


class FlagsTest(tf.test.TestCase):

  def test_presets_carry_the_papers_values(self):
    # Jia et al. 2018: 64K batch, LARS eta 0.001, momentum 0.9, poly(2), FP16 compute and
    # wire; ResNet-50 90 epochs, AlexNet-BN 95 epochs.
    for preset, model, epochs in (("jia2018_resnet50_64k", "resnet50", 90),
                                  ("jia2018_alexnet_bn_64k", "alexnet_bn", 95)):
      cfg = recipe_flags.resolve(parse([f"--schedule_preset={preset}", "--synthetic",
                                        "--model_dir=/tmp/x"]))
      self.assertEqual((cfg.model, cfg.batch_size, cfg.epochs), (model, 65536, epochs))
      self.assertEqual((cfg.optimizer, cfg.lars_eta, cfg.momentum, cfg.poly_power),
                       ("lars", 0.001, 0.9, 2.0))
      self.assertEqual((cfg.dtype, cfg.compression), ("fp16", "fp16"))

  def test_pack_bytes_auto_or_bytes(self):
    for text, want in (("auto", None), ("AUTO", None), ("0", 0), ("4194304", 4 << 20)):
      cfg = recipe_flags.resolve(parse(["--synthetic", "--model_dir=/tmp/x",
                                        f"--pack_bytes={text}"]))
      self.assertEqual(cfg.pack_bytes, want)

  def test_explicit_flags_beat_the_preset(self):
    cfg = recipe_flags.resolve(parse(["--schedule_preset=jia2018_resnet50_64k", "--synthetic",
                                      "--model_dir=/tmp/x", "--batch_size=1024"]))
    self.assertEqual((cfg.batch_size, cfg.epochs), (1024, 90))

  def test_validators(self):
    base = ["--synthetic", "--model_dir=/tmp/x"]
    cases = [
        (["--model_dir=/tmp/x"], "exactly one of --data_dir"),
        (base + ["--data_dir=/d"], "exactly one of --data_dir"),
        (base + ["--model=alexnet_bn", "--image_size=48"], "alexnet_bn needs >= 57"),
        (base + ["--image_size=16"], "resnet50 needs >= 32"),
        (base + ["--epochs=2", "--train_steps=3"], "not both"),
        (base + ["--batch_size=0"], "--batch_size must be > 0"),
        (base + ["--loss_scale=big"], "'dynamic' or a number"),
        (base + ["--profile_steps=5,2"], "first,last"),
        (base + ["--label_smoothing=1.5"], r"\[0, 1\)"),
        (base + ["--schedule_preset=jia2018_alexnet_bn_64k", "--model=resnet50"],
         "another --model"),
        (["--synthetic"], "model_dir"),
        (base + ["--pack_bytes=64MB"], "whole number of bytes >= 0, or auto"),
        (base + ["--backward_seconds=-1"], "--backward_seconds must be >= 0"),
        (base + ["--deterministic"], "--deterministic needs --seed"),
    ]
    for argv, message in cases:
      with self.subTest(argv=argv), self.assertRaisesRegex(flags.Error, message):
        parse(argv)


if __name__ == "__main__":
  tf.test.main()
