"""What the scaling model (tools/scaling_model.py) is given: the networks as layer
tables (parameters per trainable tensor, forward FLOPs per image) and the GPU clusters
as hardware constants, each with its source.
"""

import dataclasses
from typing import Dict, List, Tuple


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  tensors: Tuple[int, ...]      # parameter count of each trainable tensor
  flops: float                  # forward FLOPs per image (multiply-add = 2)


def _conv(name, k, cin, cout, hw, bias=False):
  tensors = (k * k * cin * cout,) + ((cout,) if bias else ())
  return Layer(name, tensors, 2.0 * k * k * cin * cout * hw * hw)


def _bn(name, c, hw):
  return Layer(name, (c, c), 4.0 * c * hw * hw)


def _dense(name, cin, cout, bias):
  return Layer(name, (cin * cout,) + ((cout,) if bias else ()), 2.0 * cin * cout)


def resnet50_layers() -> List[Layer]:
  """ResNet-50 v1.5 at 224 pixels (stride in the 3x3 conv, no conv biases): 161
  trainable tensors, 25.6M parameters, ~8.2 GFLOPs forward."""
  out = [_conv("conv1", 7, 3, 64, 112), _bn("bn1", 64, 112)]
  cin, hw = 64, 56
  for stage, (blocks, mid, cout) in enumerate(((3, 64, 256), (4, 128, 512),
                                               (6, 256, 1024), (3, 512, 2048))):
    for b in range(blocks):
      name = f"s{stage + 1}b{b + 1}"
      out_hw = hw // 2 if (b == 0 and stage > 0) else hw
      out += [_conv(f"{name}_1x1a", 1, cin, mid, hw), _bn(f"{name}_bna", mid, hw),
              _conv(f"{name}_3x3", 3, mid, mid, out_hw), _bn(f"{name}_bnb", mid, out_hw),
              _conv(f"{name}_1x1b", 1, mid, cout, out_hw), _bn(f"{name}_bnc", cout, out_hw)]
      if b == 0:
        out += [_conv(f"{name}_proj", 1, cin, cout, out_hw),
                _bn(f"{name}_bnp", cout, out_hw)]
      cin, hw = cout, out_hw
  return out + [_dense("fc", 2048, 1000, bias=True)]


def alexnet_bn_layers() -> List[Layer]:
  """AlexNet-BN as official_recipes/imagenet/models/alexnet.py builds it at 224 pixels:
  62.4M parameters (58.6M in fc6-fc8), ~1.4 GFLOPs forward."""
  return [_conv("conv1", 11, 3, 96, 56), _bn("bn1", 96, 56),
          _conv("conv2", 5, 96, 256, 27), _bn("bn2", 256, 27),
          _conv("conv3", 3, 256, 384, 13), _bn("bn3", 384, 13),
          _conv("conv4", 3, 384, 384, 13), _bn("bn4", 384, 13),
          _conv("conv5", 3, 384, 256, 13, bias=True), _bn("pool5_bn", 256, 6),
          _dense("fc6", 9216, 4096, bias=False), _bn("bn6", 4096, 1),
          _dense("fc7", 4096, 4096, bias=False), _bn("bn7", 4096, 1),
          _dense("fc8", 4096, 1000, bias=True)]


MODELS = {"resnet50": resnet50_layers, "alexnet_bn": alexnet_bn_layers}


@dataclasses.dataclass(frozen=True)
class Hardware:
  """A GPU cluster: per-GPU compute, and the links inside and between nodes.

  Attributes:
    peak_flops: per GPU, by compute dtype ("fp32", "fp16").
    efficiency: the fraction of peak that conv-net training reaches.
    intra_alpha, intra_bw: seconds per step and bytes/s of a GPU's link in the node.
    inter_alpha, inter_bw: seconds per step and bytes/s of a node's network link.
    sources: where each constant comes from.
  """

  name: str
  gpus_per_node: int
  peak_flops: Dict[str, float]
  efficiency: float
  intra_alpha: float
  intra_bw: float
  inter_alpha: float
  inter_bw: float
  sources: Dict[str, str] = dataclasses.field(default_factory=dict)


HARDWARE = {
    "p40_roce": Hardware(
        "Tesla P40, 8 per node, PCIe 3.0, 100 Gb/s RoCE (Jia et al. 2018)", 8,
        {"fp32": 11.76e12, "fp16": 11.76e12}, efficiency=0.5,
        intra_alpha=10e-6, intra_bw=12e9, inter_alpha=20e-6, inter_bw=12.5e9,
        sources={
            "gpus_per_node, inter_bw": "Jia et al. 2018: 8 P40 per node, 100 Gb/s RoCE",
            "peak_flops": "NVIDIA Tesla P40 datasheet: 11.76 TFLOPS FP32; the P40 has "
                          "no fast FP16 arithmetic (1/64 rate), so the paper's FP16 is "
                          "modelled as FP32-rate compute",
            "efficiency": "FITTED: ResNet-50, 2048 GPUs, 64K batch, 90 epochs = 6.6 min",
            "intra_bw": "assumption: PCIe 3.0 x16, 15.75 GB/s theoretical, ~12 GB/s "
                        "achieved",
            "intra_alpha, inter_alpha": "assumption: 10 us per PCIe step, 20 us per "
                                        "RDMA step (NCCL-era ring step latencies)"}),
    "v100_ib": Hardware(
        "Tesla V100 SXM2, 8 per node (NVLink), 4x100 Gb/s InfiniBand EDR", 8,
        {"fp32": 15.7e12, "fp16": 125e12}, efficiency=0.28,
        intra_alpha=5e-6, intra_bw=130e9, inter_alpha=5e-6, inter_bw=50e9,
        sources={
            "peak_flops": "NVIDIA V100 datasheet: 15.7 TFLOPS FP32, 125 TFLOPS tensor",
            "efficiency": "assumption: ~1,400 ResNet-50 images/s per V100 in mixed "
                          "precision (NVIDIA's published training figures, unverified)",
            "intra_bw": "assumption: NCCL all-reduce bus bandwidth on a DGX-1, ~130 GB/s",
            "inter_bw": "4 x 100 Gb/s EDR per node = 50 GB/s",
            "intra_alpha, inter_alpha": "assumption: 5 us per step"}),
    "a100_nvlink": Hardware(
        "A100 SXM 80GB, 8 per node (NVLink 3, NVSwitch), 8x200 Gb/s InfiniBand HDR", 8,
        {"fp32": 19.5e12, "fp16": 312e12}, efficiency=0.1,
        intra_alpha=4e-6, intra_bw=230e9, inter_alpha=5e-6, inter_bw=200e9,
        sources={
            "peak_flops": "NVIDIA A100 datasheet: 19.5 TFLOPS FP32, 312 TFLOPS FP16 "
                          "dense",
            "efficiency": "assumption: ~2,500 ResNet-50 images/s per A100 in mixed "
                          "precision (NVIDIA's published training figures, unverified)",
            "intra_bw": "assumption: NCCL all-reduce bus bandwidth inside a DGX A100 "
                        "(NVLink 3 through NVSwitch), ~230 GB/s; the one-node profile: "
                        "up to 8 GPUs the model uses only these constants",
            "inter_bw": "8 x 200 Gb/s HDR per node = 200 GB/s",
            "intra_alpha, inter_alpha": "assumption: 4 us / 5 us per step"}),
    "h100_ib": Hardware(
        "H100 SXM, 8 per node (NVLink 4), 8x400 Gb/s InfiniBand NDR", 8,
        {"fp32": 67e12, "fp16": 989e12}, efficiency=0.08,
        intra_alpha=3e-6, intra_bw=360e9, inter_alpha=5e-6, inter_bw=400e9,
        sources={
            "peak_flops": "NVIDIA H100 SXM datasheet: 67 TFLOPS FP32, 989 TFLOPS BF16 "
                          "dense",
            "efficiency": "assumption: ~3,200 ResNet-50 images/s per H100 (the conv "
                          "net does not fill the tensor cores; unverified)",
            "intra_bw": "assumption: NCCL all-reduce bus bandwidth on NVLink 4, "
                        "~360 GB/s",
            "inter_bw": "8 x 400 Gb/s NDR per node = 400 GB/s",
            "intra_alpha, inter_alpha": "assumption: 3 us / 5 us per step"}),
}
