"""ImageNet input: TFRecord shards, TFDS imagenet2012, or synthetic batches.

Training: random crop guided by the object box (Inception-style, area 8%-100%, aspect
3/4-4/3), decoded together with the crop (`decode_and_crop_jpeg` decodes only the window),
random flip, resize, normalise. Evaluation: the centre crop of side
image_size / (image_size + 32) of the shorter side, resized. Labels come out one-hot
(float32) so label smoothing works; images in the compute dtype.

Each input pipeline (one per worker under MultiWorkerMirroredStrategy) reads its own
files (`input_context`), or every n-th record when there are fewer files than
pipelines; each pipeline batches its replicas' share of the global batch. The next
batches are prefetched while the current step runs (Jia et al. 2018, technique 9).

Bad input fails before training with a ValueError that names it: a missing directory, a
pattern that matches no file, a file that is not TFRecord or not ImageNet-format.

References:
  Szegedy et al. 2015 (Inception crops); TF Model Garden
  official/legacy/image_classification/resnet/imagenet_preprocessing.py.
"""

import os

from absl import logging
import tensorflow as tf

from official_recipes import records

IMAGENET_TRAIN_EXAMPLES = 1281167
IMAGENET_EVAL_EXAMPLES = 50000
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_PADDING = 32
SPLITS = {True: "train", False: "validation"}
# Data sets up to this size are counted when their size is not given (seconds, not hours).
_COUNT_LIMIT_BYTES = 1 << 30

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
}


def tfrecord_files(data_dir, is_training):
  """The sorted shards of one split, checked to exist and to look like ImageNet.

  Raises:
    ValueError: naming the directory, the pattern or the file at fault.
  """
  if not data_dir or not tf.io.gfile.isdir(data_dir):
    raise ValueError(f"--data_dir {data_dir!r} is not a directory. Point it at ImageNet "
                     "TFRecord shards (train-00000-of-01024, ...); "
                     "tools/make_fake_imagenet.py writes a small set.")
  pattern = os.path.join(data_dir, f"{SPLITS[is_training]}-*")
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise ValueError(f"No file matches {pattern!r}: expected ImageNet TFRecord shards "
                     f"named {SPLITS[is_training]}-00000-of-NNNNN in --data_dir.")
  for path in _spread(files, 16):
    check_record(path)
  return files


def _spread(items, n):
  """Up to n items spread evenly over `items` (first and last included)."""
  if len(items) <= n:
    return list(items)
  return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def check_record(path):
  """Reads the first record of `path`; raises ValueError naming the file if it is
  not a TFRecord of ImageNet-format examples."""
  try:
    for record in tf.data.TFRecordDataset(path).take(1):
      tf.io.parse_single_example(record, _FEATURES)
      return
  except tf.errors.DataLossError as e:
    raise ValueError(f"{path} is not a readable TFRecord file (corrupt or truncated): "
                     f"{e.message}") from None
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f"{path} does not hold ImageNet-format tf.train.Examples "
                     f"(image/encoded, image/class/label, image/object/bbox/*): "
                     f"{e.message}") from None
  raise ValueError(f"{path} is empty: no records.")


def count_examples(files, is_training, skip_corrupt=False):
  """Examples in a split's `files`: counted when they are small, else ImageNet's size.
  With `skip_corrupt` they are always read (records.count_all): the log then names
  every damaged file before training."""
  total = sum(tf.io.gfile.stat(f).length for f in files)
  if total > _COUNT_LIMIT_BYTES and not skip_corrupt:
    n = IMAGENET_TRAIN_EXAMPLES if is_training else IMAGENET_EVAL_EXAMPLES
    logging.info("Assuming ImageNet's %d %s examples in %s... (pass --num_%s_examples "
                 "otherwise).", n, SPLITS[is_training], files[0],
                 "train" if is_training else "eval")
    return n
  return records.count_all(files, skip_corrupt)


def crop_window(shape, bbox, image_size, is_training):
  """[y, x, h, w] of the crop: box-guided random for training, padded centre for eval.

  Args:
    shape: [height, width, channels] of the image (int32).
    bbox: [1, N, 4] normalised (ymin, xmin, ymax, xmax) object boxes; N may be 0.
    image_size: output side, for the eval crop's padding.
    is_training: random (True) or centre (False).
  """
  height, width = shape[0], shape[1]
  if is_training:
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=bbox, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])
  side = tf.cast(image_size / (image_size + CROP_PADDING) *
                 tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def finish(image, image_size, is_training, dtype):
  """Flip (training), resize, normalise, cast."""
  if is_training:
    image = tf.image.random_flip_left_right(image)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear")
  image = (image - MEAN_RGB) / STDDEV_RGB
  return tf.cast(image, dtype)


def _one_hot(label0, num_classes):
  """One-hot float32 label; a label outside [0, num_classes) is an error, not zeros."""
  checks = [tf.debugging.assert_non_negative(label0, message="label < 1 in the data"),
            tf.debugging.assert_less(label0, tf.cast(num_classes, label0.dtype),
                                     message="label above --num_classes in the data")]
  with tf.control_dependencies(checks):
    return tf.one_hot(label0, num_classes, dtype=tf.float32)


def parse_tfrecord(record, image_size, num_classes, is_training, dtype):
  """One serialized ImageNet example -> (image [S, S, 3], one-hot label)."""
  ex = tf.io.parse_single_example(record, _FEATURES)
  box = tf.stack([tf.sparse.to_dense(ex[f"image/object/bbox/{k}"])
                  for k in ("ymin", "xmin", "ymax", "xmax")], axis=-1)[tf.newaxis]
  shape = tf.image.extract_jpeg_shape(ex["image/encoded"])
  window = crop_window(shape, box, image_size, is_training)
  image = tf.image.decode_and_crop_jpeg(ex["image/encoded"], window, channels=3)
  # ImageNet TFRecords number classes from 1 (0 was "background").
  label = _one_hot(ex["image/class/label"] - 1, num_classes)
  return finish(tf.cast(image, tf.float32), image_size, is_training, dtype), label


def parse_tfds(example, image_size, num_classes, is_training, dtype):
  """One TFDS imagenet2012 example (decoded uint8 image, 0-based label) -> same."""
  image = example["image"]
  window = crop_window(tf.shape(image), tf.zeros([1, 0, 4]), image_size, is_training)
  image = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])
  label = _one_hot(example["label"], num_classes)
  return finish(tf.cast(image, tf.float32), image_size, is_training, dtype), label


def tfrecord_dataset(files, is_training, batch_size, image_size, num_classes, dtype,
                     input_context=None, shuffle_buffer=10000, seed=None,
                     skip_corrupt=False):
  """Batches of one input pipeline from TFRecord `files`; training repeats forever.
  `skip_corrupt`: a damaged file is read up to the damage (records.reader)."""
  pipelines, index = _pipelines(input_context)
  ds = tf.data.Dataset.from_tensor_slices(files)
  shard_files = pipelines > 1 and len(files) >= pipelines
  if shard_files:
    ds = ds.shard(pipelines, index)
  if is_training:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat()
  ds = ds.interleave(records.reader(skip_corrupt), cycle_length=min(16, len(files)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=not is_training)
  if pipelines > 1 and not shard_files:
    ds = ds.shard(pipelines, index)
  if is_training:
    ds = ds.shuffle(shuffle_buffer, seed=seed)
  ds = ds.map(lambda r: parse_tfrecord(r, image_size, num_classes, is_training, dtype),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=not is_training)
  return _batch(ds, batch_size)


def tfds_dataset(tfds_data_dir, is_training, batch_size, image_size, num_classes, dtype,
                 input_context=None, manual_dir=None, shuffle_buffer=10000, seed=None):
  """Batches of one input pipeline from TFDS imagenet2012 (prepared from `manual_dir`,
  where ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar were put by hand)."""
  builder = _tfds_builder(tfds_data_dir, manual_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=seed)
  ds = builder.as_dataset(split=SPLITS[is_training], shuffle_files=is_training,
                          read_config=read_config)
  ds = ds.repeat()
  if is_training:
    ds = ds.shuffle(shuffle_buffer, seed=seed)
  ds = ds.map(lambda e: parse_tfds(e, image_size, num_classes, is_training, dtype),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=not is_training)
  return _batch(ds, batch_size)


def tfds_num_examples(tfds_data_dir, is_training, manual_dir=None):
  """Examples in a TFDS split (from its metadata, else by counting)."""
  builder = _tfds_builder(tfds_data_dir, manual_dir)
  split = builder.info.splits[SPLITS[is_training]] if builder.info.splits else None
  if split is not None and split.num_examples:
    return split.num_examples
  return int(builder.as_dataset(split=SPLITS[is_training]).cardinality())


def _tfds_builder(tfds_data_dir, manual_dir):
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("--tfds_data_dir needs tensorflow-datasets: pip install "
                     "'tf_fusion[tfds]'.") from None
  builder = tfds.builder("imagenet2012", data_dir=tfds_data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)
  return builder


def synthetic_dataset(batch_size, image_size, num_classes, dtype, seed=0):
  """One random batch, repeated: measures the step without input cost."""
  images = tf.random.stateless_normal([batch_size, image_size, image_size, 3],
                                      seed=[seed, 0], dtype=tf.float32)
  labels = tf.one_hot(tf.random.stateless_uniform([batch_size], [seed, 1], 0,
                                                  num_classes, tf.int32), num_classes)
  return tf.data.Dataset.from_tensors((tf.cast(images, dtype), labels)).repeat()


def _pipelines(input_context):
  if input_context is None:
    return 1, 0
  return input_context.num_input_pipelines, input_context.input_pipeline_id


def _batch(ds, batch_size):
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
