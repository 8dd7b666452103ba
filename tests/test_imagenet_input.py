"""The fake-ImageNet writer, the input pipeline and the two models."""

import os

import keras
import numpy as np
import tensorflow as tf

from official_recipes.imagenet import input_pipeline
from official_recipes.imagenet import models
from tools import make_fake_imagenet

NUM_CLASSES = 5


def _fake(out_dir, **kwargs):
  args = dict(num_train=24, num_validation=8, num_classes=NUM_CLASSES, train_shards=4,
              validation_shards=2, min_size=40, max_size=90, log=lambda _: None)
  args.update(kwargs)
  return make_fake_imagenet.make(out_dir, **args)


def _records(files):
  return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]


class FakeImagenetTest(tf.test.TestCase):

  def test_writes_imagenet_layout_with_real_jpegs(self):
    out = self.create_tempdir().full_path
    files = _fake(out)
    self.assertEqual([os.path.basename(f) for f in files["validation"]],
                     ["validation-00000-of-00002", "validation-00001-of-00002"])
    self.assertLen(files["train"], 4)
    examples = _records(files["train"])
    self.assertLen(examples, 24)
    sizes, labels = set(), []
    for ex in examples:
      f = ex.features.feature
      image = tf.io.decode_jpeg(f["image/encoded"].bytes_list.value[0]).numpy()
      height, width = f["image/height"].int64_list.value[0], f["image/width"].int64_list.value[0]
      self.assertEqual(image.shape, (height, width, 3))
      self.assertBetween(height, 40, 90)
      sizes.add((height, width))
      labels.append(f["image/class/label"].int64_list.value[0])
      box = [f[f"image/object/bbox/{k}"].float_list.value[0]
             for k in ("xmin", "ymin", "xmax", "ymax")]
      self.assertTrue(0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1, box)
    self.assertGreater(len(sizes), 10)  # varied sizes
    self.assertEqual(sorted(set(labels)), list(range(1, NUM_CLASSES + 1)))  # 1-based


class InputPipelineTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.data_dir = os.path.join(tf.compat.v1.test.get_temp_dir(), "fake_imagenet_input")
    _fake(cls.data_dir)

  def _dataset(self, is_training, batch=4, **kwargs):
    files = input_pipeline.tfrecord_files(self.data_dir, is_training)
    return input_pipeline.tfrecord_dataset(files, is_training, batch, 32, NUM_CLASSES,
                                           tf.float32, seed=1, **kwargs)

  def test_training_batches(self):
    images, labels = next(iter(self._dataset(True)))
    self.assertEqual(images.shape, (4, 32, 32, 3))
    self.assertEqual(images.dtype, tf.float32)
    self.assertAllEqual(tf.reduce_sum(labels, 1), [1.0] * 4)
    # Normalised: roughly zero mean, unit scale (pixels are 0..255 before).
    self.assertBetween(float(tf.reduce_mean(images)), -2.0, 2.0)
    self.assertBetween(float(tf.math.reduce_std(images)), 0.05, 3.0)

  def test_eval_is_the_padded_centre_crop(self):
    files = input_pipeline.tfrecord_files(self.data_dir, False)
    ex = _records(files[:1])[0].features.feature
    jpeg = ex["image/encoded"].bytes_list.value[0]
    full = tf.io.decode_jpeg(jpeg).numpy().astype(np.float32)
    h, w = full.shape[:2]
    side = int(32 / (32 + 32) * min(h, w))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = full[top:top + side, left:left + side]
    want = (tf.image.resize(crop, [32, 32]).numpy() - np.array(input_pipeline.MEAN_RGB)) \
        / np.array(input_pipeline.STDDEV_RGB)
    images, labels = next(iter(self._dataset(False, batch=1)))
    # decode_and_crop_jpeg and decode-then-slice differ by JPEG rounding only (a little
    # more on the crop's edge pixels); a window off by a pixel differs everywhere.
    error = np.abs(images[0].numpy() - want)
    self.assertLess(error.mean(), 0.01)
    self.assertLess(error.max(), 0.2)
    label = ex["image/class/label"].int64_list.value[0]
    self.assertAllEqual(labels[0], np.eye(NUM_CLASSES)[label - 1])

  def test_each_pipeline_reads_its_own_files(self):
    files = input_pipeline.tfrecord_files(self.data_dir, True)
    seen = []
    for index in range(2):
      context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index)
      ds = input_pipeline.tfrecord_dataset(files, False, 1, 32, NUM_CLASSES, tf.float32,
                                           input_context=context)
      seen.append({tuple(np.round(im.numpy().ravel()[:20], 3))
                   for im, _ in ds.take(12)})
    self.assertEmpty(seen[0] & seen[1])

  def test_mixed_dtype_images(self):
    images, _ = next(iter(input_pipeline.synthetic_dataset(2, 32, NUM_CLASSES,
                                                           tf.bfloat16)))
    self.assertEqual(images.dtype, tf.bfloat16)
    self.assertEqual(images.shape, (2, 32, 32, 3))


class BadInputTest(tf.test.TestCase):

  def test_missing_dir(self):
    with self.assertRaisesRegex(ValueError, "/no/such/dir.*is not a directory"):
      input_pipeline.tfrecord_files("/no/such/dir", True)

  def test_empty_glob(self):
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(ValueError, "No file matches .*train-\\*"):
      input_pipeline.tfrecord_files(empty, True)

  def test_corrupt_record(self):
    d = self.create_tempdir()
    path = d.create_file("train-00000-of-00001", content="this is not a TFRecord at all")
    with self.assertRaisesRegex(ValueError, "train-00000-of-00001 is not a readable "
                                "TFRecord"):
      input_pipeline.tfrecord_files(d.full_path, True)
    del path

  def test_not_imagenet_examples(self):
    d = self.create_tempdir().full_path
    with tf.io.TFRecordWriter(os.path.join(d, "train-00000-of-00001")) as w:
      w.write(tf.train.Example().SerializeToString())
    with self.assertRaisesRegex(ValueError, "does not hold ImageNet-format"):
      input_pipeline.tfrecord_files(d, True)

  def test_label_above_num_classes(self):
    d = self.create_tempdir().full_path
    _fake(d)
    files = input_pipeline.tfrecord_files(d, False)
    ds = input_pipeline.tfrecord_dataset(files, False, 8, 32, NUM_CLASSES - 2, tf.float32)
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "above --num_classes"):
      next(iter(ds))

  def test_image_too_small_for_the_model(self):
    with self.assertRaisesRegex(ValueError, "alexnet_bn needs image_size >= 57"):
      models.build("alexnet_bn", 10, 48)
    with self.assertRaisesRegex(ValueError, "Unknown model 'vgg'; valid: alexnet_bn, "
                                "resnet50"):
      models.build("vgg", 10, 224)


class ModelsTest(tf.test.TestCase):

  def test_resnet50_v1_5(self):
    model = models.build("resnet50", 1000, 224)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    self.assertEqual(trainable, 25557032)  # torchvision resnet50 (v1.5), biases off
    last_bns = [l for l in model.layers if l.name.endswith("_bn3")]
    self.assertLen(last_bns, 16)
    for layer in last_bns:
      self.assertAllEqual(layer.gamma, np.zeros(layer.gamma.shape))
    # v1.5: the stride of a down-sampling block sits on its 3x3 conv.
    self.assertEqual(model.get_layer("stage2_block1_conv1").strides, (1, 1))
    self.assertEqual(model.get_layer("stage2_block1_conv2").strides, (2, 2))

  def test_alexnet_bn(self):
    model = models.build("alexnet_bn", 1000, 224)
    self.assertEqual(model.get_layer("pool5").output.shape[1:], (6, 6, 256))
    bns = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    self.assertEqual(bns, ["conv1_bn", "conv2_bn", "conv3_bn", "conv4_bn", "pool5_bn",
                           "fc6_bn", "fc7_bn"])
    # The classic AlexNet layer shapes: 9216 -> 4096 -> 4096 -> 1000.
    self.assertEqual(model.get_layer("fc6").kernel.shape, (9216, 4096))
    self.assertEqual(model.get_layer("logits").kernel.shape, (4096, 1000))

  def test_logits_are_float32_under_mixed_precision(self):
    previous = keras.mixed_precision.dtype_policy()
    try:
      for policy in ("mixed_float16", "mixed_bfloat16"):
        keras.mixed_precision.set_dtype_policy(policy)
        for name, size in (("resnet50", 32), ("alexnet_bn", 64)):
          model = models.build(name, 10, size)
          out = model(np.zeros((1, size, size, 3), np.float32))
          self.assertEqual(out.dtype, "float32", (name, policy))
          self.assertEqual(model.get_layer("conv1" if name == "alexnet_bn" else
                                           "stem_conv").compute_dtype, policy[6:])
    finally:
      keras.mixed_precision.set_dtype_policy(previous)


if __name__ == "__main__":
  tf.test.main()
