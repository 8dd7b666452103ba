"""The mark on a reduction that it carries an optimizer's gradients.

Inside a replica step only gradients ride the configured (16-bit) wire; every other
reduction there (SyncBatchNorm's moment sums, statistics) must stay exact. Whoever
reduces gradients (tf_fusion's Keras paths, its loss scaling) opens
`gradient_reduction()` around the call, and the cross-device ops ask
`reducing_gradients()` (through compression.may_compress).
"""

import contextlib
import threading

import tensorflow as tf


_gradient_reductions = [0]
_lock = threading.Lock()


@contextlib.contextmanager
def gradient_reduction():
  """Reductions made inside are an optimizer's gradients: they ride the configured
  wire. Counted process-wide, not per thread: under merge_call the reduction runs in
  another thread than the replica that asked for it, while every replica waits at
  the same call."""
  with _lock:
    _gradient_reductions[0] += 1
  try:
    yield
  finally:
    with _lock:
      _gradient_reductions[0] -= 1


def sum_gradients(grads):
  """Replica context: the SUM all-reduce of an optimizer's `grads` (None entries kept,
  not reduced), as gradients on the wire (`gradient_reduction`)."""
  present = [g for g in grads if g is not None]
  if not present:
    return list(grads)
  with gradient_reduction():
    reduced = iter(tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, present))
  return [None if g is None else next(reduced) for g in grads]


def reducing_gradients() -> bool:
  """Whether a `gradient_reduction` is open."""
  return _gradient_reductions[0] > 0
