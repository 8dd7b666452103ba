"""What the recipes share around Keras's fit: the strategy of the distribution flags
(one host or several, tf_fusion or a baseline), each worker's output directory, the
callbacks (checkpoints that survive restarts, SIGTERM saves, stall reports, step logs,
TensorBoard), restoring, the report files and the absl main.
"""

import collections
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import keras
import tensorflow as tf

import tf_fusion
from official_recipes import callbacks as recipe_callbacks
from official_recipes import records
from official_recipes import flag_groups
from official_recipes import shared_flags


def make_strategy(cfg):
  """The strategy of --strategy / --num_devices, reducing through tf_fusion (or, for
  the baselines, TensorFlow's own reduction or none: --cross_device_ops)."""
  cost_model_file = cfg.cost_model_file or (
      os.path.join(cfg.model_dir, "cost_model.json") if cfg.model_dir else None)
  options = tf_fusion.FusionOptions.from_env(
      pack_bytes=cfg.pack_bytes, first_pack_bytes=cfg.first_pack_bytes,
      compression=cfg.compression, algorithm=cfg.all_reduce_alg,
      cost_model_file=cost_model_file, backward_seconds=cfg.backward_seconds,
      autotune=cfg.autotune, sparse=cfg.sparse,
      weight_update=cfg.weight_update)
  if cfg.strategy == "multi_worker":
    # Before anything touches the GPUs: under Slurm this sets each task's share.
    resolver = tf_fusion.cluster.resolver(cfg.cluster_resolver, cfg.port_base)
    if cfg.cross_device_ops == "none":
      return tf_fusion.strategy.no_communication_strategy(
          multi_worker=True, cluster_resolver=resolver, devices_per_worker=cfg.num_devices)
    if cfg.cross_device_ops == "tf":
      return tf_fusion.strategy.tf_multi_worker_strategy(
          cfg.tf_bytes_per_pack, options.timeout_seconds, cluster_resolver=resolver,
          devices_per_worker=cfg.num_devices)
    return tf_fusion.multi_worker_strategy(options, cluster_resolver=resolver,
                                           devices_per_worker=cfg.num_devices)
  # Physical first: listing logical devices would start TF before CPUs can be split.
  if (not tf.config.list_physical_devices("GPU") and cfg.num_devices
      and cfg.num_devices > 1):
    tf_fusion.strategy.split_cpu(cfg.num_devices)
  gpus = tf.config.list_logical_devices("GPU")
  devices = gpus or tf.config.list_logical_devices("CPU")
  n = cfg.num_devices or (len(gpus) if gpus else 1)
  if n > len(devices):
    raise ValueError(
        f"--num_devices={n} but this host has {len(devices)} "
        f"{'GPU' if gpus else 'CPU'} device(s); logical CPUs can only be made before "
        "TensorFlow starts using devices.")
  if cfg.cross_device_ops == "tf":
    if cfg.accumulation_steps > 1:
      raise ValueError("--accumulation_steps > 1 fails under TensorFlow's own "
                       "MirroredStrategy (keras-team/keras#20582); it needs "
                       "--cross_device_ops=tf_fusion.")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:n]])
  if cfg.cross_device_ops == "none":
    return tf_fusion.strategy.no_communication_strategy([d.name for d in devices[:n]])
  return tf_fusion.mirrored_strategy([d.name for d in devices[:n]], options)


def with_policy(dtype, fn, *args):
  """`fn(*args)` under the Keras dtype policy of --dtype `dtype`; the previous policy
  is back afterwards, whatever happens (tests run recipes one after another)."""
  previous = keras.mixed_precision.dtype_policy()
  try:
    tf_fusion.mixed_precision.set_policy(shared_flags.DTYPES[dtype])
    return fn(*args)
  finally:
    keras.mixed_precision.set_dtype_policy(previous)


def loss_scaled(cfg, optimizer):
  """`optimizer` wrapped for loss scaling when the policy needs it (fp16): --loss_scale
  dynamic, or a fixed scale that is never raised (an overflowing step is still skipped
  and lowers it)."""
  if not tf_fusion.mixed_precision.needs_loss_scaling():
    return optimizer
  if cfg.loss_scale == "dynamic":
    return tf_fusion.mixed_precision.loss_scale(optimizer)
  return tf_fusion.mixed_precision.loss_scale(
      optimizer, initial_scale=float(cfg.loss_scale), dynamic_growth_steps=2**31 - 1)


def worker_dir(model_dir, strategy):
  """model_dir for the chief (a "chief" task, else worker 0); model_dir/<type><index>
  for the others."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_type = getattr(resolver, "task_type", None)
  if task_type is None or strategy.extended.should_checkpoint:
    return model_dir
  return os.path.join(model_dir, f"{task_type}{resolver.task_id}")


def seed(cfg):
  """--seed for Python, NumPy, TensorFlow and Keras; --deterministic: op determinism
  too (which tf_fusion's planner honours with plans that use no timing)."""
  if cfg.seed is not None:
    keras.utils.set_random_seed(cfg.seed)
  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()


def callbacks(cfg, model, backup, total, eval_steps, out_dir, unit="images"):
  """(step logger, preemption handler, every callback of fit in order). When `backup` is
  None (the floor), no backup, no preemption handler, no averaging of statistics:
  nothing is saved and nothing communicated."""
  logger = recipe_callbacks.StepLogger(cfg.batch_size, cfg.log_steps, total,
                                       os.path.join(out_dir, "steps"), unit=unit)
  progress = recipe_callbacks.EvalProgress(cfg.batch_size, cfg.log_steps, eval_steps)
  # First: the checkpoint written at an epoch's end then holds the replicas' average.
  callbacks = ([tf_fusion.callbacks.SyncMovingStatistics(), backup]
               if backup is not None else [])
  callbacks += [logger, progress, recipe_callbacks.StopAtStep(total),
                keras.callbacks.TensorBoard(out_dir, write_graph=False, profile_batch=0)]
  if cfg.stall_seconds:
    callbacks.append(tf_fusion.StallWatch(cfg.stall_seconds))
  preemption = None
  if backup is not None:
    # SIGTERM (Slurm before its time limit, Kubernetes before an eviction): every
    # worker saves at one agreed step, and the rerun resumes from that step.
    preemption = tf_fusion.SaveOnPreemption(save=lambda: save_now(model, backup))
    callbacks.append(preemption)
  profile = shared_flags.profile_range(cfg.profile_steps)
  if profile:
    callbacks.append(recipe_callbacks.Profiler(*profile, out_dir))
  return logger, preemption, callbacks


def corrupt_data(error, data_dir, files, model, out_dir) -> ValueError:
  """The one-line error for a DataLossError met while training on `files`: TensorFlow's
  message names no file, so the files are read again to find the first damaged one."""
  where = f"a TFRecord under --data_dir={data_dir!r}"
  for path in files:
    try:
      records.count(path)
    except ValueError as found:
      where = str(found)
      break
  else:
    where += f" is corrupt ({error.message.splitlines()[0]})"
  return ValueError(f"{where}; training stopped at step {recipe_callbacks.step_of(model)}, "
                    f"checkpoint kept in {out_dir}.")


def first_epoch(backup, start_step, loop):
  """The epoch fit starts at: the one BackupAndRestore will restore (it overrides
  fit's initial_epoch), else the evaluation interval the restored step falls in. With
  it fit's epoch count, and so Keras's "Epoch i/N", is the run's real one."""
  epoch = tf_fusion.callbacks.backup_epoch(backup) if backup is not None else None
  return epoch if epoch is not None else math.ceil(start_step / loop)


def save_now(model, backup):
  """The checkpoint BackupAndRestore writes at an epoch's end, written now (mid-epoch):
  the batch-norm statistics averaged over the replicas first, as at an epoch's end."""
  tf_fusion.callbacks.backup_now(model, backup)
  logging.info("Saved step %d to %s", recipe_callbacks.step_of(model), backup.backup_dir)


def backup_and_restore(cfg, model, strategy, out_dir):
  """(BackupAndRestore of out_dir/backup, the step restored from it). The floor
  (--cross_device_ops=none) gets neither: its replicas drift apart, so there is
  nothing worth saving or resuming."""
  if cfg.cross_device_ops == "none":
    logging.warning("--cross_device_ops=none: %s", tf_fusion.no_communication.WARNING)
    return None, 0
  backup = keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"),
                                            delete_checkpoint=False)
  return backup, restore(model, strategy, backup)


def restore(model, strategy, backup):
  """Loads the latest checkpoint of model_dir, if any; returns its step (else 0)."""
  path = os.path.join(backup.backup_dir, "latest.weights.h5")
  if not os.path.exists(path):
    return 0
  with strategy.scope():
    model.optimizer.build(model.trainable_variables)
  model.load_weights(path)
  step = recipe_callbacks.step_of(model)
  logging.info("Restored step %d from %s", step, path)
  return step


def common_stats(model, strategy, logger, preemption, out_dir, start_time):
  """The stats every recipe reports: CPU per step, loss scale, the plan's packs,
  preemption, output directory, wall time."""
  ops = tf_fusion.fused_ops_of(strategy)
  plan = (ops.last_plan if ops is not None else ()) or ()
  return {
      "cpu_seconds_per_step": logger.steady_cpu_seconds_per_step,
      "loss_scale": (recipe_callbacks.number(model.optimizer.dynamic_scale)
                     if hasattr(model.optimizer, "dynamic_scale") else None),
      "packs": [p.as_dict() for p in plan],
      "preempted": preemption is not None and preemption.preempted_at is not None,
      "model_dir": out_dir, "wall_seconds": time.perf_counter() - start_time,
  }


def write_report(stats):
  """The full stats (with every pack) to model_dir/stats.json and the plan as a table to
  model_dir/plan.txt (a plan of ~100 packs is no log line); returns `stats`."""
  out_dir = stats["model_dir"]
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(stats, f, indent=1, default=str)
  if stats["packs"]:
    counts = collections.Counter(p["algorithm"] for p in stats["packs"])
    with open(os.path.join(out_dir, "plan.txt"), "w") as f:
      f.write(tf_fusion.stats.summarize(stats["packs"]) + "\n")
    logging.info("All-reduce plan: %d packs (%s); the table is in %s",
                 len(stats["packs"]), ", ".join(f"{a} {n}" for a, n in counts.items()),
                 os.path.join(out_dir, "plan.txt"))
  return stats


def start(define_all, run):
  """A recipe's `python -m` entry: its flags (`define_all()`), --helpshort by group,
  then absl's app with `main(run)`."""
  define_all()
  flag_groups.install_help()
  app.run(lambda argv: main(run))


def main(run):
  """A recipe's absl main: INFO logging, `run(flags.FLAGS)`, errors in bad flags or
  input as one line (exit 2), the stats as one JSON line, exit 143 when preempted."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)   # the per-step lines: loss, lr, images/s
    # ... but not TensorFlow's own INFO lines ("Reduce to ... then broadcast to ...",
    # one per reduction), which would bury them.
    tf.get_logger().setLevel("WARNING")
  try:
    stats = run(flags.FLAGS)
  except ValueError as e:
    # Bad flags or input: the message names them; a traceback would bury it.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  short = {k: v for k, v in stats.items() if k != "packs"}
  logging.info("Stats: %s", json.dumps(short, default=str))
  print(json.dumps(short, default=str))
  if stats["preempted"]:
    # As a process ended by SIGTERM: schedulers (Slurm requeue, a TFJob's restart
    # policy, tf_fusion.launch --max_restarts) count it as retryable, not done.
    logging.warning("Preempted at step %d of %d; the same command resumes from it.",
                    stats["final_step"], stats["total_steps"])
    sys.exit(143)
