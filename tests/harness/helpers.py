"""Shared test helpers: devices, per-replica values, the NumPy reference reduction,
all-pairs test matrices."""

import functools
import itertools
import os

import numpy as np
import tensorflow as tf

import tf_fusion


# TF_FUSION_TEST_DEVICE=GPU (tools/gpu_check.py on a GPU host): the tests' replicas are
# the host's GPUs instead of the 4 logical CPUs; tests that want more replicas than
# there are GPUs fail, naming the count.
DEVICE_TYPE = os.environ.get("TF_FUSION_TEST_DEVICE", "CPU").upper()


def devices(n=4):
  found = [d.name for d in tf.config.list_logical_devices(DEVICE_TYPE)][:n]
  if DEVICE_TYPE != "CPU" and len(found) < n:
    raise RuntimeError(f"this test wants {n} {DEVICE_TYPE} replicas; the host has "
                       f"{len(found)}.")
  return found


def fixed_cost_model():
  """A cost model that makes "auto" mix algorithms and split some packs.

  ring is cheaper below ~100 KB, reduce_to_one above; packing copies cost enough
  that a pack of large tensors is split but small tensors stay fused.
  """
  return tf_fusion.CostModel(alpha={"ring": 1e-5, "reduce_to_one": 1e-4},
                             beta={"ring": 1e-9, "reduce_to_one": 1e-10},
                             copy_beta=5e-10, description="fixed for tests")


def per_replica(strategy, arrays):
  """PerReplica whose replica r holds arrays[r] (NumPy) on its device."""
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.constant(arrays[ctx.replica_id_in_sync_group]))


def reference(arrays, reduce_op, compression="none"):
  """Sum over replicas left to right, element by element, in NumPy.

  Under fp16 compression, floating values wider than 16 bits are cast to float16
  first and summed in float16. MEAN divides once, in at least float32.
  """
  dtype = arrays[0].dtype
  wire = dtype
  if compression == "fp16" and dtype.kind == "f" and dtype.itemsize > 2:
    wire = np.dtype(np.float16)
  total = functools.reduce(np.add, [a.astype(wire) for a in arrays]).astype(wire)
  total = total.astype(dtype)
  if reduce_op == "MEAN":
    if dtype.kind == "f":
      wide = np.dtype(np.float32) if dtype.itemsize < 4 else dtype
      total = (total.astype(wide) / wide.type(len(arrays))).astype(dtype)
    else:
      total = total / len(arrays)
  return total


def all_pairs(**factors):
  """Settings (dicts) from the product of `factors` such that every pair of values of
  any two factors is in at least one of them: a fault that needs two settings together
  is met, as in the full product, in a fraction of its runs. Greedy and deterministic:
  each next setting is the first of the product that adds the most pairs not yet met."""
  names = list(factors)
  wanted = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
            for x in factors[a] for y in factors[b]}
  candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]

  def pairs(setting):
    return {((a, setting[a]), (b, setting[b])) for a, b in itertools.combinations(names, 2)}

  chosen = []
  while wanted:
    best = max(candidates, key=lambda s: len(pairs(s) & wanted))
    chosen.append(best)
    wanted -= pairs(best)
  return chosen
