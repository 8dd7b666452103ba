"""The GPU path, read from the graph on a machine without GPUs: the fused reduction is
traced for GPU device names (nothing runs) and each collective's device and
communication hint are read from the ops. TF runs NCCL only for the hint "nccl"."""

import json

from absl.testing import parameterized
import tensorflow as tf

import tf_fusion
from tests import helpers

GPUS = tuple(f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in range(2))
SUM = tf.distribute.ReduceOp.SUM


def _collectives(devices, algorithm, options=None, implementation="auto"):
  """(device, communication_hint) of every CollectiveReduceV2 of one traced reduction."""
  ops = tf_fusion.FusedAllReduce(
      tf_fusion.FusionOptions(pack_bytes=1024, first_pack_bytes=0, algorithm=algorithm,
                              implementation=implementation),
      cost_model=helpers.fixed_cost_model())
  call = ops._call_settings(options)  # pylint: disable=protected-access
  specs = [(tf.float32, tf.TensorShape([n])) for n in (300, 10, 500, 7)]
  plan = ops.make_plan(specs, devices)

  def reduce():
    per_device = []
    for d in devices:
      with tf.device(d):
        per_device.append([tf.zeros(s, dt) for dt, s in specs])
    return ops._reduce_dense(SUM, devices, plan, per_device, call=call)  # pylint: disable=protected-access

  graph = tf.function(reduce).get_concrete_function().graph
  return [(op.device, op.get_attr("communication_hint").decode())
          for op in graph.get_operations() if op.type == "CollectiveReduceV2"]


class GpuGraphTest(tf.test.TestCase, parameterized.TestCase):

  def setUp(self):
    super().setUp()
    # The launchers' ordering tokens are variables made eagerly on "their" GPU: on
    # this machine they land on the CPU instead (tracing only reads the graph).
    self._soft = tf.config.get_soft_device_placement()
    tf.config.set_soft_device_placement(True)

  def tearDown(self):
    tf.config.set_soft_device_placement(self._soft)
    super().tearDown()

  def test_the_ring_on_gpus_is_nccl(self):
    found = _collectives(GPUS, "ring")
    self.assertNotEmpty(found)
    self.assertEqual({hint for _, hint in found}, {"nccl"})
    self.assertEqual({d for d, _ in found}, set(GPUS))   # one launch per GPU

  @parameterized.parameters(("RING", "ring"), ("NCCL", "nccl"), ("AUTO", "nccl"))
  def test_a_call_can_choose_the_collective(self, implementation, hint):
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=getattr(
            tf.distribute.experimental.CommunicationImplementation, implementation))
    self.assertEqual({h for _, h in _collectives(GPUS, "ring", options)}, {hint})

  @parameterized.parameters(("ring", None, "ring"), ("nccl", None, "nccl"),
                            ("ring", "NCCL", "nccl"), ("nccl", "AUTO", "nccl"))
  def test_fusion_options_choose_the_collective_a_call_may_override(
      self, implementation, call, hint):
    options = call and tf.distribute.experimental.CommunicationOptions(
        implementation=getattr(tf.distribute.experimental.CommunicationImplementation, call))
    self.assertEqual({h for _, h in _collectives(GPUS, "ring", options, implementation)},
                     {hint})

  def test_cpus_keep_tf_ring(self):
    cpus = tuple(helpers.devices(2))
    self.assertEqual({h for _, h in _collectives(cpus, "ring")}, {"auto"})
    nccl = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.NCCL)
    self.assertEqual({h for _, h in _collectives(cpus, "ring", nccl)}, {"auto"})


class GpuCheckToolTest(tf.test.TestCase):

  def test_without_gpus_it_says_so_checks_the_graph_and_exits_0(self):
    from tools import gpu_check  # pylint: disable=g-import-not-at-top
    out_dir = self.create_tempdir().full_path
    self.assertEqual(gpu_check.main(["--out_dir", out_dir]), 0)
    with open(f"{out_dir}/gpu_check.json") as f:
      report = json.load(f)
    self.assertEqual(report["host"]["gpus"], [])
    self.assertStartsWith(report["skipped"], "no GPUs on this host")
    ring = report["graph"]["ring"]["collectives"]
    self.assertNotEmpty(ring)
    self.assertEqual({hint for _, _, hint in ring}, {"nccl"})
    self.assertNotIn("tests", report)


if __name__ == "__main__":
  tf.test.main()
