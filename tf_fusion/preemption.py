"""SaveOnPreemption: SIGTERM to any worker makes every worker save at the same step
boundary and stop, so that the rerun resumes from that step, not from the last epoch.

Slurm (before a time limit, `--signal`) and Kubernetes (before evicting a pod) send
SIGTERM and wait a grace period before SIGKILL. TensorFlow's PreemptionCheckpointHandler
does this for custom training loops only; this is the same for Keras `fit`.

How the workers agree on the step: the worker that got the signal picks "this batch
+ `margin_batches`" at its next batch end and writes it to TensorFlow's coordination
service (its key-value store); every worker watches that key from a thread. Batches are
in lockstep across workers (each one's all-reduce needs them all), so a worker is at
most one batch ahead of another, and the margin leaves room for the key to arrive. At
the agreed batch's end every worker calls `save()` and stops training; `preempted_at`
then holds the batch, and the caller exits (the recipe with code 143, as a process
ended by SIGTERM, so that schedulers count it as retryable).

Usage:
    stop = tf_fusion.SaveOnPreemption(save=lambda: model.save_weights(path))
    model.fit(..., callbacks=[stop])
    if stop.preempted_at is not None:
      sys.exit(143)
"""

import signal
import threading
from typing import Callable, Optional

from absl import logging
import keras
import tensorflow as tf

from tf_fusion import stall
from tf_fusion._internal import tf as tf_internal

_KEY = "tf_fusion/preempt/{fit}"


class SaveOnPreemption(keras.callbacks.Callback):
  """Saves and stops every worker at one batch boundary after a SIGTERM to any of them.

  Args:
    save: called on every worker at the agreed batch's end (all workers at once, so it
      may run collectives, e.g. averaging batch-norm statistics, then write files).
    signals: the signals that mean "preempted" (installed while `fit` runs, in the main
      thread; the previous handlers come back afterwards).
    margin_batches: how many batches after the signalled one the workers stop (>= 2).
  """

  def __init__(self, save: Callable[[], None], signals=(signal.SIGTERM,),
               margin_batches: int = 3):
    super().__init__()
    if margin_batches < 2:
      raise ValueError(f"margin_batches must be >= 2, got {margin_batches}.")
    self.save = save
    self.signals = tuple(signals)
    self.margin_batches = int(margin_batches)
    self.preempted_at: Optional[int] = None   # the batch (of this fit) saved at
    self._fits = 0
    self._old = {}

  def on_train_begin(self, logs=None):
    del logs
    self._fits += 1
    self._batches = 0
    self._signalled = False
    self._stop_at = None
    self._done = threading.Event()
    self.preempted_at = None
    self._worker, self._workers = stall.worker_and_count(self.model)
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._old[s] = signal.signal(s, self._on_signal)
    if self._workers > 1:
      self._watcher = threading.Thread(target=self._watch, daemon=True)
      self._watcher.start()

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("tf_fusion: got %s on worker %d; saving at a batch boundary agreed "
                    "with the other workers, then stopping.", signal.Signals(signum).name,
                    self._worker)
    self._signalled = True

  def _key(self):
    return _KEY.format(fit=self._fits)

  def _watch(self):
    """Waits for the agreed batch in the coordination service until fit ends."""
    while not self._done.is_set():
      try:
        value = tf_internal.get_cluster_value(self._key(), 1000)
      except (tf.errors.OpError, ValueError):
        continue
      self._stop_at = int(value)
      return

  def on_train_batch_end(self, batch, logs=None):
    del batch, logs
    self._batches += 1
    if self._signalled and self._stop_at is None:
      self._announce(self._batches + self.margin_batches)
    if self._stop_at is not None and self._batches >= self._stop_at:
      if self._batches > self._stop_at:
        logging.error("tf_fusion: worker %d learned of the preemption late (batch %d, "
                      "agreed %d); saving here.", self._worker, self._batches,
                      self._stop_at)
      self.save()
      self.preempted_at = self._batches
      self.model.stop_training = True
      self._stop_at = float("inf")   # once
      logging.warning("tf_fusion: preempted: saved after batch %d of this fit on worker "
                      "%d; stopping.", self.preempted_at, self._worker)

  def _announce(self, stop_at):
    if self._workers <= 1:
      self._stop_at = stop_at
      return
    try:
      tf_internal.set_cluster_value(self._key(), str(stop_at))
    except tf.errors.OpError:   # another worker was signalled first: take its batch
      stop_at = int(tf_internal.get_cluster_value(self._key()))
    self._stop_at = stop_at

  def on_train_end(self, logs=None):
    del logs
    self._done.set()
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}
