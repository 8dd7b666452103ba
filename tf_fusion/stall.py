"""StallWatch: a step that does not finish is reported, naming the workers behind it,
and ended with an error instead of a hang.

A worker that is alive but stuck (stopped by SIGSTOP, swapping, blocked in its input
pipeline, deadlocked) holds every other worker in the step's collectives. tf_fusion's
timeout rides on the last pack of a step, which never starts while an earlier pack
waits, and TensorFlow's heartbeats notice only a process that stops answering, after
10-15 s or more. Horovod's users rely on its stall check for this; `StallWatch` is the
same for Keras `fit`.

On each worker a timer runs while a training batch runs. If the batch has not finished
after `timeout_seconds`, the worker:
1. writes "I am in step N" to TensorFlow's coordination service (its key-value store,
   under a key of this stall and worker), and reads what the other workers wrote, for
   up to `answer_seconds`: a worker that wrote nothing is stopped, dead or stuck outside
   the step; one that wrote a smaller step is behind;
2. logs one line that says so, e.g. "tf_fusion: step 7 has not finished after 5 s on
   worker 0; worker 1 has not answered (stopped, dead, or stuck outside the step)";
3. aborts its collectives with that message (unless `abort=False`), so `fit` raises
   `DeadlineExceededError` carrying it, on every worker that is still running.

Nothing is sent while steps finish in time: the check costs a timer per batch. The first
batch of each `fit` is not watched: it traces and compiles the step, which may take long.
A `fit` that raises (a corrupt record, Ctrl-C in a notebook) never calls Keras's
end-of-batch callbacks, so the timer also checks that the `fit` which armed it is still
running: one that has left says nothing and aborts nothing, and the next `fit` or
collective of the process is not hit by a report of a step that is long over.

Usage:
    model.fit(..., callbacks=[tf_fusion.StallWatch(timeout_seconds=60)])
"""

import inspect
import os
import threading
import time
from typing import Optional

from absl import logging
import keras
import tensorflow as tf

from tf_fusion import strategy as strategy_lib
from tf_fusion._internal import python as python_internal
from tf_fusion._internal import tf as tf_internal

_KEY = "tf_fusion/stall/{stall}/{worker}"


class StallWatch(keras.callbacks.Callback):
  """Reports and ends a training step that runs longer than `timeout_seconds`.

  Args:
    timeout_seconds: how long one training batch (one call of the train function: a
      whole `steps_per_execution` group) may run.
    answer_seconds: how long to wait for the other workers' answers.
    abort: abort the collectives (the step fails with the report) or only log.
  """

  def __init__(self, timeout_seconds: float = 60.0, answer_seconds: float = 3.0,
               abort: bool = True):
    super().__init__()
    if not timeout_seconds > 0 or not answer_seconds > 0:
      raise ValueError(f"timeout_seconds and answer_seconds must be > 0, got "
                       f"{timeout_seconds!r} and {answer_seconds!r}.")
    self.timeout_seconds = float(timeout_seconds)
    self.answer_seconds = float(answer_seconds)
    self.abort = abort
    self.reports = []          # what was reported, for the caller and for tests
    self._timer: Optional[threading.Timer] = None
    self._watched = None       # (thread id, frame of the loop that called the callback)
    self._step = 0
    self._stalls = 0

  def on_train_begin(self, logs=None):
    del logs
    self._first = True

  def on_train_batch_begin(self, batch, logs=None):
    del batch, logs
    self._step += 1
    if getattr(self, "_first", False):   # tracing and compiling: not a stall
      self._first = False
      return
    self._arm()

  def on_train_batch_end(self, batch, logs=None):
    del batch, logs
    self._disarm()

  def on_train_end(self, logs=None):
    del logs
    self._disarm()

  def _arm(self):
    self._disarm()
    self._watched = (threading.get_ident(), _training_loop_frame(self))
    self._timer = threading.Timer(self.timeout_seconds, self._stalled, args=(self._step,))
    self._timer.daemon = True
    self._timer.start()

  def _disarm(self):
    if self._timer is not None:
      self._timer.cancel()
      self._timer = None
    self._watched = None

  def _still_training(self):
    """Whether the training loop that armed the timer is still on its thread's stack."""
    if self._watched is None:
      return False
    thread, loop = self._watched
    return any(frame is loop for frame in python_internal.thread_stack(thread))

  def _stalled(self, step):
    if not self._still_training():
      self._watched = None     # the frame keeps the left fit's locals alive
      logging.info("tf_fusion: StallWatch's timer of step %d outlived its fit (which "
                   "raised); nothing to report.", step)
      return
    self._stalls += 1
    worker, workers = worker_and_count(self.model)
    behind = _ask_the_others(self._stalls, worker, workers, step, self.answer_seconds)
    report = (f"tf_fusion: step {step} has not finished after {self.timeout_seconds:g} s "
              f"on worker {worker}")
    report += "; " + "; ".join(behind) if behind else (
        "; every worker is in it" if workers > 1 else "")
    report += ("." if not self.abort else
               ". Aborting its collectives (StallWatch); a stuck worker must be restarted.")
    self.reports.append(report)
    logging.error("%s", report)
    if self.abort:
      tf_internal.abort_collectives(report)


def _training_loop_frame(callback):
  """The frame that called the callbacks (Keras's `fit`, or a custom loop): the first
  one up the stack that is neither `callback`'s own methods (a subclass's too) nor
  Keras's callbacks package."""
  frame = inspect.currentframe().f_back
  while frame.f_back is not None and (
      frame.f_locals.get("self") is callback
      or f"{os.sep}callbacks{os.sep}" in frame.f_code.co_filename):
    frame = frame.f_back
  return frame


def worker_and_count(model):
  """(this worker's index, number of workers) of the model's strategy."""
  strategy = getattr(model, "distribute_strategy", None)
  resolver = getattr(strategy, "cluster_resolver", None)
  workers = strategy_lib.num_workers(strategy) if strategy is not None else 1
  if resolver is None or workers <= 1:
    return 0, 1
  return tf_internal.worker_index(strategy, resolver.task_id or 0), workers


def _ask_the_others(stall, worker, workers, step, answer_seconds):
  """What the other workers say about a stall: one phrase per worker not in `step`."""
  if workers <= 1:
    return []
  tf_internal.set_cluster_value(_KEY.format(stall=stall, worker=worker), str(step))
  deadline = time.monotonic() + answer_seconds
  out = []
  for other in range(workers):
    if other == worker:
      continue
    wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
    try:
      their = int(tf_internal.get_cluster_value(_KEY.format(stall=stall, worker=other),
                                                wait_ms))
    except (tf.errors.OpError, ValueError):
      out.append(f"worker {other} has not answered (stopped, dead, or stuck outside "
                 "the step)")
      continue
    if their < step:
      out.append(f"worker {other} is still in step {their}")
    elif their > step:
      out.append(f"worker {other} is already in step {their}")
  return out
