"""Reading TFRecord files, damaged ones included: a corrupt or truncated file is one
line naming it and where TensorFlow found the damage, or, with --skip_corrupt_records,
read up to the damage and the rest skipped, with a count in the log.

TensorFlow's reader cannot find the next record after damage (TFRecords have no sync
marks), so skipping means skipping the rest of that file: what tf.data's
`ignore_errors` does, applied per file so that the other files are read whole.
"""

import re
from typing import Sequence

from absl import logging
import tensorflow as tf


def reader(skip_corrupt: bool):
  """The per-file reader of the input pipelines' interleave."""
  if not skip_corrupt:
    return tf.data.TFRecordDataset
  return lambda path: tf.data.TFRecordDataset(path).ignore_errors(log_warning=True)


def _count(dataset) -> int:
  return int(dataset.reduce(0, lambda n, _: n + 1))


def count(path, skip_corrupt: bool = False) -> int:
  """Records in the TFRecord file `path`. A corrupt or truncated file: ValueError naming
  it and TensorFlow's offset, or with `skip_corrupt` the records before the damage
  (logged)."""
  try:
    return _count(tf.data.TFRecordDataset(path))
  except tf.errors.DataLossError as e:
    # "{{function_node ...}} corrupted record at 45030 [Op:ReduceDataset] name: ": the
    # words between TensorFlow's node name and its op name.
    what = re.sub(r"\{\{.*?\}\}\s*", "", e.message.splitlines()[0]).split(" [Op:")[0]
    if not skip_corrupt:
      raise ValueError(f"{path} is corrupt: {what}") from None
  kept = _count(reader(True)(path))
  logging.warning("--skip_corrupt_records: %s is corrupt (%s): its first %d records are "
                  "read, the rest of the file skipped.", path, what, kept)
  return kept


def count_all(files: Sequence[str], skip_corrupt: bool = False) -> int:
  """Records in every file of `files` (see `count`); with `skip_corrupt`, one line
  more saying how many files are damaged."""
  counts, damaged = [], []
  for path in files:
    try:
      counts.append(count(path))
    except ValueError:
      if not skip_corrupt:
        raise
      counts.append(count(path, skip_corrupt=True))
      damaged.append(path)
  if skip_corrupt:
    logging.warning("--skip_corrupt_records: %d of %d files damaged, %d records readable "
                    "in all%s.", len(damaged), len(files), sum(counts),
                    f" ({', '.join(damaged)})" if damaged else "")
  return sum(counts)
