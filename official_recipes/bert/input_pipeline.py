"""Token-id TFRecords (tools/make_fake_text.py's layout) to masked-LM batches.

Masking is dynamic, as in RoBERTa and NVIDIA's BERT: every time a sequence is read,
15% of its word positions (at most `max_predictions`, at least one) are picked; of
those, 80% become [MASK], 10% a random word, 10% stay. The model predicts the original
tokens at the picked positions; unused prediction slots have weight 0.
"""

import json
import os

import tensorflow as tf

from official_recipes import records

MASK_RATE = 0.15


def read_meta(data_dir):
  """The corpus's meta.json (vocab_size, seq_length, special ids), checked."""
  path = os.path.join(data_dir or "", "meta.json")
  if not data_dir or not os.path.exists(path):
    raise ValueError(f"--data_dir={data_dir!r} has no meta.json: write a corpus with "
                     "python -m tools.make_fake_text --out_dir DIR, or give one in its "
                     "layout.")
  with open(path) as f:
    meta = json.load(f)
  missing = {"vocab_size", "seq_length", "mask_id", "first_word_id"} - set(meta)
  if missing:
    raise ValueError(f"{path} lacks {sorted(missing)}.")
  return meta


def tfrecord_files(data_dir, is_training):
  """The shards of the training or validation split; ValueError if there are none."""
  name = "train" if is_training else "validation"
  files = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{name}-*-of-*")))
  if not files:
    raise ValueError(f"No {name}-*-of-* shards under --data_dir={data_dir!r}.")
  return files


def count_examples(files, skip_corrupt=False):
  """Sequences in `files`; ValueError naming a corrupt or truncated file, or with
  `skip_corrupt` those before the damage (records.count_all)."""
  return records.count_all(files, skip_corrupt)


def mask(ids, meta, max_predictions, seed=None):
  """(masked ids, positions, original ids at positions, weights) of one sequence."""
  length = tf.shape(ids)[0]
  is_word = ids >= meta["first_word_id"]
  words = tf.reduce_sum(tf.cast(is_word, tf.int32))
  n = tf.clip_by_value(tf.cast(tf.round(MASK_RATE * tf.cast(words, tf.float32)), tf.int32),
                       1, max_predictions)
  scores = tf.where(is_word, tf.random.uniform([length], seed=seed), -1.0)
  positions = tf.math.top_k(scores, max_predictions).indices
  weights = tf.cast(tf.range(max_predictions) < n, tf.float32)
  labels = tf.gather(ids, positions)
  roll = tf.random.uniform([max_predictions], seed=seed)
  random_words = tf.random.uniform([max_predictions], meta["first_word_id"],
                                   meta["vocab_size"], dtype=ids.dtype, seed=seed)
  replaced = tf.where(roll < 0.8, tf.cast(meta["mask_id"], ids.dtype),
                      tf.where(roll < 0.9, random_words, labels))
  picked = tf.cast(weights, tf.bool)
  updates = tf.boolean_mask(replaced, picked)
  masked = tf.tensor_scatter_nd_update(ids, tf.boolean_mask(positions, picked)[:, None],
                                       updates)
  return masked, positions, labels, weights


def dataset(files, meta, batch_size, max_predictions, is_training, input_context=None,
            seed=None, skip_corrupt=False):
  """Batches of ({"input_ids", "segment_ids", "masked_positions"}, labels, weights)
  for one replica (`batch_size` per replica), sharded per input pipeline."""
  pipelines = input_context.num_input_pipelines if input_context else 1
  ds = tf.data.Dataset.from_tensor_slices(files)
  # Each worker reads its own files; with fewer files than workers, its own records
  # (an empty shard would give a worker batches of no sequences).
  by_file = len(files) >= pipelines
  if pipelines > 1 and by_file:
    ds = ds.shard(pipelines, input_context.input_pipeline_id)
  ds = ds.interleave(records.reader(skip_corrupt), cycle_length=max(1, min(4, len(files))),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if pipelines > 1 and not by_file:
    ds = ds.shard(pipelines, input_context.input_pipeline_id)
  length = meta["seq_length"]
  features = {"input_ids": tf.io.FixedLenFeature([length], tf.int64),
              "segment_ids": tf.io.FixedLenFeature([length], tf.int64)}

  def parse(record):
    ex = tf.io.parse_single_example(record, features)
    ids = tf.cast(ex["input_ids"], tf.int32)
    masked, positions, labels, weights = mask(ids, meta, max_predictions,
                                              seed=None if is_training else 7)
    x = {"input_ids": masked, "segment_ids": tf.cast(ex["segment_ids"], tf.int32),
         "masked_positions": positions}
    return x, labels, weights

  if is_training:
    ds = ds.shuffle(4 * batch_size, seed=seed).repeat()
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
