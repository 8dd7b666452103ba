"""Strategies wired to the fused all-reduce path."""

from typing import Optional, Sequence

import tensorflow as tf

from tf_fusion.cross_device_ops import FusedAllReduce
from tf_fusion.options import FusionOptions


def mirrored_strategy(devices: Optional[Sequence[str]] = None,
                      options: Optional[FusionOptions] = None,
                      cost_model=None) -> tf.distribute.MirroredStrategy:
  """A MirroredStrategy over `devices` whose reductions go through FusedAllReduce.

  Example:
    >>> strategy = tf_fusion.mirrored_strategy(options=tf_fusion.FusionOptions())
    >>> with strategy.scope():
    ...   model = make_model()
  """
  ops = FusedAllReduce(options, cost_model=cost_model)
  return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)


def fused_ops_of(strategy) -> Optional[FusedAllReduce]:
  """The FusedAllReduce `strategy` reduces with, or None if it has none."""
  ops = getattr(strategy.extended, "_cross_device_ops", None)
  return ops if isinstance(ops, FusedAllReduce) else None
