"""Callbacks of the recipes (ImageNet, BERT): step logging to the console and TensorBoard, evaluation
progress, the profiler over a step range, and a stop at an exact step.

All count steps by the optimizer's `iterations`, which a resumed run restores, so logs,
profiles and the stop keep the run's own step numbers across restarts (Keras's
epoch and batch counters restart at every `fit`).
"""

import statistics
import time

from absl import logging
import keras
import tensorflow as tf

import tf_fusion


def step_of(model):
  """Training steps (batches) run so far, under gradient accumulation too."""
  return tf_fusion.callbacks.batches_seen(model)


def updates_of(model):
  """Optimizer updates applied so far (steps / accumulation_steps)."""
  return int(number(model.optimizer.iterations))


def number(value):
  """A Python float of a scalar tensor or (mirrored) variable."""
  return float(keras.ops.convert_to_numpy(value))


class StepLogger(keras.callbacks.Callback):
  """Every `log_steps` steps: loss, accuracy, learning rate, loss scale and `unit`/s
  (images, sequences), to absl logging and as TensorBoard scalars (`writer_dir`).

  `rates` holds one figure (`unit`s/s) per logged window; the first window includes
  tracing and start-up, `steady_rate` leaves it out (a run shorter than two
  windows: the rate over its steps after the first, which holds the tracing). `cpu_seconds_per_step`
  likewise: this process's CPU time (all its threads) per step, which shows how much of
  the machine a step keeps busy (a collective hidden behind compute still costs its CPU).
  """

  def __init__(self, global_batch, log_steps, total_steps, writer_dir, unit="images"):
    super().__init__()
    self.unit = unit   # what a batch holds: images, sequences
    self.global_batch = global_batch
    self.log_steps = log_steps
    self.total_steps = total_steps
    self.writer = tf.summary.create_file_writer(writer_dir)
    self.rates = []
    self.cpu_seconds_per_step = []
    self.losses = []   # the loss Keras logged at each window's end (its epoch's mean)
    self._last = None
    self._after_first = None   # (step, time) once the first step (tracing) is done
    self._latest = None        # (step, time) of the latest step

  def on_train_begin(self, logs=None):
    self._last = (step_of(self.model), time.perf_counter(), time.process_time())

  def on_train_batch_end(self, batch, logs=None):
    step = step_of(self.model)
    self._latest = (step, time.perf_counter())
    if self._after_first is None:
      self._after_first = self._latest
    if step % self.log_steps and step != self.total_steps:
      return
    first_step, first_time, first_cpu = self._last
    now, cpu = time.perf_counter(), time.process_time()
    self._last = (step, now, cpu)
    if step <= first_step:
      return
    rate = (step - first_step) * self.global_batch / (now - first_time)
    self.rates.append(rate)
    self.cpu_seconds_per_step.append((cpu - first_cpu) / (step - first_step))
    opt = self.model.optimizer
    scalars = {f"{self.unit}_per_sec": rate, "lr": number(opt.learning_rate)}
    if hasattr(opt, "dynamic_scale"):
      scalars["loss_scale"] = number(opt.dynamic_scale)
    for name in ("loss", "top_1", "top_5", "masked_accuracy"):
      if logs and name in logs:
        scalars[name] = float(logs[name])
    if "loss" in scalars:
      self.losses.append(scalars["loss"])
    with self.writer.as_default(step=step):
      for name, value in scalars.items():
        tf.summary.scalar(name, value)
    self.writer.flush()
    logging.info("step %d/%d: %s", step, self.total_steps,
                 ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

  def on_train_end(self, logs=None):
    if len(self.rates) < 2 and self.short_run_rate:
      logging.info("%s/s %.4g over steps %d-%d: fewer than two log windows of %d "
                   "steps, so the rate is taken after the first step (tracing)",
                   self.unit, self.short_run_rate, self._after_first[0],
                   self._latest[0], self.log_steps)

  @property
  def short_run_rate(self):
    """Images/s over the steps after this run's first (None without two steps)."""
    if self._after_first is None:
      return None
    (s0, t0), (s1, t1) = self._after_first, self._latest
    return (s1 - s0) * self.global_batch / (t1 - t0) if s1 > s0 and t1 > t0 else None

  @property
  def steady_rate(self):
    """Median `unit`s/s over the logged windows after the first; with fewer than two
    windows, `short_run_rate` (None if the run had one step)."""
    rates = self.rates[1:]
    return statistics.median(rates) if rates else self.short_run_rate

  @property
  def steady_cpu_seconds_per_step(self):
    """Median CPU seconds per step over the logged windows after the first."""
    cpu = self.cpu_seconds_per_step[1:]
    return statistics.median(cpu) if cpu else None


class EvalProgress(keras.callbacks.Callback):
  """Says how long an evaluation will be when it starts, and every `log_steps` batches
  how far it is, at what rate and how long is left: a long evaluation (50,000 ImageNet
  images) otherwise runs for minutes without a line.

  `eval_steps` is given, not read from `params`: during fit's validation those are the
  training epoch's.
  """

  def __init__(self, global_batch, log_steps, eval_steps):
    super().__init__()
    self.global_batch = global_batch
    self.log_steps = log_steps
    self._steps = eval_steps
    self._start = None

  def on_test_begin(self, logs=None):
    self._start = time.perf_counter()
    logging.info("evaluating: %d steps, %d images", self._steps,
                 self._steps * self.global_batch)

  def on_test_batch_end(self, batch, logs=None):
    done = batch + 1
    if done % self.log_steps and done != self._steps:
      return
    seconds = time.perf_counter() - self._start
    rate = done * self.global_batch / seconds
    logging.info("eval step %d/%d: %.4g images/s, %.0f s left", done, self._steps, rate,
                 (self._steps - done) * seconds / done)


class StopAtStep(keras.callbacks.Callback):
  """Ends training when the optimizer reaches `total_steps` (mid-epoch if need be)."""

  def __init__(self, total_steps):
    super().__init__()
    self.total_steps = total_steps

  def on_train_batch_end(self, batch, logs=None):
    if step_of(self.model) >= self.total_steps:
      self.model.stop_training = True


class Profiler(keras.callbacks.Callback):
  """Traces steps first..last (1-based, the run's own numbering) into `logdir` for
  TensorBoard's profile tab."""

  def __init__(self, first, last, logdir):
    super().__init__()
    self.first, self.last, self.logdir = first, last, logdir
    self.active = False

  def on_train_batch_begin(self, batch, logs=None):
    if not self.active and self.first <= step_of(self.model) + 1 <= self.last:
      tf.profiler.experimental.start(self.logdir)
      self.active = True
      logging.info("profiling steps %d..%d into %s", step_of(self.model) + 1, self.last,
                   self.logdir)

  def on_train_batch_end(self, batch, logs=None):
    if self.active and step_of(self.model) >= self.last:
      self._stop()

  def on_train_end(self, logs=None):
    if self.active:
      self._stop()

  def _stop(self):
    tf.profiler.experimental.stop()
    self.active = False
