"""Writes a small data set in ImageNet's TFRecord layout, so every recipe runs offline.

The layout is the one TensorFlow's `build_imagenet_data.py` (and TF Model Garden's
readers) use: shards named `train-00000-of-00008` and `validation-00000-of-00002`,
each a TFRecord file of `tf.train.Example`s with
  image/encoded (JPEG bytes), image/format, image/height, image/width, image/channels,
  image/colorspace, image/filename, image/class/label (1-based: 0 is "background"),
  image/class/synset, image/class/text, image/object/bbox/{xmin,ymin,xmax,ymax,label}.
Images are real JPEGs of varied sizes and aspect ratios. Each class has its own colour
and the object (a rectangle of the class's second colour, its box recorded in
image/object/bbox) sits at a random place, so a network can learn the classes in a few
hundred steps and random crops keep the label.

Usage:
  python -m tools.make_fake_imagenet --out_dir /tmp/fake_imagenet --num_train 1024 \
      --num_validation 256 --num_classes 10
  python -m official_recipes.imagenet.main --data_dir /tmp/fake_imagenet --num_classes 10 ...
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


def class_colours(num_classes, seed=0):
  """Two RGB colours per class (background tint, object), far apart in hue."""
  rng = np.random.default_rng(seed)
  hues = (np.arange(num_classes) + rng.uniform(0, 0.5, num_classes)) / num_classes
  def rgb(h, s, v):
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1),
                      np.stack([p, v, t], -1), np.stack([p, q, v], -1),
                      np.stack([t, p, v], -1), np.stack([v, p, q], -1)], 0)
    return table[i, np.arange(len(h))] * 255
  background = rgb(hues, np.full(num_classes, 0.35), np.full(num_classes, 0.85))
  obj = rgb((hues + 0.5) % 1.0, np.full(num_classes, 0.9), np.full(num_classes, 0.6))
  return background, obj


def fake_image(rng, label0, colours, min_size, max_size):
  """One uint8 HxWx3 image of class `label0` (0-based) and its object box (normalised)."""
  background, obj = colours
  h, w = rng.integers(min_size, max_size + 1, size=2)
  image = np.empty((h, w, 3), np.float32)
  image[:] = background[label0]
  image += rng.normal(0, 18, size=(h, w, 3))
  bh = int(rng.integers(max(2, h // 4), max(3, (3 * h) // 4)))
  bw = int(rng.integers(max(2, w // 4), max(3, (3 * w) // 4)))
  y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
  image[y0:y0 + bh, x0:x0 + bw] = obj[label0] + rng.normal(0, 18, size=(bh, bw, 3))
  box = (x0 / w, y0 / h, (x0 + bw) / w, (y0 + bh) / h)
  return np.clip(image, 0, 255).astype(np.uint8), box


def example(jpeg, height, width, label1, box, filename):
  """The tf.train.Example of ImageNet's TFRecord layout."""
  def b(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
  def i(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
  def f(v):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
  synset = b"n%08d" % label1
  feature = {
      "image/encoded": b(jpeg), "image/format": b(b"JPEG"),
      "image/height": i(height), "image/width": i(width), "image/channels": i(3),
      "image/colorspace": b(b"RGB"), "image/filename": b(filename.encode()),
      "image/class/label": i(label1), "image/class/synset": b(synset),
      "image/class/text": b(b"fake class %d" % label1),
      "image/object/bbox/xmin": f(box[0]), "image/object/bbox/ymin": f(box[1]),
      "image/object/bbox/xmax": f(box[2]), "image/object/bbox/ymax": f(box[3]),
      "image/object/bbox/label": i(label1),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature))


def write_split(out_dir, split, num_images, num_shards, num_classes, min_size, max_size,
                seed, log=print):
  """Writes `num_images` examples in `num_shards` shards; returns the file names."""
  if num_shards < 1 or num_images < num_shards:
    raise ValueError(f"{split}: need 1 <= shards <= images, got {num_shards} shards for "
                     f"{num_images} images.")
  rng = np.random.default_rng(seed)
  colours = class_colours(num_classes)
  labels = rng.permutation(np.arange(num_images) % num_classes)
  paths, start = [], time.time()
  for shard, chunk in enumerate(np.array_split(np.arange(num_images), num_shards)):
    path = os.path.join(out_dir, f"{split}-{shard:05d}-of-{num_shards:05d}")
    with tf.io.TFRecordWriter(path) as writer:
      for n in chunk:
        image, box = fake_image(rng, int(labels[n]), colours, min_size, max_size)
        jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
        name = f"{split}_{n:08d}.JPEG"
        writer.write(example(jpeg, image.shape[0], image.shape[1], int(labels[n]) + 1,
                             box, name).SerializeToString())
    paths.append(path)
    log(f"[make_fake_imagenet] {path}: {len(chunk)} images "
        f"({shard + 1}/{num_shards} shards of {split}, {time.time() - start:.1f} s)")
  return paths


def make(out_dir, num_train=1024, num_validation=256, num_classes=10, train_shards=8,
         validation_shards=2, min_size=48, max_size=160, seed=0, log=print):
  """Writes both splits; returns {"train": [...], "validation": [...]}."""
  if num_classes < 2 or min_size < 8 or max_size < min_size:
    raise ValueError(f"need num_classes >= 2 and 8 <= min_size <= max_size; got "
                     f"num_classes={num_classes}, min_size={min_size}, max_size={max_size}.")
  os.makedirs(out_dir, exist_ok=True)
  return {
      "train": write_split(out_dir, "train", num_train, train_shards, num_classes,
                           min_size, max_size, seed, log),
      "validation": write_split(out_dir, "validation", num_validation, validation_shards,
                                num_classes, min_size, max_size, seed + 1, log),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--num_train", type=int, default=1024)
  parser.add_argument("--num_validation", type=int, default=256)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--train_shards", type=int, default=8)
  parser.add_argument("--validation_shards", type=int, default=2)
  parser.add_argument("--min_size", type=int, default=48, help="smallest image side (px)")
  parser.add_argument("--max_size", type=int, default=160, help="largest image side (px)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    make(args.out_dir, args.num_train, args.num_validation, args.num_classes,
         args.train_shards, args.validation_shards, args.min_size, args.max_size, args.seed)
  except ValueError as e:
    parser.error(str(e))
  print(f"[make_fake_imagenet] done: pass --data_dir {args.out_dir} "
        f"--num_classes {args.num_classes} to official_recipes.imagenet.main")
  return 0


if __name__ == "__main__":
  sys.exit(main())
