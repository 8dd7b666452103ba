"""One step of the sharded weight update: reduce-scatter, update 1/N, all-gather.

For each pack of the layout (shard_layout), in launch order, under the pack's name
scope: every replica's gradients are packed (made dense, cast for the wire, padded),
reduce-scattered (shard_exchange), and unscaled. Then, once for the whole step, one
small all-reduce of per-variable sums of squares and a count of non-finite values
gives every replica the same clipping (`clipnorm`, `global_clipnorm`) and the same
finiteness decision (loss scaling). Each replica refreshes its shard's weights from
its copy of the model's weights, applies decoupled weight decay and the optimizer's
update to its segments (a layer-wise optimizer sums its norms over the shards with a
second small all-reduce), and the new shards are all-gathered, exactly (weights never
ride a lossy wire), into every replica's copy of the weights.

Sparse gradients (IndexedSlices) are made dense in their replica's pack: the optimizer,
its clipping norms included, sees an embedding's gradient summed into its table, as it
sees any dense weight's. (Keras on one device squares an IndexedSlices gradient row by
row, so its Adam second moment and its clipping norm count repeated rows apart; see
docs/sharded_update.md.)
"""

from keras import ops
import tensorflow as tf

from tf_fusion import compression
from tf_fusion import packing
from tf_fusion import shard_state
from tf_fusion import stats
from tf_fusion import strategy as strategy_lib
from tf_fusion._internal import keras as keras_internal
from tf_fusion._internal import tf as tf_internal
from tf_fusion.collectives import run_as_graph
from tf_fusion.plans import PackPlan
from tf_fusion.shard_exchange import Exchange


class Step:
  """The graph of one sharded step for the local replicas of `exchange`.

  Args:
    state: shard_state.ShardedState of the optimizer.
    exchange: how shards cross devices for these replicas.
    compressor: the gradients' wire (compression.Compression.*).
    present: indices (in the optimizer's variables) of the variables with a gradient.
    local_value: local_value(i, k) reads local replica k's copy of variable i.
  """

  def __init__(self, state, exchange: Exchange, compressor, present, local_value):
    self.state = state
    self.exchange = exchange
    self.compressor = compressor
    self.present = list(present)
    self.local_value = local_value
    self.optimizer = state.optimizer
    self.num_variables = len(state.variables)

  def plan(self):
    """One PackPlan per pack of the layout, as `last_plan` shows them."""
    out = []
    for p in self.state.layout.packs:
      wire = self.compressor.wire_dtype(p.dtype)
      out.append(PackPlan(
          index=p.index, dtype=p.dtype, tensor_count=len(p.variables),
          bytes=p.size * p.dtype.size, algorithm=f"sharded_{self.exchange.name}",
          wire_dtype=wire, wire_bytes=p.padded_size * wire.size,
          tensor_indices=p.variables,
          note=f"weight update sharded over {p.num_shards} replicas, "
               f"{p.shard_size} elements each"))
    return tuple(out)

  # --- the step ------------------------------------------------------------------------

  def run(self, grads, learning_rates, loss_scales, skip_non_finite):
    """The step. `grads[j]`: local replica ks[j]'s gradients of `present`;
    `learning_rates[j]`, `loss_scales[j]` (None: not loss-scaled) its scalars.

    Returns the finiteness decision (a bool tensor, the same on every replica).
    """
    ks = self.exchange.ks
    dense = []
    for device, replica in zip(self.exchange.devices, grads):
      with tf.device(device):   # an IndexedSlices summed into its table on its replica
        dense.append({i: tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                      for i, g in zip(self.present, replica)})
    blocks = {}   # pack index -> per local replica, its reduced, unscaled block
    plan = self.plan()
    for p, entry in zip(self.state.layout.packs, plan):
      if p.size == 0:
        continue
      with tf.name_scope(stats.pack_scope(entry)):
        blocks[p.index] = self._reduce_scatter(p, dense, loss_scales)
    squares, finite = self._statistics(blocks, skip_non_finite)
    for j, k in enumerate(ks):
      with tf.device(self.exchange.devices[j]):
        self._refresh(k)

    def update():
      self._update(blocks, squares, learning_rates)
    if skip_non_finite:
      tf.cond(finite, update, lambda: None)
    else:
      update()
    last = max((p.index for p in self.state.layout.packs if p.size), default=None)
    for p, entry in zip(self.state.layout.packs, plan):
      if p.size:
        with tf.name_scope(stats.pack_scope(entry)):
          self._all_gather(p, carries_timeout=p.index == last)
    return finite

  def _reduce_scatter(self, p, dense, loss_scales):
    """Per local replica, its block of pack `p` summed over the group, unscaled."""
    wire = self.compressor.wire_dtype(p.dtype)
    parts = []
    for device, d in zip(self.exchange.devices, dense):
      with tf.device(device):   # no gradient (frozen, unused): zeros
        parts.append([tf.cast(d[i], p.dtype) if i in d
                      else tf.zeros(self.state.layout.shapes[i], p.dtype)
                      for i in p.variables])
    scales = self._range_scales(p, parts, wire)
    buffers = []
    for j, device in enumerate(self.exchange.devices):
      with tf.device(device):
        if scales is not None:
          flat = compression.scale_to_wire(parts[j], scales[j], wire)
        else:
          flat = [self.compressor.compress(t)[0] for t in parts[j]]
        flat = [tf.reshape(t, [-1]) for t in flat]
        pad = p.padded_size - p.size
        if pad:
          flat.append(tf.zeros([pad], wire))
        buffers.append(tf.concat(flat, 0) if len(flat) > 1 else flat[0])
    reduced = self.exchange.reduce_scatter(buffers, p.shard_size)
    out = []
    for j, (device, shard) in enumerate(zip(self.exchange.devices, self.exchange.shards)):
      with tf.device(device):
        block = tf.cast(reduced[j], _wide(p.dtype))
        if scales is not None:
          block = block * self._per_element(p, shard, 1.0 / scales[j])
        if loss_scales[j] is not None:
          block = block / tf.cast(loss_scales[j], block.dtype)
        out.append(block)
    return out

  def _range_scales(self, p, parts, wire):
    """fp16: per replica, the agreed power-of-two scale of each tensor of `p`."""
    if not self.compressor.range_scaled(wire):
      return None
    bounds = []
    for device, part in zip(self.exchange.devices, parts):
      with tf.device(device):
        bounds.append(compression.local_bounds(part))
    with tf.name_scope("range"):
      summed = self.exchange.all_sum(bounds)
    out = []
    for device, b in zip(self.exchange.devices, summed):
      with tf.device(device):
        out.append(compression.range_scales(b))
    return out

  def _per_element(self, p, shard, per_tensor):
    """A block-long vector: each segment's tensor's value of `per_tensor` (one per
    variable of `p`), 1 on padding."""
    segments = p.segments(shard)
    position = {v: n for n, v in enumerate(p.variables)}
    values = [per_tensor[position[s.variable]] for s in segments]
    filled = sum(s.size for s in segments)
    sizes = [s.size for s in segments] + [p.shard_size - filled]
    values.append(tf.ones([], per_tensor.dtype))
    return tf.repeat(tf.stack(values), sizes)

  def _statistics(self, blocks, skip_non_finite):
    """(per local replica, the group's per-variable sums of squares of the gradient,
    or None; whether every gradient is finite)."""
    opt = self.optimizer
    clips = bool(opt.clipnorm or opt.global_clipnorm)
    if not clips and not skip_non_finite:
      return None, tf.constant(True)
    vectors = []
    for j, k in enumerate(self.exchange.ks):
      with tf.device(self.exchange.devices[j]):
        sums = [[] for _ in range(self.num_variables)]
        bad = []
        for p in self.state.layout.packs:
          if not p.size:
            continue
          block = blocks[p.index][j]
          bad.append(tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(block)),
                                           tf.float32)))
          for s in p.segments(self.exchange.shards[j]):
            piece = tf.cast(block[s.offset:s.offset + s.size], tf.float32)
            sums[s.variable].append(tf.reduce_sum(tf.square(piece)))
        vector = [tf.add_n(s) if s else tf.zeros([]) for s in sums]
        vectors.append(tf.stack(vector + [tf.add_n(bad) if bad else tf.zeros([])]))
    with tf.name_scope("tf_fusion_sharded_norms"):
      totals = self.exchange.all_sum(vectors)
    finite = tf.equal(totals[0][-1], 0.0)
    return [t[:-1] for t in totals], finite

  def _refresh(self, k):
    """Local replica k's shard weights, from its copy of the model's weights."""
    part = self.state.parts[k]
    flats = {}
    for (_, seg), w in zip(part.segments, part.weights):
      if seg.variable not in self.present:
        continue
      if seg.variable not in flats:
        flats[seg.variable] = tf.reshape(self.local_value(seg.variable, k), [-1])
      w.assign(flats[seg.variable][seg.start:seg.start + seg.size])

  def _update(self, blocks, squares, learning_rates):
    """Weight decay and the optimizer's update of every local shard."""
    begun = []
    for j, k in enumerate(self.exchange.ks):
      part = self.state.parts[k]
      with tf.device(self.exchange.devices[j]):
        segments = [(p, s, w) for (p, s), w in zip(part.segments, part.weights)
                    if s.variable in self.present]
        grads = [_clipped(self.optimizer, blocks[p.index][j][s.offset:s.offset + s.size],
                          s.variable, squares[j] if squares else None, self.present)
                 for p, s, w in segments]
        keras_internal.decoupled_weight_decay(part.optimizer, [w for _, _, w in segments])
        if hasattr(part.optimizer, "layerwise_begin"):
          begun.append(self._layerwise_begin(part, segments, grads))
        else:
          for (_, _, w), g in zip(segments, grads):
            part.optimizer.update_step(g, w.value, learning_rates[j])
    if begun:
      self._layerwise_end(begun, learning_rates)

  def _layerwise_begin(self, part, segments, grads):
    opt = part.optimizer
    carries, sums = [], [[] for _ in range(self.num_variables)]
    for (_, s, w), g in zip(segments, grads):
      index = keras_internal.variable_index(opt, w)
      carry, squares = opt.layerwise_begin(g, w.value, index)
      carries.append((carry, s.variable, w, index))
      sums[s.variable].append(squares)
    vector = tf.concat([tf.add_n(s) if s else tf.zeros([2]) for s in sums], 0)
    return part, carries, vector

  def _layerwise_end(self, begun, learning_rates):
    with tf.name_scope("tf_fusion_sharded_trust_ratios"):
      totals = self.exchange.all_sum([vector for _, _, vector in begun])
    for j, ((part, carries, _), total) in enumerate(zip(begun, totals)):
      with tf.device(self.exchange.devices[j]):
        total = tf.reshape(total, [-1, 2])
        for carry, variable, w, index in carries:
          part.optimizer.layerwise_end(carry, total[variable], w.value, index,
                                       learning_rates[j])

  def _all_gather(self, p, carries_timeout):
    """The new shards of pack `p` gathered into every local replica's copy of its
    variables."""
    new = []
    for j, k in enumerate(self.exchange.ks):
      part = self.state.parts[k]
      with tf.device(self.exchange.devices[j]):
        pieces = [w.value.read_value() if s.variable in self.present
                  else tf.zeros([s.size], p.dtype)
                  for (q, s), w in zip(part.segments, part.weights) if q.index == p.index]
        filled = sum(int(piece.shape[0]) for piece in pieces)
        if filled < p.shard_size:
          pieces.append(tf.zeros([p.shard_size - filled], p.dtype))
        new.append(tf.concat(pieces, 0) if len(pieces) > 1 else pieces[0])
    gathered = self.exchange.all_gather(new, carries_timeout)
    like = [tf.TensorSpec(self.state.layout.shapes[i], p.dtype) for i in p.variables]
    values = {}
    for j, blocks in enumerate(gathered):
      with tf.device(self.exchange.devices[j]):
        for i, v in zip(p.variables, packing.unpack_blocks(blocks, p.size, p.shard_size,
                                                           like)):
          values.setdefault(i, []).append(v)
    for i, per_replica in values.items():
      if i in self.present:
        self._assign(i, per_replica)

  def _assign(self, i, per_replica):
    variable = self.state.variables[i]
    variable = getattr(variable, "value", variable)
    if self.exchange.replica_launch:
      value = per_replica[0]
    else:
      value = tf_internal.per_replica(per_replica)
    tf.distribute.get_strategy().extended.update(
        variable, lambda v, x: v.assign(tf.cast(x, v.dtype)), args=(value,), group=False)


def _clipped(opt, g, variable, squares, present):
  """`g` (a block's part of `variable`'s reduced gradient) clipped as `opt` clips, by
  the group's sums of `squares` per variable (Keras's formulas)."""
  if opt.clipnorm and opt.clipnorm > 0:
    l2sum = squares[variable]
    norm = tf.where(l2sum > 0, tf.sqrt(tf.where(l2sum > 0, l2sum, 1.0)), l2sum)
    return g * opt.clipnorm / tf.maximum(norm, opt.clipnorm)
  if opt.global_clipnorm and opt.global_clipnorm > 0:
    use_norm = tf.sqrt(tf.reduce_sum(tf.gather(squares, present)))
    clip = opt.global_clipnorm
    scale = clip * tf.minimum(1.0 / use_norm, 1.0 / clip) + (use_norm - use_norm)
    return g * tf.cast(scale, g.dtype)
  if opt.clipvalue and opt.clipvalue > 0:
    return ops.clip(g, -opt.clipvalue, opt.clipvalue)
  return g


def _wide(dtype):
  return dtype if dtype.size >= 4 else tf.float32


def sharded_ops():
  """The FusedAllReduce of the strategy in scope if it shards the weight update (and
  this is a replica context), else None."""
  if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
    return None
  ops_ = strategy_lib.fused_ops_of(tf.distribute.get_strategy())
  if ops_ is None or ops_.options.weight_update != "sharded":
    return None
  return ops_


def apply(optimizer, grads, variables, learning_rate, loss_scale=None, after=None):
  """The sharded step of `optimizer` (replica context, under a sharding strategy):
  `grads` of `variables` (None entries skipped), as each replica computed them (not
  reduced; loss-scaled by `loss_scale` if given, and then a non-finite gradient
  anywhere skips the update everywhere). `after(finite)` runs once the step is built:
  in cross-replica context under merge_call, else in each replica's.

  Returns the finiteness decision (True when not loss-scaled).
  """
  ops_ = sharded_ops()
  state = shard_state.create(optimizer, ops_)
  pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
  present = [keras_internal.variable_index(optimizer, v) for _, v in pairs]
  grads = [g for g, _ in pairs]
  skip = loss_scale is not None
  collectives = ops_.collectives(state.devices)
  compressor = compression.Compression.get(ops_.options.compression)
  if tf_internal.merge_call_impossible() or tf_internal.strategy_reduces_without_merge_call():
    replica = tf.get_static_value(
        tf.distribute.get_replica_context().replica_id_in_sync_group)
    k = int(replica) - state.shard(0)
    step = Step(state, Exchange(collectives, [k], [state.shard(k)], True), compressor,
                present, lambda i, _: tf.convert_to_tensor(_tf_variable(state.variables[i])))
    ops_.last_plan = step.plan()
    finite = step.run([grads], [learning_rate], [loss_scale], skip)
    if after is not None:
      after(finite)
    return finite

  def merge_fn(strategy, grads, learning_rate, loss_scale):
    ks = range(len(state.devices))
    local = lambda value, k: _local(strategy, value, k)
    read = lambda i, k: tf.convert_to_tensor(
        strategy.experimental_local_results(_tf_variable(state.variables[i]))[k])
    step = Step(state, Exchange(collectives, ks, [state.shard(k) for k in ks], False),
                compressor, present, read)
    ops_.last_plan = step.plan()
    args = ([[local(g, k) for g in grads] for k in ks], [local(learning_rate, k) for k in ks],
            [None if loss_scale is None else local(loss_scale, k) for k in ks])
    if tf.executing_eagerly() and step.exchange.name != "in_graph":
      # Collectives launched one device at a time would wait for each other: one
      # function launches them all (kept per gradient list, as the eager reduction's).
      key = (tuple(present), skip)
      if key not in state.eager_steps:
        state.eager_steps[key] = tf.function(lambda *a: step.run(*a, skip))
      finite = run_as_graph(state.eager_steps[key], *args)
    else:
      finite = step.run(*args, skip)
    if after is not None:
      after(finite)
    return finite

  return tf.distribute.get_replica_context().merge_call(
      merge_fn, args=(grads, learning_rate, loss_scale))


def _tf_variable(variable):
  return getattr(variable, "value", variable)


def _local(strategy, value, k):
  """Local replica k's part of `value` (the value itself if it is not distributed)."""
  results = strategy.experimental_local_results(value)
  return results[k] if len(results) > 1 else results[0]
