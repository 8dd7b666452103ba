"""Where the workers come from: TF_CONFIG (the launcher, Kubernetes TFJob) or Slurm's
variables (srun), read by tf_fusion.cluster; and the recipe trained by processes given
only what Slurm or a TFJob sets."""

import json
import os
from unittest import mock

import portpicker
import tensorflow as tf

from tests.harness import multi_worker
from tf_fusion import cluster

NO_CLUSTER = {k: v for k, v in os.environ.items()
              if k != "TF_CONFIG" and not k.startswith("SLURM_")}


def _slurm_env(procid, tasks, nodelist, tasks_per_node, **extra):
  return dict(NO_CLUSTER, SLURM_PROCID=str(procid), SLURM_STEP_NUM_TASKS=str(tasks),
              SLURM_STEP_NODELIST=nodelist, SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
              **extra)


class KindTest(tf.test.TestCase):

  def test_auto_prefers_tf_config_then_slurm_then_one_worker(self):
    with mock.patch.dict(os.environ, NO_CLUSTER, clear=True):
      self.assertIsNone(cluster.kind_from_env("auto"))
      self.assertIsNone(cluster.resolver("auto"))
    with mock.patch.dict(os.environ, _slurm_env(0, 1, "n1", "1"), clear=True):
      self.assertEqual(cluster.kind_from_env("auto"), "slurm")
      os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                            "task": {"type": "worker", "index": 0}})
      self.assertEqual(cluster.kind_from_env("auto"), "tf_config")
    with self.assertRaisesRegex(ValueError, "cluster_resolver='mpi' is not valid"):
      cluster.kind_from_env("mpi")


class SlurmTest(tf.test.TestCase):

  def test_several_tasks_per_node_on_cpu_nodes(self):
    # What srun sets for 2 nodes x 2 tasks; TF's own resolver runs nvidia-smi and fails
    # on such nodes, or lists no tasks with zero GPUs.
    env = _slurm_env(3, 4, "node[1-2]", "2(x2)", CUDA_VISIBLE_DEVICES="")
    with mock.patch.dict(os.environ, env, clear=True):
      found = cluster.resolver("slurm", port_base=9000)
      self.assertEqual(found.cluster_spec().as_dict(), {"worker": [
          "node1:9000", "node1:9001", "node2:9000", "node2:9001"]})
      self.assertEqual((found.task_type, found.task_id), ("worker", 3))
      self.assertEqual(found.num_accelerators(), {})       # no GPU replicas
      self.assertEqual(os.environ["CUDA_VISIBLE_DEVICES"], "")

  def test_gpu_nodes_share_their_gpus_between_tasks(self):
    env = _slurm_env(1, 4, "gpu[07,09]", "2(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3")
    with mock.patch.dict(os.environ, env, clear=True):
      found = cluster.resolver("slurm")
      self.assertEqual(found.cluster_spec().as_dict()["worker"][:2],
                       ["gpu07:8888", "gpu07:8889"])
      self.assertEqual(found.num_accelerators(), {"GPU": 2})
      self.assertEqual(os.environ["CUDA_VISIBLE_DEVICES"], "2,3")   # task 1's half

  def test_missing_variables_are_named(self):
    env = dict(NO_CLUSTER, SLURM_PROCID="0")
    with mock.patch.dict(os.environ, env, clear=True):
      with self.assertRaisesRegex(ValueError, "SLURM_STEP_NUM_TASKS.* is not set: run "
                                  "the workers with srun"):
        cluster.resolver("slurm")


class ClusterRecipeTest(tf.test.TestCase):

  def test_two_processes_given_only_slurms_variables(self):
    """srun -N1 -n2: one node, two tasks, one CPU replica each, --port_base picked."""
    base = portpicker.pick_unused_port()
    while not portpicker.is_port_free(base + 1):
      base = portpicker.pick_unused_port()
    envs = [(_slurm_env(i, 2, "127.0.0.1", "2", CUDA_VISIBLE_DEVICES=""),
             ["--cluster_resolver=slurm", f"--port_base={base}", "--num_devices=1"])
            for i in range(2)]
    stats = multi_worker.run_recipe(envs, self.create_tempdir().full_path,
                                    flags=["--train_steps=2"])
    for s in stats:
      self.assertEqual((s["num_replicas"], s["final_step"]), (2, 2))
    self.assertEqual(stats[0]["train_loss"], stats[1]["train_loss"])

  def test_kubernetes_tfjob_with_a_chief(self):
    """The TF_CONFIG a TFJob with a Chief and a Worker replica sets (its services
    replaced by 127.0.0.1 ports); --cluster_resolver=auto finds it. The baseline run,
    --cross_device_ops=tf: TF's own reduction across the workers (in packs of
    --tf_bytes_per_pack), with no tf_fusion plan in the stats."""
    ports = [portpicker.pick_unused_port() for _ in range(2)]
    cluster_spec = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"]}
    envs = [(dict(NO_CLUSTER, CUDA_VISIBLE_DEVICES="", TF_CONFIG=json.dumps(
        {"cluster": cluster_spec, "task": {"type": t, "index": 0}, "environment": "cloud"})),
             ["--num_devices=1"]) for t in ("chief", "worker")]
    model_dir = self.create_tempdir().full_path
    stats = multi_worker.run_recipe(envs, model_dir,
                                    flags=["--train_steps=2", "--cross_device_ops=tf",
                                           "--tf_bytes_per_pack=65536"])
    for s in stats:
      self.assertEqual((s["num_replicas"], s["final_step"]), (2, 2))
      self.assertEqual(s["cross_device_ops"], "tf")
      with open(os.path.join(s["model_dir"], "stats.json")) as f:
        self.assertEqual(json.load(f)["packs"], [])
    self.assertEqual(stats[0]["train_loss"], stats[1]["train_loss"])
    # The chief keeps the model_dir; the worker writes beside it, not over it.
    self.assertEqual((stats[0]["model_dir"], stats[1]["model_dir"]),
                     (model_dir, os.path.join(model_dir, "worker0")))


if __name__ == "__main__":
  tf.test.main()
