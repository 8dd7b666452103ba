"""The optimizer's state under the sharded weight update: 1/N of it on each replica.

When a Keras optimizer is built under a strategy whose FusionOptions say
`weight_update="sharded"`, its slots (Adam's moments, momentum, ...) are not created
whole on every replica. Instead, for each local replica k (global shard s):
- the weights of shard s are held segment by segment in plain variables on k's device
  (`ShardPart.weights`, refreshed from the model's weights at every step, so nothing
  that writes the weights, a restore or `set_weights`, can leave them stale);
- a clone of the optimizer (`_ShardOptimizer`: same class and settings, its
  `iterations`, learning rate and weight-decay exclusions those of the original) is
  built on those segment variables: its slots are the shard's state, 1/N of the whole.
The original optimizer's slots become `ShardedSlot`s: views over the segments of every
shard, in the places where Keras keeps its slots, so `optimizer.variables`, `.keras`
files, `save_weights` and BackupAndRestore see (and write) whole tensors of the usual
shapes, in the usual order. A file saved sharded loads on one device, replicated, or
sharded over another replica count, and the other way round.

Only optimizers whose update reads nothing but its own variable's gradient, weights
and slots can be cut into segments: Keras's elementwise ones (SGD, Adam, AdamW, Adamax,
RMSprop, Adagrad, Adadelta, Lion, Ftrl) and tf_fusion's layer-wise LARS and LAMB (their
norms are summed over the shards, `layerwise_begin`/`layerwise_end`). Others are
refused at build, by name (`check_shardable`); a custom optimizer that knows its
update is elementwise says so with a class attribute `tf_fusion_elementwise = True`.
"""

from typing import Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_fusion import shard_layout
from tf_fusion._internal import keras as keras_internal
from tf_fusion._internal import tf as tf_internal
from tf_fusion.collectives import Collectives
from tf_fusion.collectives import explain_errors

# When FusionOptions(pack_bytes=None) (chosen per all-reduce by the autotuner), the
# sharded update packs by this threshold: its packs are laid out when the optimizer is
# built, before any gradient exists to tune on.
DEFAULT_PACK_BYTES = 32 << 20

_ELEMENTWISE = tuple(getattr(keras.optimizers, name) for name in (
    "SGD", "Adam", "AdamW", "Adamax", "RMSprop", "Adagrad", "Adadelta", "Lion", "Ftrl"))
_NOT_SLOTS = ("gradient_accumulator",)   # per replica, local sums: stay whole


def check_shardable(optimizer) -> None:
  """Raises a ValueError naming `optimizer` and the option unless its update can be
  cut into segments (module doc)."""
  cls = type(optimizer)
  if getattr(optimizer, "use_ema", False):
    raise ValueError(
        f"FusionOptions(weight_update='sharded') cannot shard {cls.__name__} with "
        "use_ema=True: Keras updates the moving average of every whole weight on every "
        "replica. Use weight_update='replicated', or drop use_ema.")
  if hasattr(optimizer, "layerwise_begin") or getattr(cls, "tf_fusion_elementwise", False):
    return
  if any(keras_internal.same_update(cls, known) for known in _ELEMENTWISE):
    return
  raise ValueError(
      f"FusionOptions(weight_update='sharded') cannot shard {cls.__name__}: its update "
      "may read more than its own variable's gradient, weights and slots (a norm, "
      "another variable, a per-step scalar), which a replica holding 1/N of each "
      "variable cannot compute alone. Shardable: "
      f"{', '.join(k.__name__ for k in _ELEMENTWISE)}, tf_fusion.LARS, tf_fusion.LAMB. "
      "Use weight_update='replicated', or, if its update_step is elementwise, set "
      f"{cls.__name__}.tf_fusion_elementwise = True.")


def of(optimizer) -> Optional["ShardedState"]:
  """The sharded state of `optimizer`, or None if it was built replicated."""
  return getattr(optimizer, "_tf_fusion_sharded", None)


def create(optimizer, ops) -> "ShardedState":
  """The sharded state of `optimizer` (built), created once, for the fused ops `ops`."""
  state = of(optimizer)
  if state is None:
    check_shardable(optimizer)
    state = ShardedState(optimizer, ops)
    object.__setattr__(optimizer, "_tf_fusion_sharded", state)
  return state


def is_shard(optimizer) -> bool:
  """Whether `optimizer` is one replica's shard optimizer (built by ShardPart)."""
  return isinstance(optimizer, _ShardOptimizer)


def record_slot(optimizer, reference, name, variable) -> None:
  """Called as shard optimizer `optimizer` creates slot `name` of segment `reference`."""
  optimizer.tf_fusion_part.slots[(id(reference), name)] = variable


def slot_for(optimizer, reference, name, ops) -> "ShardedSlot":
  """The view standing for `optimizer`'s slot `name` of model variable `reference`
  (tracked in `optimizer.variables` where the whole slot would be)."""
  state = create(optimizer, ops)
  view = ShardedSlot(state, keras_internal.variable_index(optimizer, reference), name,
                     reference)
  keras_internal.track_variable(optimizer, view)
  return view


def is_slot_name(name) -> bool:
  return name not in _NOT_SLOTS


class ShardedState:
  """The shards of one optimizer on this worker's replicas.

  Attributes:
    optimizer: the optimizer the model was compiled with (its slots are views).
    variables: the variables it was built for.
    layout: shard_layout.Layout of those variables over every replica.
    devices: this worker's replica devices; `parts[k]` is device k's shard.
  """

  def __init__(self, optimizer, ops):
    self.optimizer = optimizer
    self.variables = list(keras_internal.tracked_variables(optimizer))
    self.devices = ops.local_devices()
    self.num_workers = ops.num_workers
    self.worker = getattr(ops, "worker_index", 0)   # MultiWorkerFusedAllReduce's
    num_shards = len(self.devices) * self.num_workers
    options = ops.options
    pack_bytes = DEFAULT_PACK_BYTES if options.pack_bytes is None else options.pack_bytes
    self.layout = shard_layout.plan_layout(
        [(tf.as_dtype(v.dtype), v.shape) for v in self.variables], num_shards,
        pack_bytes, options.first_pack_bytes)
    self.parts = [ShardPart(self, k) for k in range(len(self.devices))]
    self.ops = ops
    self.eager_steps = {}   # shard_step's functions for eager callers

  def shard(self, k) -> int:
    """The global shard of local replica k (group order: worker-major)."""
    return self.worker * len(self.devices) + k

  def sum_across_workers(self, vector):
    """A float64 vector summed over the workers, eagerly (every worker must call)."""
    timeout = self.ops.options.timeout_seconds
    collectives = Collectives.get(self.devices, len(self.devices) * self.num_workers,
                                  timeout)
    with explain_errors(self.num_workers, timeout):
      return collectives.sum_across_workers(vector)

  def state_elements(self) -> List[int]:
    """Per local replica, the elements of weights each of its state slots holds."""
    return [self.layout.state_elements(p.shard) for p in self.parts]


class ShardPart:
  """Local replica k's shard: its segments' weights and the optimizer over them."""

  def __init__(self, state, k):
    self.state = state
    self.k = k
    self.shard = state.shard(k)
    self.device = state.devices[k]
    self.segments = state.layout.segments(self.shard)
    self.slots: Dict[Tuple[int, str], tf.Variable] = {}
    main = state.optimizer
    with tf.init_scope(), tf_internal.plain_variables(), tf.device(self.device):
      self.weights = []
      for pack, seg in self.segments:
        path = keras_internal.variable_path(state.variables[seg.variable])
        self.weights.append(keras.Variable(
            tf.zeros([seg.size], pack.dtype), dtype=pack.dtype.name, trainable=False,
            name=f"{_safe(path)}_shard{self.shard}_{seg.start}"))
      self.optimizer = _ShardOptimizer.of(main, self)
      if self.weights:
        with keras.name_scope(self.optimizer.name, caller=self.optimizer):
          self.optimizer.build(self.weights)
    if hasattr(self.optimizer, "layerwise_begin") and self.weights:
      # The original's choices, per variable (its regexes and objects), not the
      # segments' names.
      originals = [state.variables[s.variable] for _, s in self.segments]
      self.optimizer.set_exclusions([main.uses_weight_decay(v) for v in originals],
                                    [main.uses_layer_adaptation(v) for v in originals])

  def slot_pieces(self, variable, name):
    """[(segment, slot variable)] of `variable`'s slot `name` in this shard."""
    out = []
    for (pack, seg), w in zip(self.segments, self.weights):
      if seg.variable == variable:
        out.append((seg, self.slots[(id(w), name)]))
    return out


def _safe(path):
  return path.replace("/", "_").replace(":", "_")


class _ShardOptimizer:
  """Makes a replica's clone of an optimizer: same class and settings; its
  `iterations`, learning rate and decoupled weight-decay choices are the original's."""

  _classes = {}

  @classmethod
  def of(cls, main, part):
    base = type(main)
    if base not in cls._classes:
      cls._classes[base] = type(f"{base.__name__}Shard", (base, _ShardOptimizer), {
          "iterations": property(lambda self: self.tf_fusion_main.iterations),
          "learning_rate": property(lambda self: self.tf_fusion_main.learning_rate),
          "_use_weight_decay": _shard_uses_weight_decay,
          "_apply_weight_decay": keras_internal.decoupled_weight_decay,
      })
    config = main.get_config()
    # Clipping and gradient accumulation happen before the shard's update, once.
    config.update(name=f"{main.name}_shard{part.shard}", clipnorm=None, clipvalue=None,
                  global_clipnorm=None, gradient_accumulation_steps=None,
                  loss_scale_factor=None)
    shard = cls._classes[base].from_config(config)
    object.__setattr__(shard, "tf_fusion_main", main)
    object.__setattr__(shard, "tf_fusion_part", part)
    return shard


def _shard_uses_weight_decay(self, variable):
  part = self.tf_fusion_part
  for (_, seg), w in zip(part.segments, part.weights):
    if w is variable or getattr(w, "value", None) is variable:
      return keras_internal.uses_weight_decay(
          self.tf_fusion_main, part.state.variables[seg.variable])
  raise ValueError(f"{variable.name} is not a segment of shard {part.shard}.")


class ShardedSlot:
  """One slot of the original optimizer (e.g. Adam's momentum of one weight), whose
  elements live in the shards: read whole (`numpy`, `value`), written whole
  (`assign`), as Keras saves and loads optimizer variables. Across workers, reading
  is a collective: every worker must read the same slots in the same order (Keras's
  saving does: every worker saves)."""

  def __init__(self, state, variable, name, reference):
    self._state = state
    self._variable = variable
    self._slot_name = name
    self.shape = tuple(reference.shape)
    self.dtype = keras.backend.standardize_dtype(reference.dtype)
    path = keras_internal.variable_path(reference)
    self.name = f"{_safe(path)}_{name}"
    self.path = f"{state.optimizer.name}/{self.name}"
    self.trainable = False

  def _pieces(self):
    return [(part, seg, slot) for part in self._state.parts
            for seg, slot in part.slot_pieces(self._variable, self._slot_name)]

  def numpy(self) -> np.ndarray:
    size = int(np.prod(self.shape, dtype=np.int64))
    flat = np.zeros([size], self.dtype)
    for _, seg, slot in self._pieces():
      flat[seg.start:seg.start + seg.size] = slot.numpy()
    if self._state.num_workers > 1:   # each element is one worker's, the others' 0
      flat = self._state.sum_across_workers(flat.astype(np.float64)).astype(self.dtype)
    return flat.reshape(self.shape)

  @property
  def value(self):
    return tf.constant(self.numpy())

  def __array__(self, dtype=None, copy=None):
    del copy   # always a new array
    return self.numpy() if dtype is None else self.numpy().astype(dtype)

  def assign(self, value):
    flat = np.asarray(value, self.dtype).reshape([-1])
    if flat.size != int(np.prod(self.shape, dtype=np.int64)):
      raise ValueError(f"cannot assign a value of shape {np.shape(value)} to the "
                       f"optimizer variable {self.name} of shape {self.shape}.")
    for _, seg, slot in self._pieces():
      slot.assign(flat[seg.start:seg.start + seg.size])
    return self

  def __repr__(self):
    return (f"<ShardedSlot {self.path} shape={self.shape} dtype={self.dtype} over "
            f"{self._state.layout.num_shards} shards>")
