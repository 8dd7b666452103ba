"""The floor of a training step: cross-device ops that communicate nothing.

MEASUREMENT ONLY. Every all-reduce hands each replica back its own value, so each
replica applies its own gradients and the replicas drift apart: the model is not trained
correctly. What is left is the step's compute, input and update at the same devices,
batch and graph: the time a perfect all-reduce, fully hidden behind the backward pass,
would leave. Scaling efficiency is a strategy's images/s over this floor's, as Horovod
and Goyal et al. report it (`tools/train_bench.py`).

Reductions that are not all-reduces (to a host device: Keras's logs) go through
TensorFlow's ReductionToOneDevice over this worker's replicas only.
"""

import tensorflow as tf

from tf_fusion._internal import tf as tf_internal

WARNING = ("MEASUREMENT ONLY: no cross-replica communication. Each replica applies its "
           "own gradients, so the replicas drift apart and the model is NOT trained "
           "correctly; nothing is checkpointed.")


class NoCommunication(tf_internal.CrossDeviceOpsHooks, tf.distribute.CrossDeviceOps):
  """A CrossDeviceOps whose all-reduces return each replica's own value."""

  def __init__(self, num_workers: int = 1):
    super().__init__()
    self._num_workers = int(num_workers)
    self._local = tf.distribute.ReductionToOneDevice()

  @property
  def num_workers(self) -> int:
    """Workers of the strategy (TF's hook asks; nothing crosses them here)."""
    return self._num_workers

  def reduce_implementation(self, reduce_op, per_replica_value, destinations, options):
    if (tf_internal.is_per_replica(per_replica_value)
        and (destinations is per_replica_value
             or tf_internal.devices_match(per_replica_value, destinations))):
      return tf_internal.mirrored(per_replica_value.values)
    return self._local.reduce_implementation(reduce_op, per_replica_value, destinations,
                                             options)

  def batch_reduce_implementation(self, reduce_op, value_destination_pairs, options):
    return [self.reduce_implementation(reduce_op, value, dest, options)
            for value, dest in value_destination_pairs]

  def all_reduce_in_replica(self, reduce_op, value, replica_id, options):
    """The no-merge-call path: this replica's own values, unchanged."""
    del reduce_op, replica_id, options
    return value

  def gather_exact(self, per_replica_value, destinations, axis, options):
    """strategy.gather over this worker's replicas."""
    return tf_internal.gather(self._local, per_replica_value, destinations, axis, options)
