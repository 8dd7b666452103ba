"""Writes a small corpus of token-id TFRecords from a generated, learnable language, so
the BERT recipe runs offline.

The language is a Markov chain over the vocabulary's word tokens: each word has a few
likely successors (probabilities 0.55, 0.25, 0.12, 0.08), so a masked word is well
predicted from its neighbours and a model's masked-token accuracy climbs well above
chance (1 / vocabulary) in a few hundred steps. Each sequence is
`[CLS] sentence A [SEP] sentence B [SEP]`, A and B halves of one walk of the chain.
Token ids 0-3 are [PAD], [CLS], [SEP], [MASK]; words are 4..vocab_size-1.

Layout: shards `train-00000-of-0000N` and `validation-00000-of-0000M`, each a TFRecord
file of `tf.train.Example`s with `input_ids` and `segment_ids` (int64, seq_length each),
and `meta.json` (vocab_size, seq_length, counts, the special ids).

Usage:
  python -m tools.make_fake_text --out_dir /tmp/fake_text
  python -m official_recipes.bert.main --model=tiny --data_dir=/tmp/fake_text ...
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_WORD = 4
SUCCESSOR_PROBS = (0.55, 0.25, 0.12, 0.08)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out_dir", required=True)
  p.add_argument("--vocab_size", type=int, default=512, help="tokens, the 4 special included")
  p.add_argument("--seq_length", type=int, default=32)
  p.add_argument("--num_train", type=int, default=4096)
  p.add_argument("--num_validation", type=int, default=512)
  p.add_argument("--train_shards", type=int, default=2)
  p.add_argument("--validation_shards", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.vocab_size < FIRST_WORD + len(SUCCESSOR_PROBS):
    p.error(f"--vocab_size must be >= {FIRST_WORD + len(SUCCESSOR_PROBS)}")
  if args.seq_length < 5:
    p.error("--seq_length must be >= 5 ([CLS], a word, [SEP], a word, [SEP])")
  if min(args.num_train, args.num_validation, args.train_shards,
         args.validation_shards) < 1:
    p.error("--num_train, --num_validation and the shard counts must be >= 1")
  return args


def successors(vocab_size, seed):
  """(words, len(SUCCESSOR_PROBS)) array: each word's likely next words."""
  rng = np.random.default_rng(seed)
  words = vocab_size - FIRST_WORD
  return FIRST_WORD + np.stack([rng.choice(words, len(SUCCESSOR_PROBS), replace=False)
                                for _ in range(words)])


def sequences(n, vocab_size, seq_length, table, rng):
  """(input_ids, segment_ids), each (n, seq_length) int64, from walks of the chain."""
  words = seq_length - 3
  first = words // 2
  ids = np.zeros((n, seq_length), np.int64)
  segments = np.zeros((n, seq_length), np.int64)
  for i in range(n):
    walk = [rng.integers(FIRST_WORD, vocab_size)]
    for _ in range(words - 1):
      walk.append(table[walk[-1] - FIRST_WORD][rng.choice(len(SUCCESSOR_PROBS),
                                                          p=SUCCESSOR_PROBS)])
    ids[i] = [CLS] + walk[:first] + [SEP] + walk[first:] + [SEP]
    segments[i, first + 2:] = 1
  return ids, segments


def _example(ids, segments):
  feature = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))
  return tf.train.Example(features=tf.train.Features(feature={
      "input_ids": feature(ids), "segment_ids": feature(segments)})).SerializeToString()


def write_split(out_dir, name, n, shards, vocab_size, seq_length, table, rng, log):
  ids, segments = sequences(n, vocab_size, seq_length, table, rng)
  for s in range(shards):
    path = os.path.join(out_dir, f"{name}-{s:05d}-of-{shards:05d}")
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
      for i in range(s, n, shards):
        writer.write(_example(ids[i], segments[i]))
    os.replace(path + ".tmp", path)   # no half-written shard under the final name
  log(f"{name}: {n} sequences in {shards} shard(s)")


def make(out_dir, vocab_size=512, seq_length=32, num_train=4096, num_validation=512,
         train_shards=2, validation_shards=1, seed=0, log=print):
  """Writes the corpus to `out_dir` (see the module's docstring); returns its meta."""
  os.makedirs(out_dir, exist_ok=True)
  table = successors(vocab_size, seed)
  rng = np.random.default_rng(seed + 1)
  write_split(out_dir, "train", num_train, train_shards, vocab_size, seq_length, table,
              rng, log)
  write_split(out_dir, "validation", num_validation, validation_shards, vocab_size,
              seq_length, table, rng, log)
  meta = {"vocab_size": vocab_size, "seq_length": seq_length, "num_train": num_train,
          "num_validation": num_validation, "pad_id": PAD, "cls_id": CLS, "sep_id": SEP,
          "mask_id": MASK, "first_word_id": FIRST_WORD, "seed": seed}
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def main(argv=None):
  args = parse_args(argv)
  make(args.out_dir, args.vocab_size, args.seq_length, args.num_train, args.num_validation,
       args.train_shards, args.validation_shards, args.seed,
       log=lambda line: print(line, flush=True))
  print(f"wrote {args.out_dir}; train with python -m official_recipes.bert.main "
        f"--data_dir {args.out_dir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
