"""One run of a recipe, whatever it trains: the strategy, the task's data and model, the
checkpoint it resumes from, Keras's fit, evaluation and the report.

A recipe is a task (`Task`): what it reads (`data`), what it builds and compiles
(`build`), what it says as it starts (`describe`) and what it reports of its own
(`stats`). Everything else, and its order, is here once for both recipes:

  seed -> strategy -> task.data -> task.build (under the strategy) -> restore
  -> callbacks -> fit (from the restored step to the last, an evaluation interval per
  Keras epoch) -> evaluation -> stats (the task's, then the shared ones) -> report
"""

import dataclasses
import math
import time
from typing import Optional, Protocol, Sequence

from absl import logging
import keras
import tensorflow as tf

from official_recipes import callbacks as recipe_callbacks
from official_recipes import training


@dataclasses.dataclass
class Data:
  """What a task reads, and the run's step plan that follows from it.

  Attributes:
    train, evaluation: distributed datasets (evaluation None: --skip_eval).
    total: the run's last step.
    loop: steps per Keras epoch (between evaluations or checkpoints).
    eval_steps: steps of one evaluation.
    evaluate_in_fit: evaluate at the end of every Keras epoch (else once, at the end).
    train_files: the TFRecords trained on, searched for the damaged one when TensorFlow
      reports a corrupt record (its message names no file).
    unit: what a batch holds, for the step log ("images", "sequences").
    meta: anything else the task wants back in `build`, `describe` and `stats`.
  """
  train: object
  evaluation: object
  total: int
  loop: int
  eval_steps: int
  evaluate_in_fit: bool
  train_files: Sequence[str]
  unit: str
  meta: dict = dataclasses.field(default_factory=dict)


class Task(Protocol):
  """One recipe's part of a run (see the module docstring)."""

  def data(self, cfg, strategy) -> Data: ...

  def build(self, cfg, strategy, data: Data) -> keras.Model: ...

  def describe(self, cfg, model, strategy, data: Data, start_step: int) -> str: ...

  def stats(self, cfg, model, strategy, data: Data, metrics: dict, logger) -> dict: ...


@dataclasses.dataclass
class _Fit:
  """What a run holds between its steps."""
  cfg: object
  strategy: tf.distribute.Strategy
  data: Data
  model: keras.Model
  backup: Optional[keras.callbacks.BackupAndRestore]   # None: --cross_device_ops=none
  start_step: int
  out_dir: str


def run(task: Task, cfg) -> dict:
  """Trains `task` as `cfg` says, under the Keras dtype policy of cfg.dtype; returns
  the stats (written to model_dir too).

  Raises:
    ValueError: for input or settings that cannot work, naming them.
  """
  return training.with_policy(cfg.dtype, _run, task, cfg)


def _run(task, cfg):
  start_time = time.perf_counter()
  training.seed(cfg)
  state = _prepare(task, cfg)
  logger, preemption, callbacks = training.callbacks(
      cfg, state.model, state.backup, state.data.total, state.data.eval_steps,
      state.out_dir, unit=state.data.unit)
  history, fit_epochs = _fit(state, callbacks)
  metrics = _metrics(state, history, callbacks)
  model, strategy, data = state.model, state.strategy, state.data
  stats = {
      "model": cfg.model, "cross_device_ops": cfg.cross_device_ops,
      "weight_update": cfg.weight_update,
      "num_replicas": strategy.num_replicas_in_sync,
      "global_batch_size": cfg.batch_size, "dtype": cfg.dtype,
      "start_step": state.start_step, "final_step": recipe_callbacks.step_of(model),
      "total_steps": data.total, "eval_steps": data.eval_steps,
      "accumulation_steps": cfg.accumulation_steps,
      "updates": recipe_callbacks.updates_of(model),
      "steps_per_execution": cfg.steps_per_execution,
      "train_loss": metrics.get("loss"), "eval_loss": metrics.get("val_loss"),
      "fit_epochs": fit_epochs,
      **task.stats(cfg, model, strategy, data, metrics, logger),
      **training.common_stats(model, strategy, logger, preemption, state.out_dir,
                              start_time),
  }
  return training.write_report(stats)


def _prepare(task, cfg) -> _Fit:
  """The strategy, the task's data and model (restored from model_dir), checked."""
  strategy = training.make_strategy(cfg)
  replicas = strategy.num_replicas_in_sync
  if cfg.batch_size % replicas:
    raise ValueError(f"--batch_size={cfg.batch_size} does not split over {replicas} "
                     "replicas.")
  data = task.data(cfg, strategy)
  out_dir = training.worker_dir(cfg.model_dir, strategy)
  model = task.build(cfg, strategy, data)
  backup, start_step = training.backup_and_restore(cfg, model, strategy, out_dir)
  logging.info("%s", task.describe(cfg, model, strategy, data, start_step))
  spe = cfg.steps_per_execution
  if data.loop % spe or (data.total - start_step) % spe:
    # The data repeats, so each call runs all its steps: it would overshoot the
    # evaluation points and the end of the run.
    raise ValueError(
        f"--steps_per_execution={spe} must divide the steps per Keras epoch "
        f"({data.loop}: between evaluations or checkpoints) and the steps left to run "
        f"({data.total - start_step}).")
  return _Fit(cfg, strategy, data, model, backup, start_step, out_dir)


def _fit(state: _Fit, callbacks):
  """Trains from the restored step to the end; (Keras history, [first, last] epoch)."""
  data = state.data
  if state.start_step >= data.total:
    return {}, None
  first = training.first_epoch(state.backup, state.start_step, data.loop)
  fit_epochs = [first, first + math.ceil((data.total - state.start_step) / data.loop)]
  in_fit = data.evaluation if data.evaluate_in_fit else None
  try:
    history = state.model.fit(
        data.train, epochs=fit_epochs[1], initial_epoch=first, steps_per_epoch=data.loop,
        validation_data=in_fit, validation_steps=(data.eval_steps or None) if in_fit else None,
        callbacks=callbacks, verbose=1).history
  except tf.errors.DataLossError as e:
    raise training.corrupt_data(e, state.cfg.data_dir, data.train_files, state.model,
                                state.out_dir) from None
  return history, fit_epochs


def _metrics(state: _Fit, history, callbacks) -> dict:
  """The last epoch's metrics, and an evaluation's as val_* if fit made none."""
  metrics = {k: v[-1] for k, v in history.items()}
  if state.data.evaluation is not None and "val_loss" not in metrics:
    progress = [c for c in callbacks if isinstance(c, recipe_callbacks.EvalProgress)]
    metrics.update({f"val_{k}": v for k, v in state.model.evaluate(
        state.data.evaluation, steps=state.data.eval_steps, verbose=0, return_dict=True,
        callbacks=progress).items()})
  return metrics
