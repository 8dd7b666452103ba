"""What the sharded weight update is worth at scale: the scaling model's step with the
optimizer's update added, replicated against sharded, and the optimizer state per GPU.

  python -m tools.scaling_sharded                 # ResNet-50 + LARS, BERT-large + LAMB
  python -m tools.scaling_sharded --gpus 256,2048 --hardware p40_roce,h100_ib

On top of tools.scaling_model (compute from FLOPs, the gradients' all-reduce by the
alpha-beta model, overlapped with back-propagation), per step:
- the update is memory-bound: it touches `BYTES_PER_PARAMETER[optimizer]` bytes of FP32
  per parameter (LARS: w, g, v read, v and w written, w and g read again for the norms;
  LAMB: w, g, m, v read, m, v written, the update written and read twice for its norm,
  w written) at the GPU's memory bandwidth (`HBM_BW`), after the all-reduce;
- replicated: every GPU runs the whole update;
- sharded: the gradients are reduce-scattered (half an all-reduce's steps and bytes, so
  the same model at twice the bandwidth and half the latency, overlapped as before),
  each GPU updates 1/N of the parameters, plus a copy of its block into its state (8 B
  per parameter / N) and a write of the gathered weights into its copy (8 B per
  parameter); then the FP32 weights are all-gathered (half an all-reduce of 4 B per
  parameter), after the update, exposed. With a 16-bit gradient wire the sharded step
  moves 1.5x the bytes of the replicated one (the weights return in FP32, exactly).
- state: FP32 slots per parameter (LARS 1, LAMB 2), whole or 1/N per GPU.
Every constant beyond scaling_model's is in HBM_BW and BYTES_PER_PARAMETER, with its
source; the model is an estimate, not a measurement.
"""

import argparse
import dataclasses
from typing import Dict, List

from tools import scaling_model as sm

HBM_BW = {   # bytes/s of one GPU's memory; datasheets
    "p40_roce": 346e9,      # Tesla P40: 346 GB/s GDDR5
    "v100_ib": 900e9,       # V100 SXM2: 900 GB/s HBM2
    "a100_nvlink": 2039e9,  # A100 SXM 80GB: 2,039 GB/s HBM2e
    "h100_ib": 3350e9,      # H100 SXM: 3.35 TB/s HBM3
}
# FP32 bytes the update reads and writes per parameter (module doc), and its slots.
BYTES_PER_PARAMETER = {"lars": 28, "lamb": 44}
SLOTS = {"lars": 1, "lamb": 2}
WORKLOADS = {   # model, optimizer, per-GPU batch (64K images / 64K sequences on 2048)
    "resnet50_lars": ("resnet50", "lars", 32),
    "bert_large_lamb": ("bert_large", "lamb", 32),
}


def bert_large_layers(seq=128, predictions=20, vocab=30522) -> List[sm.Layer]:
  """BERT-large (24 x 1024, FFN 4096, 16 heads) pre-training at `seq` tokens with
  `predictions` masked positions per sequence: 335M parameters; FLOPs per sequence."""
  h, f = 1024, 4096
  out = [sm.Layer("embeddings", (vocab * h, 512 * h, 2 * h, h, h), 0.0)]
  for i in range(24):
    attention = 2.0 * 4 * h * h * seq + 2 * 2.0 * seq * seq * h
    out.append(sm.Layer(f"layer{i}_attention", (h * h, h) * 4 + (h, h), attention))
    out.append(sm.Layer(f"layer{i}_ffn", (h * f, f, f * h, h, h, h), 2.0 * 2 * h * f * seq))
  out.append(sm.Layer("mlm_head", (h * h, h, h, h, vocab),
                      2.0 * (h * h + h * vocab) * predictions))
  return out


sm.MODELS.setdefault("bert_large", bert_large_layers)


def parameters(model) -> int:
  return sum(sum(l.tensors) for l in sm.MODELS[model]())


def step(workload, hw_name, gpus) -> Dict[str, float]:
  """Milliseconds of one step, replicated and sharded, and state MB per GPU."""
  model, optimizer, batch = WORKLOADS[workload]
  hw = sm.HARDWARE[hw_name]
  params = parameters(model)
  config = sm.ours(model, hw, gpus, batch)
  base = sm.step_seconds(model, hw, gpus, batch, config)
  update = params * BYTES_PER_PARAMETER[optimizer] / HBM_BW[hw_name]
  half = dataclasses.replace(hw, intra_bw=2 * hw.intra_bw, inter_bw=2 * hw.inter_bw,
                             intra_alpha=hw.intra_alpha / 2, inter_alpha=hw.inter_alpha / 2)
  scattered = sm.step_seconds(model, half, gpus, batch, config)
  gather = sm.allreduce_seconds(config.scheme, 4.0 * params, half, gpus)
  copies = (8.0 * params / gpus + 8.0 * params) / HBM_BW[hw_name]
  replicated = base["total"] + update
  sharded = scattered["total"] + update / gpus + copies + gather
  state = 4.0 * SLOTS[optimizer] * params / 2**20
  return dict(workload=workload, hardware=hw_name, gpus=gpus, batch_per_gpu=batch,
              parameters=params, compute_ms=1e3 * base["compute"],
              update_ms=1e3 * update, replicated_ms=1e3 * replicated,
              sharded_ms=1e3 * sharded, speedup=replicated / sharded,
              update_share=update / replicated, state_mb_replicated=state,
              state_mb_sharded=state / gpus)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpus", default="8,64,512,2048")
  p.add_argument("--hardware", default="p40_roce,v100_ib,h100_ib")
  p.add_argument("--workloads", default=",".join(WORKLOADS))
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  rows = [step(w, hw, int(g)) for w in args.workloads.split(",")
          for hw in args.hardware.split(",") for g in args.gpus.split(",")]
  print(f"{'workload':>16s} {'hardware':>12s} {'gpus':>5s} {'compute':>8s} {'update':>7s} "
        f"{'replicated':>10s} {'sharded':>8s} {'speedup':>7s} {'state MB rep':>12s} "
        f"{'sharded':>8s}")
  for r in rows:
    print(f"{r['workload']:>16s} {r['hardware']:>12s} {r['gpus']:5d} {r['compute_ms']:8.1f} "
          f"{r['update_ms']:7.2f} {r['replicated_ms']:10.1f} {r['sharded_ms']:8.1f} "
          f"{r['speedup']:7.3f} {r['state_mb_replicated']:12.0f} "
          f"{r['state_mb_sharded']:8.2f}")
  return rows


if __name__ == "__main__":
  main()
