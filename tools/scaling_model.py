"""Scaling model: one data-parallel training step of ResNet-50 or AlexNet(-BN) on 1 to
2048 GPUs, from an alpha-beta model of the all-reduce and a FLOP model of the compute.

  python -m tools.scaling_model                       # the paper's cluster, a table, a PNG
  python -m tools.scaling_model --hardware v100_ib,h100_ib
  python -m tools.scaling_model --machine_json out/fusion_sweep/sweep_2x2.json \
      --machine_images_per_sec 99                     # a profile fitted to this machine

What one step costs (`step_seconds`):
- compute: forward FLOPs x batch / (peak x efficiency); backward = 2 x forward, spread
  over the layers by their FLOPs and run last layer first;
- gradients: one tensor per weight, in back-propagation order; fused into packs of up
  to `pack_bytes` (a larger tensor goes alone; PER_TENSOR = 1: one collective per
  tensor; 0: one pack), FP16
  or FP32 on the wire;
- each pack, in order, on one communication channel, starting when its last tensor
  exists and the previous pack is done (overlap) or after the backward pass (no overlap):
    ring          2(N-1) alpha_inter + 2(N-1)/N S / B_inter   (one ring over all GPUs;
                  its slowest hop is the network once there are several nodes)
    hierarchical  2 [(k-1) alpha_intra + (k-1)/k S / B_intra] + ring over the N/k node
                  masters (reduce in the node, all-reduce across nodes, broadcast back)
    auto          per pack, the one tf_fusion's hybrid all-reduce (Jia et al. 2018,
                  FusionOptions(algorithm="auto")) picks: both lines as tf_fusion's
                  CostModel, its `best` (the cheaper, the ring on a near-tie)
  with k GPUs per node. On one node the ring uses the intra-node constants.
- time to train = steps x step time, steps = epochs x 1,281,167 / global batch.

Every hardware constant is in HARDWARE (tools/scaling_inputs.py, with the networks'
layer tables) with its source. One constant is fitted, not
taken from a source: the P40's compute efficiency (the fraction of the datasheet's FLOPS
that conv-net training reaches), chosen so that ResNet-50 on 2048 P40s takes the paper's
6.6 minutes. AlexNet on 1024 P40s (4 minutes in the paper) and the speed-ups over an
NCCL-style ring are then predictions of the model, not fits.

References:
  Jia et al. 2018, arXiv:1807.11205; Thakur, Rabenseifner, Gropp 2005 (alpha-beta
  model of collectives); Patarasuk & Yuan 2009 (ring all-reduce bandwidth term).
"""

import argparse
import dataclasses
import functools
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

from tf_fusion.cost_model import CostModel
from tools.scaling_inputs import HARDWARE
from tools.scaling_inputs import MODELS
from tools.scaling_inputs import Hardware
from tools.scaling_inputs import Layer
from tools.scaling_inputs import alexnet_bn_layers  # noqa: F401  (the model's inputs, here too)
from tools.scaling_inputs import resnet50_layers  # noqa: F401

IMAGENET_TRAIN = 1_281_167
GIB = 1 << 30


SCHEMES = ("ring", "hierarchical", "auto")
# pack_bytes of one collective per tensor (FusionOptions' meaning: every tensor is
# larger than 1 byte, so each goes alone).
PER_TENSOR = 1


def _ring_line(n, alpha, bw):
  """(launch seconds, seconds per byte) of a ring all-reduce over n members."""
  if n <= 1:
    return 0.0, 0.0
  return 2 * (n - 1) * alpha, 2 * (n - 1) / n / bw


@functools.lru_cache(maxsize=None)
def _cost_model(gpus_per_node, intra_alpha, intra_bw, inter_alpha, inter_bw, gpus):
  k = min(gpus_per_node, gpus)
  nodes = math.ceil(gpus / k)
  if nodes == 1:
    ring = hierarchical = _ring_line(gpus, intra_alpha, intra_bw)
  else:
    ring = _ring_line(gpus, inter_alpha, inter_bw)
    local = _ring_line(k, intra_alpha, intra_bw)     # reduce in the node + broadcast back
    across = _ring_line(nodes, inter_alpha, inter_bw)
    hierarchical = (local[0] + across[0], local[1] + across[1])
  return CostModel({"ring": ring[0], "hierarchical": hierarchical[0]},
                   {"ring": ring[1], "hierarchical": hierarchical[1]},
                   description=f"alpha-beta model: {gpus} GPUs, {k} per node")


def cost_model(hw: Hardware, gpus: int) -> CostModel:
  """The all-reduce of `gpus` GPUs on `hw` as tf_fusion's own CostModel (see the module
  doc): both schemes are lines in the pack's bytes, so the library's predictions and
  its hybrid pick (CostModel.best, with its near-tie rule) are the model's."""
  return _cost_model(hw.gpus_per_node, hw.intra_alpha, hw.intra_bw, hw.inter_alpha,
                     hw.inter_bw, gpus)


def allreduce_seconds(scheme: str, nbytes: float, hw: Hardware, gpus: int) -> float:
  """One all-reduce of `nbytes` per GPU over `gpus` GPUs (see the module doc); "auto"
  is the scheme tf_fusion's hybrid all-reduce picks from the same cost model."""
  if scheme not in SCHEMES:
    raise ValueError(f"scheme={scheme!r}; valid: {', '.join(SCHEMES)}")
  if gpus <= 1:
    return 0.0
  model = cost_model(hw, gpus)
  return model.seconds(model.best(nbytes) if scheme == "auto" else scheme, nbytes)


def packs(layers: Sequence[Layer], pack_bytes: int, wire_bytes: int,
          backward_at: Sequence[float]) -> List[Tuple[float, float]]:
  """(bytes, ready seconds) per pack, in back-propagation order: tf_fusion's own
  packing (packing.plan_packs) of one tensor per weight at the wire's width.

  `backward_at[i]`: when layer i's backward pass is done; a pack is ready with its
  earliest layer. pack_bytes PER_TENSOR: one per tensor; 0: one pack.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_fusion import packing  # pylint: disable=g-import-not-at-top
  dtype = {2: tf.float16, 4: tf.float32}[wire_bytes]
  layer_of = [i for i, layer in enumerate(layers) for _ in layer.tensors]
  specs = [(dtype, tf.TensorShape([n])) for layer in layers for n in layer.tensors]
  return [(float(p.nbytes), backward_at[min(layer_of[k] for k in p.indices)])
          for p in packing.plan_packs(specs, pack_bytes)]


@dataclasses.dataclass(frozen=True)
class Config:
  scheme: str = "auto"
  pack_bytes: int = 32 << 20
  fp16_wire: bool = True
  overlap: bool = True
  dtype: str = "fp16"


def compute_seconds(layers, hw: Hardware, batch: int, dtype: str) -> Tuple[float, List[float]]:
  """(forward seconds, each layer's backward seconds) for `batch` images on one GPU."""
  rate = hw.peak_flops[dtype] * hw.efficiency
  return (sum(l.flops for l in layers) * batch / rate,
          [2 * l.flops * batch / rate for l in layers])


def step_seconds(model: str, hw: Hardware, gpus: int, batch: int,
                 config: Config = Config()) -> Dict[str, float]:
  """One step: compute, communication, exposed communication and total, in seconds."""
  layers = MODELS[model]()
  forward, backward = compute_seconds(layers, hw, batch, config.dtype)
  done, clock = [0.0] * len(layers), forward
  for i in reversed(range(len(layers))):
    clock += backward[i]
    done[i] = clock
  compute = forward + sum(backward)
  comm = [(ready, allreduce_seconds(config.scheme, size, hw, gpus))
          for size, ready in packs(layers, config.pack_bytes, 2 if config.fp16_wire else 4,
                                   done)]
  total_comm = sum(t for _, t in comm)
  if config.overlap:
    channel = 0.0
    for ready, t in comm:
      channel = max(channel, ready) + t
    end = max(compute, channel)
  else:
    end = compute + total_comm
  return dict(compute=compute, communication=total_comm, exposed=end - compute,
              total=end, packs=len(comm))


def best_pack_bytes(model, hw, gpus, batch, config) -> int:
  """The fusion threshold of 64 KiB ... 256 MiB (or one pack) with the fastest step."""
  grid = [0] + [1 << s for s in range(16, 29)]
  return min(grid, key=lambda p: (step_seconds(
      model, hw, gpus, batch, dataclasses.replace(config, pack_bytes=p))["total"], -p))


def ours(model, hw, gpus, batch) -> Config:
  """tf_fusion as the paper ran it: auto (hybrid), fused (threshold tuned), FP16 wire,
  overlap."""
  config = Config("auto", PER_TENSOR, True, True, "fp16")
  return dataclasses.replace(config, pack_bytes=best_pack_bytes(model, hw, gpus, batch,
                                                                config))


# The paper's baseline: NCCL's ring over every GPU, one collective per tensor, FP32
# gradients on the wire, FP16 compute.
NCCL_BASELINE = Config("ring", PER_TENSOR, False, True, "fp16")


def time_to_train(model, hw, gpus, global_batch, epochs, config=None) -> Dict[str, float]:
  batch = global_batch // gpus
  config = config or ours(model, hw, gpus, batch)
  step = step_seconds(model, hw, gpus, batch, config)
  steps = math.ceil(epochs * IMAGENET_TRAIN / global_batch)
  one = step_seconds(model, hw, 1, batch, config)["total"]
  return dict(step, steps=steps, minutes=steps * step["total"] / 60,
              efficiency=one / step["total"], pack_bytes=config.pack_bytes,
              images_per_sec=global_batch / step["total"])


PAPER = {  # (model, gpus, global batch, epochs) -> minutes (Jia et al. 2018 and the records it cites)
    ("resnet50", 2048, 65536, 90): 6.6,
    ("alexnet_bn", 1024, 65536, 95): 4.0,
}


def fit_p40_efficiency(target_minutes=6.6) -> float:
  """The P40 efficiency that gives ResNet-50 on 2048 GPUs the paper's time (bisection:
  time falls as efficiency rises)."""
  lo, hi = 0.01, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    hw = dataclasses.replace(HARDWARE["p40_roce"], efficiency=mid)
    if time_to_train("resnet50", hw, 2048, 65536, 90)["minutes"] > target_minutes:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


P40_EFFICIENCY_FITTED = fit_p40_efficiency()
HARDWARE["p40_roce"] = dataclasses.replace(HARDWARE["p40_roce"],
                                           efficiency=P40_EFFICIENCY_FITTED)


def machine_profile(sweep_json: str, images_per_sec: float, model="resnet50",
                    image_size=224) -> Hardware:
  """A profile of this machine from tools/fusion_sweep.py or allreduce_bench JSON.

  The calibrated ring constants (alpha, beta of one all-reduce over all the
  benchmark's devices) are turned into per-step constants of a ring of that size, used
  for the links inside and between "nodes" (a worker's logical CPUs) alike: on one
  host, loopback and shared memory are the same wires. Compute: `images_per_sec` of
  `model` at `image_size` pixels (FLOPs scale with the pixel count), e.g. the main job's
  figure at 32 pixels.
  """
  with open(sweep_json) as f:
    report = json.load(f)
  cm = report["cost_model"]
  devices = report.get("devices_per_worker") or 4
  n = devices * (report.get("workers") or 1)
  alpha = cm["alpha"]["ring"] / (2 * (n - 1))
  bw = 2 * (n - 1) / n / max(cm["beta"]["ring"], 1e-15)
  # Each replica is a "GPU": it has its share of the measured rate.
  rate = (3 * sum(l.flops for l in MODELS[model]()) * (image_size / 224) ** 2
          * images_per_sec / n)
  return Hardware(
      f"this machine ({n} logical CPU replicas, {devices} per worker)", devices,
      {"fp32": rate, "fp16": rate}, 1.0, intra_alpha=alpha, intra_bw=bw,
      inter_alpha=alpha, inter_bw=bw,
      sources={"all": f"fitted: ring alpha/beta from {sweep_json}; compute from "
                      f"{images_per_sec} images/s of {model} at {image_size} pixels"})


GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EPOCHS = {"resnet50": 90, "alexnet_bn": 95}
PER_GPU_BATCH = {"resnet50": 32, "alexnet_bn": 64}   # 64K at 2048 / 1024 GPUs


def schemes(model, hw, gpus, batch) -> Dict[str, Config]:
  """The configurations of the table: each all-reduce with tf_fusion's packing and FP16
  wire, and the NCCL-style baseline."""
  out = {}
  for scheme, name in (("ring", "ring (fused, fp16)"),
                       ("hierarchical", "hierarchical (fused, fp16)"),
                       ("auto", "auto (hybrid) = tf_fusion")):
    config = Config(scheme, PER_TENSOR, True, True, "fp16")
    out[name] = dataclasses.replace(
        config, pack_bytes=best_pack_bytes(model, hw, gpus, batch, config))
  out["NCCL ring, per tensor, fp32"] = NCCL_BASELINE
  return out


def table(model, hw) -> List[Dict]:
  rows = []
  batch = PER_GPU_BATCH[model]
  for gpus in GPU_COUNTS:
    for name, config in schemes(model, hw, gpus, batch).items():
      r = time_to_train(model, hw, gpus, gpus * batch, EPOCHS[model], config)
      rows.append(dict(model=model, hardware=hw.name, gpus=gpus, scheme=name,
                       global_batch=gpus * batch, **r))
  return rows


def reproduce() -> List[Dict]:
  """The paper's headline runs and the all-reduce speed-ups over NCCL at 1024 GPUs."""
  hw = HARDWARE["p40_roce"]
  out = []
  for (model, gpus, batch, epochs), minutes in PAPER.items():
    got = time_to_train(model, hw, gpus, batch, epochs)["minutes"]
    out.append(dict(run=f"{model} {epochs} epochs, {gpus} P40, batch {batch}",
                    paper_minutes=minutes, model_minutes=got,
                    error=got / minutes - 1,
                    kind="fitted" if model == "resnet50" else "predicted"))
  for model, paper in (("alexnet_bn", 3.0), ("resnet50", 11.0)):
    batch = 65536 // 1024
    best = step_seconds(model, hw, 1024, batch, ours(model, hw, 1024, batch))
    nccl = step_seconds(model, hw, 1024, batch, NCCL_BASELINE)
    out.append(dict(run=f"{model}: all-reduce time, NCCL / tf_fusion, 1024 P40",
                    paper_speedup=paper,
                    model_speedup=nccl["communication"] / best["communication"],
                    step_speedup=nccl["total"] / best["total"], kind="predicted"))
  return out


def print_report(rows, checks):
  print("Reproducing Jia et al. 2018 (P40 profile; one constant fitted, see HARDWARE):")
  for c in checks:
    if "paper_minutes" in c:
      print(f"  {c['run']:48s} paper {c['paper_minutes']:4.1f} min, model "
            f"{c['model_minutes']:5.2f} min ({100 * c['error']:+.1f}%, {c['kind']})")
    else:
      print(f"  {c['run']:48s} paper {c['paper_speedup']:4.1f}x, model "
            f"{c['model_speedup']:5.1f}x (whole step {c['step_speedup']:.1f}x)")
  for key in dict.fromkeys((r["model"], r["hardware"]) for r in rows):
    sub = [r for r in rows if (r["model"], r["hardware"]) == key]
    names = list(dict.fromkeys(r["scheme"] for r in sub))
    print(f"\n{key[0]}, {EPOCHS[key[0]]} epochs, {PER_GPU_BATCH[key[0]]} images per GPU; "
          f"{key[1]}\n  minutes to train / scaling efficiency")
    print(f"{'GPUs':>6s} " + " ".join(f"{n:>28s}" for n in names))
    for gpus in GPU_COUNTS:
      cells = [next(r for r in sub if r["gpus"] == gpus and r["scheme"] == n) for n in names]
      print(f"{gpus:6d} " + " ".join(
          f"{r['minutes']:12.2f} min {100 * r['efficiency']:6.1f}%    " for r in cells))


def plot(rows, path):
  """One row of panels per hardware profile: minutes to train and scaling efficiency
  per model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  models = list(dict.fromkeys(r["model"] for r in rows))
  profiles = list(dict.fromkeys(r["hardware"] for r in rows))
  fig, axes = plt.subplots(len(profiles), 2 * len(models),
                           figsize=(4.2 * 2 * len(models), 3.2 * len(profiles)),
                           squeeze=False)
  for i, hardware in enumerate(profiles):
    for j, model in enumerate(models):
      sub = [r for r in rows if r["model"] == model and r["hardware"] == hardware]
      time_ax, eff_ax = axes[i][2 * j], axes[i][2 * j + 1]
      for name in dict.fromkeys(r["scheme"] for r in sub):
        rs = [r for r in sub if r["scheme"] == name]
        g = [r["gpus"] for r in rs]
        time_ax.plot(g, [r["minutes"] for r in rs], "o-", ms=3, label=name)
        eff_ax.plot(g, [100 * r["efficiency"] for r in rs], "o-", ms=3, label=name)
      time_ax.set_title(f"{model}, {hardware.split(',')[0]}", fontsize=8)
      time_ax.set_yscale("log")
      time_ax.set_ylabel("minutes to train")
      eff_ax.set_ylabel("scaling efficiency, %")
      for ax in (time_ax, eff_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
      eff_ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hardware", default="p40_roce",
                 help=f"comma-separated: {', '.join(HARDWARE)}")
  p.add_argument("--models", default="resnet50,alexnet_bn")
  p.add_argument("--machine_json", default="",
                 help="tools/fusion_sweep.py JSON: add a profile of this machine")
  p.add_argument("--machine_images_per_sec", type=float, default=0.0,
                 help="with --machine_json: ResNet-50 images/s measured on all the "
                 "sweep's replicas together")
  p.add_argument("--machine_image_size", type=int, default=224,
                 help="the image size that images/s was measured at")
  p.add_argument("--out_dir", default="out/scaling_model")
  args = p.parse_args(argv)
  profiles = []
  for name in filter(None, args.hardware.split(",")):
    if name not in HARDWARE:
      p.error(f"unknown --hardware {name!r}; valid: {', '.join(HARDWARE)}")
    profiles.append(HARDWARE[name])
  if args.machine_json:
    if args.machine_images_per_sec <= 0:
      p.error("--machine_json needs --machine_images_per_sec > 0")
    profiles.append(machine_profile(args.machine_json, args.machine_images_per_sec,
                                    image_size=args.machine_image_size))
  rows = [r for hw in profiles for m in args.models.split(",") for r in table(m, hw)]
  checks = reproduce()
  print_report(rows, checks)
  print("\nAssumptions and sources:")
  for hw in profiles:
    for field, source in hw.sources.items():
      print(f"  {hw.name.split(',')[0]}: {field}: {source}")
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, "scaling_model.json"), "w") as f:
    json.dump(dict(checks=checks, rows=rows,
                   hardware={hw.name: dataclasses.asdict(hw) for hw in profiles}), f,
              indent=2)
  plot(rows, os.path.join(args.out_dir, "scaling_model.png"))
  print(f"\nwrote {args.out_dir}/scaling_model.json and scaling_model.png")
  return rows, checks


if __name__ == "__main__":
  main()
