"""Which cluster this process is part of: TF_CONFIG (tf_fusion.launch, Kubernetes TFJob),
Slurm (srun), or none (one worker).

TensorFlow ships the resolvers; this module picks one and works around what stops
TF's SlurmClusterResolver on the nodes users have:
- on nodes without NVIDIA GPUs it runs `nvidia-smi` and fails, and with zero GPUs its
  task list comes out empty (it pairs tasks with GPU slots);
- it sets CUDA_VISIBLE_DEVICES when the cluster spec is first read, which only works
  before TensorFlow has looked at the GPUs: `resolver` reads it at once.
"""

import os
import shutil
import subprocess
from typing import Optional

import tensorflow as tf

from tf_fusion._internal import tf as tf_internal

KINDS = ("auto", "tf_config", "slurm")
DEFAULT_PORT_BASE = 8888   # SlurmClusterResolver's default


def kind_from_env(kind: str = "auto") -> Optional[str]:
  """"tf_config", "slurm" or None (one worker) for `kind`; "auto" looks at the
  environment: TF_CONFIG when set, else Slurm when SLURM_PROCID is set."""
  if kind not in KINDS:
    raise ValueError(f"cluster_resolver={kind!r} is not valid; valid values: "
                     f"{', '.join(KINDS)}.")
  if kind != "auto":
    return kind
  if os.environ.get("TF_CONFIG"):
    return "tf_config"
  if os.environ.get("SLURM_PROCID") is not None:
    return "slurm"
  return None


def resolver(kind: str = "auto", port_base: int = DEFAULT_PORT_BASE):
  """The cluster resolver of `kind` (see kind_from_env), or None for one worker.

  Slurm: the tasks of the job step (srun), several per node included; task i on a node
  listens on port_base + i. Each task gets an equal share of the node's GPUs through
  CUDA_VISIBLE_DEVICES (as TF's resolver does), so call this before TensorFlow touches
  the GPUs (tf_fusion.multi_worker_strategy does).

  Raises:
    ValueError: for an unknown kind, a missing Slurm variable, or a TF_CONFIG without
      a cluster.
  """
  kind = kind_from_env(kind)
  if kind is None:
    return None
  if kind == "tf_config":
    found = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if not found.cluster_spec().jobs:
      raise ValueError("cluster_resolver=tf_config but TF_CONFIG names no cluster "
                       f"(TF_CONFIG={os.environ.get('TF_CONFIG')!r}).")
    return found
  return _slurm(port_base)


def _slurm(port_base):
  missing = [v for v in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                         "SLURM_STEP_TASKS_PER_NODE") if os.environ.get(v) is None]
  if missing:
    raise ValueError(f"cluster_resolver=slurm but {', '.join(missing)} is not set: run "
                     "the workers with srun (one task per worker).")
  most = max(tf_internal.expand_tasks_per_node(os.environ["SLURM_STEP_TASKS_PER_NODE"]))
  gpus = gpus_on_this_node()
  if gpus:
    found = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base,
                                                                gpus_per_node=gpus)
  else:
    # One slot per task (TF pairs tasks with GPU slots), no CUDA_VISIBLE_DEVICES to
    # set, and no GPUs to report.
    found = _CpuSlurmClusterResolver(port_base=port_base, gpus_per_node=most,
                                     gpus_per_task=1, auto_set_gpu=False)
  found.cluster_spec()   # sets the task's type and id (and its GPUs) now
  return found


class _CpuSlurmClusterResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
  """TF's SlurmClusterResolver on nodes without GPUs: reports none (MultiWorkerMirrored
  Strategy would otherwise place replicas on GPUs that are not there)."""

  def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
    del task_type, task_id, config_proto
    return {}


def gpus_on_this_node() -> int:
  """NVIDIA GPUs this process may use, without starting TensorFlow: the entries of
  CUDA_VISIBLE_DEVICES if set, else what `nvidia-smi --list-gpus` lists, else 0."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
  if shutil.which("nvidia-smi") is None:
    return 0
  try:
    out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(1 for line in out.splitlines() if line.startswith("GPU "))
