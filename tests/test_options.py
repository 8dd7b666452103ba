"""FusionOptions: validation, strings for enums, environment variables."""

from absl.testing import parameterized
import tensorflow as tf

import tf_fusion


class FusionOptionsTest(tf.test.TestCase, parameterized.TestCase):

  def test_defaults(self):
    opts = tf_fusion.FusionOptions()
    self.assertEqual(opts.pack_bytes, 32 << 20)
    self.assertEqual(opts.first_pack_bytes, 1 << 20)
    self.assertEqual(opts.compression, "none")
    self.assertEqual(opts.algorithm, "auto")

  def test_names_are_case_insensitive(self):
    opts = tf_fusion.FusionOptions(compression="FP16", algorithm="Ring")
    self.assertEqual((opts.compression, opts.algorithm), ("fp16", "ring"))

  @parameterized.parameters(
      dict(kwargs=dict(pack_bytes=-1), message="pack_bytes must be >= 0"),
      dict(kwargs=dict(first_pack_bytes=-5), message="first_pack_bytes must be >= 0"),
      dict(kwargs=dict(pack_bytes=1.5), message="non-negative int"),
      dict(kwargs=dict(pack_bytes="32MB"), message="non-negative int"),
      dict(kwargs=dict(compression="int8"), message="valid values: none, fp16"),
      dict(kwargs=dict(algorithm="tree"),
           message="valid values: ring, hierarchical, reduce_to_one, auto"),
      dict(kwargs=dict(timeout_seconds=0), message="timeout_seconds"),
      dict(kwargs=dict(backward_seconds=-0.1), message="backward_seconds"),
      dict(kwargs=dict(backward_seconds=float("nan")), message="backward_seconds"),
      dict(kwargs=dict(cost_model_file=""), message="cost_model_file"),
      dict(kwargs=dict(autotune="bayes"), message="valid values: model, measure"),
  )
  def test_bad_values_name_the_value_and_the_valid_ones(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      tf_fusion.FusionOptions(**kwargs)

  def test_frozen(self):
    opts = tf_fusion.FusionOptions()
    with self.assertRaises(Exception):
      opts.pack_bytes = 1  # pytype: disable=not-writable
    self.assertEqual(opts.replace(pack_bytes=0).pack_bytes, 0)

  def test_from_env(self):
    env = {"TF_FUSION_PACK_BYTES": "4194304", "TF_FUSION_FIRST_PACK_BYTES": "0",
           "TF_FUSION_COMPRESSION": "fp16", "TF_FUSION_ALGORITHM": "reduce_to_one",
           "TF_FUSION_TIMEOUT_SECONDS": "30", "UNRELATED": "x"}
    opts = tf_fusion.FusionOptions.from_env(env)
    self.assertEqual(opts, tf_fusion.FusionOptions(
        pack_bytes=4 << 20, first_pack_bytes=0, compression="fp16",
        algorithm="reduce_to_one", timeout_seconds=30.0))
    self.assertIsNone(
        tf_fusion.FusionOptions.from_env({"TF_FUSION_PACK_BYTES": "auto"}).pack_bytes)
    auto = tf_fusion.FusionOptions.from_env({
        "TF_FUSION_COST_MODEL_FILE": "/tmp/cm.json", "TF_FUSION_BACKWARD_SECONDS": "0.12"})
    self.assertEqual((auto.cost_model_file, auto.backward_seconds), ("/tmp/cm.json", 0.12))
    self.assertEqual(tf_fusion.FusionOptions.from_env(
        env, compression="none").compression, "none")

  def test_from_env_refuses_units(self):
    with self.assertRaisesRegex(ValueError, "TF_FUSION_PACK_BYTES='64MB'"):
      tf_fusion.FusionOptions.from_env({"TF_FUSION_PACK_BYTES": "64MB"})


if __name__ == "__main__":
  tf.test.main()
