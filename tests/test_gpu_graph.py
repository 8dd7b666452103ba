"""The GPU path, read from the graph on a machine without GPUs: the fused reduction is
traced for GPU device names (nothing runs) and each collective's device and
communication hint are read from the ops. TF runs NCCL only for the hint "nccl"."""

import json

from absl.testing import parameterized
import tensorflow as tf

import tf_fusion
from tests.harness import helpers
from tools import gpu_check

GPUS = tuple(f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in range(2))
SPECS = [(tf.float32, tf.TensorShape([n])) for n in (300, 10, 500, 7)]


def _collectives(devices, algorithm, options=None, implementation="auto"):
  """(device, communication_hint) of every CollectiveReduceV2 of one traced reduction."""
  ops = tf_fusion.FusedAllReduce(
      tf_fusion.FusionOptions(pack_bytes=1024, first_pack_bytes=0, algorithm=algorithm,
                              implementation=implementation),
      cost_model=helpers.fixed_cost_model())
  _, graph = gpu_check.trace_reduction(ops, devices, SPECS, options)
  return [(d, hint) for d, kind, hint in gpu_check.launches(graph)
          if kind == "CollectiveReduceV2"]


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

  @parameterized.parameters(False, True)
  def test_the_sharded_update_is_nccl_both_ways(self, replica_launch):
    """Reduce-scatter and all-gather (and the small all-reduce of norms) as NCCL
    collectives, one per GPU (or the replica's own), chained in one order per GPU."""
    found = gpu_check.sharded_update_launches(GPUS, replica_launch)
    self.assertEqual(found["exchange"], "nccl")
    kinds = [kind for _, kind, _ in found["collectives"]]
    per_gpu = 1 if replica_launch else len(GPUS)
    self.assertEqual(kinds, ["CollectiveReduceScatterV2"] * per_gpu
                     + ["CollectiveReduceV2"] * per_gpu + ["CollectiveGatherV2"] * per_gpu)
    self.assertEqual({hint for _, _, hint in found["collectives"]}, {"nccl"})
    self.assertEqual({d for d, _, _ in found["collectives"]},
                     {GPUS[0]} if replica_launch else set(GPUS))
    if not replica_launch:
      self.assertEqual(found["chained"], {g: True for g in GPUS})

  def test_the_sharded_update_on_cpus_is_in_graph(self):
    found = gpu_check.sharded_update_launches(tuple(helpers.devices(2)))
    self.assertEqual(found["exchange"], "in_graph")
    self.assertEqual(found["collectives"], [])

  def test_cpus_keep_tf_ring(self):
    cpus = tuple(helpers.devices(2))
    self.assertEqual({h for _, h in _collectives(cpus, "ring")}, {"auto"})
    nccl = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.NCCL)
    self.assertEqual({h for _, h in _collectives(cpus, "ring", nccl)}, {"auto"})

  def test_hierarchical_across_workers_is_nccl_in_the_node_and_across_in_shards(self):
    # As worker 0 of 2, each with 2 GPUs. Packs (back-propagation order) of 7, 500, 10
    # and 300 floats: the small ones are one shard, the others one shard per GPU.
    ops = gpu_check.fused_ops("hierarchical", GPUS, num_workers=2, pack_bytes=1024)
    plan, graph = gpu_check.trace_reduction(ops, GPUS, SPECS)
    self.assertEqual([e.tensor_count for e in plan], [1, 1, 1, 1])
    found = gpu_check.launches(graph)
    self.assertEqual({hint for _, _, hint in found}, {"nccl"})
    inside = [d for d, kind, _ in found if kind == "NcclAllReduce"]
    across = [d for d, kind, _ in found if kind == "CollectiveReduceV2"]
    self.assertEqual(sorted(inside), sorted(GPUS * 4))   # every pack, every GPU
    # 7 and 10 floats: shard 0 on GPU 0; 500 and 300 floats: a shard on each GPU.
    self.assertEqual(sorted(across), sorted([GPUS[0]] * 4 + [GPUS[1]] * 2))
    # Two communicators on each GPU: its launches must be chained in plan order.
    self.assertEqual(gpu_check.chained(graph), {d: True for d in GPUS})

  def test_auto_across_workers_chains_ring_and_hierarchical_launches(self):
    ops = gpu_check.fused_ops("auto", GPUS, num_workers=2, pack_bytes=1 << 20)
    plan, graph = gpu_check.trace_reduction(
        ops, GPUS, [(tf.float32, tf.TensorShape([n])) for n in (300_000, 10, 500_000, 7)])
    self.assertEqual({e.algorithm for e in plan}, {"ring", "hierarchical"})
    self.assertEqual(gpu_check.chained(graph), {d: True for d in GPUS})

  def test_hierarchical_forced_to_tf_ring_uses_no_nccl(self):
    ring = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    ops = gpu_check.fused_ops("hierarchical", GPUS, num_workers=2, pack_bytes=1024)
    _, graph = gpu_check.trace_reduction(ops, GPUS, SPECS, ring)
    found = gpu_check.launches(graph)
    self.assertEqual({(kind, hint) for _, kind, hint in found},
                     {("CollectiveReduceV2", "ring")})

  def test_hierarchical_on_cpus_adds_in_the_worker_and_keeps_tf_ring(self):
    cpus = tuple(helpers.devices(2))
    ops = gpu_check.fused_ops("hierarchical", cpus, num_workers=2, pack_bytes=1024)
    _, graph = gpu_check.trace_reduction(ops, cpus, SPECS)
    found = gpu_check.launches(graph)
    self.assertEqual({(kind, hint) for _, kind, hint in found},
                     {("CollectiveReduceV2", "auto")})
    self.assertLen(found, 6)   # shards as on GPUs
    self.assertEmpty(gpu_check.chained(graph))   # no NCCL, nothing to chain


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
    hierarchical = report["graph"]["hierarchical, 2 workers"]
    self.assertIn("NcclAllReduce", {kind for _, kind, _ in hierarchical["collectives"]})
    self.assertTrue(all(hierarchical["chained"].values()))
    self.assertNotIn("tests", report)


if __name__ == "__main__":
  tf.test.main()
