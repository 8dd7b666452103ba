"""FusedAllReduce against TensorFlow's own CrossDeviceOps contract, side by side.

The same inputs go through tf_fusion and through TF's ReductionToOneDevice (the
reference: TF's own op, no packs): values must agree and every result must live on the
device TF puts it on (replica i's all-reduced value on device i; a reduction to a device
on that device), in eager mode and inside tf.function, for reduce and batch_reduce, SUM
and MEAN, dense, IndexedSlices (also of different lengths per replica), mixed,
destinations given as the value, a device string or a Mirrored value; inside tf.cond;
and from two threads at once.
"""

import itertools
import threading

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import tf_fusion
from tf_fusion import collectives as collectives_lib
from tf_fusion._internal import tf as tf_internal
from tests.harness import helpers

SUM, MEAN = tf.distribute.ReduceOp.SUM, tf.distribute.ReduceOp.MEAN
CONFIGS = {
    "ring": dict(algorithm="ring"),
    "reduce_to_one": dict(algorithm="reduce_to_one"),
    "auto": dict(algorithm="auto"),
    "fp16_ring": dict(algorithm="ring", compression="fp16"),
}


def _ours(config):
  return tf_fusion.FusedAllReduce(
      tf_fusion.FusionOptions(pack_bytes=64, first_pack_bytes=0, **CONFIGS[config]),
      cost_model=helpers.fixed_cost_model())


def _per_replica(devices, make):
  out = []
  for r, d in enumerate(devices):
    with tf.device(d):
      out.append(make(r))
  return tf_internal.per_replica(out)


def _dense(devices, shape=(5,), seed=0):
  # Values exact in FP16 and in any summation order: the comparison is of plumbing.
  rng = np.random.RandomState(seed)
  arrays = [rng.randint(-8, 8, size=shape).astype(np.float32) for _ in devices]
  return _per_replica(devices, lambda r: tf.constant(arrays[r]))


def _sparse(devices, rows_per_replica=(2, 3, 1, 2), seed=1):
  rng = np.random.RandomState(seed)

  def make(r):
    n = rows_per_replica[r % len(rows_per_replica)]
    return tf.IndexedSlices(tf.constant(rng.randint(-4, 4, size=(n, 3)).astype(np.float32)),
                            tf.constant(rng.randint(0, 6, size=n).astype(np.int64)),
                            tf.constant([6, 3], tf.int64))
  return _per_replica(devices, make)


def _destination(kind, value, devices):
  if kind == "value":
    return value
  if kind == "device":
    return devices[-1]
  with tf.device(devices[0]):   # a Mirrored variable-like value on every device
    return tf_internal.mirrored([tf.identity(v) for v in value.values])


def _devices_of(result):
  parts = result.values if isinstance(result, tf.distribute.DistributedValues) else (result,)
  return [collectives_lib.canonical_devices([p.device])[0] for p in parts]


def _numpy(result):
  parts = result.values if isinstance(result, tf.distribute.DistributedValues) else (result,)
  out = []
  for p in parts:
    if isinstance(p, tf.IndexedSlices):
      p = tf.convert_to_tensor(p)   # summed duplicates: order-free comparison
    out.append(p.numpy())
  return out


class ContractTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.devices = collectives_lib.canonical_devices(helpers.devices(2))
    self.strategy = tf.distribute.MirroredStrategy(self.devices)

  def _both(self, fn, mode):
    """fn(ops) under our ops and TF's, eagerly or in a tf.function; (ours, theirs)
    as NumPy values with the devices the results were placed on."""
    out = []
    for ops in (self._ours, tf.distribute.ReductionToOneDevice()):
      devices = []

      def call(ops=ops):
        results = fn(ops)
        devices.extend(_devices_of(r) for r in results)   # at trace time in a function
        return results

      with self.strategy.scope():
        results = tf.function(call)() if mode == "function" else call()
      out.append(([_numpy(r) for r in results], devices))
    return out

  def _check(self, ours, theirs):
    (values, devices), (want_values, want_devices) = ours, theirs
    self.assertEqual(devices, want_devices)
    for got, want in zip(values, want_values):
      for g, w in zip(got, want):
        self.assertAllClose(g, w, rtol=1e-6, atol=1e-6)

  @parameterized.named_parameters(
      (f"_{c}_{op.name}_{dest}_{mode}", c, op, dest, mode)
      for c, op, dest, mode in itertools.product(
          CONFIGS, (SUM, MEAN), ("value", "device", "mirrored"), ("eager", "function")))
  def test_reduce_and_batch_reduce_dense(self, config, reduce_op, dest, mode):
    self._ours = _ours(config)
    values = [_dense(self.devices, (5,), 0), _dense(self.devices, (2, 3), 1),
              _dense(self.devices, (40,), 2)]
    dests = [_destination(dest, v, self.devices) for v in values]

    def fn(ops):
      return ([ops.reduce(reduce_op, values[0], dests[0])]
              + ops.batch_reduce(reduce_op, list(zip(values, dests))))
    self._check(*self._both(fn, mode))

  @parameterized.named_parameters(
      (f"_{c}_{op.name}_{mode}", c, op, mode)
      for c, op, mode in itertools.product(("ring", "auto"), (SUM, MEAN),
                                           ("eager", "function")))
  def test_sparse_and_mixed(self, config, reduce_op, mode):
    self._ours = _ours(config)
    dense, sparse = _dense(self.devices), _sparse(self.devices)

    def fn(ops):
      return ([ops.reduce(reduce_op, sparse, sparse)]
              + ops.batch_reduce(reduce_op, [(dense, dense), (sparse, sparse)]))
    self._check(*self._both(fn, mode))

  @parameterized.parameters("ring", "reduce_to_one")
  def test_inside_a_cond(self, config):
    self._ours = _ours(config)
    value = _dense(self.devices)

    def fn(ops):
      def reduced():
        return tuple(ops.reduce(SUM, value, value).values)

      def zeros():
        return tuple(tf.zeros_like(v) for v in value.values)
      outs = tf.cond(tf.constant(True), reduced, zeros)
      return [tf_internal.mirrored(outs)]
    ours, theirs = self._both(fn, "function")
    for g, w in zip(ours[0][0], theirs[0][0]):
      self.assertAllEqual(g, w)

  @parameterized.parameters("ring", "auto")
  def test_threads_launch_at_once(self, config):
    """Threads reduce their own values through one op, eagerly, at the same time, from
    the first call (auto: calibration and planning race too). Unguarded, two threads'
    collectives interleave on the devices: wrong sums, errors or a deadlock."""
    ops = tf_fusion.FusedAllReduce(
        tf_fusion.FusionOptions(pack_bytes=256, first_pack_bytes=0, **CONFIGS[config]))
    errors, results, n = [], {}, 6
    inputs = {t: [_dense(self.devices, (64,), seed=100 * t + i) for i in range(12)]
              for t in range(n)}
    barrier = threading.Barrier(n)

    def worker(t):
      try:
        barrier.wait()
        with self.strategy.scope():
          for _ in range(4):
            results[t] = ops.batch_reduce(SUM, [(v, v) for v in inputs[t]])
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join(timeout=60)
      self.assertFalse(thread.is_alive(), "a launch deadlocked")
    self.assertEmpty(errors)
    for t in range(n):
      for got, value in zip(results[t], inputs[t]):
        want = sum(v.numpy() for v in value.values)
        for d, part in zip(self.devices, got.values):
          self.assertAllEqual(part.numpy(), want)
          self.assertEqual(collectives_lib.canonical_devices([part.device])[0], d)


if __name__ == "__main__":
  tf.test.main()
