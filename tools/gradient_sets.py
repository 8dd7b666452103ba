"""Gradient shapes of the networks the benchmarks reduce, in variable (forward) order."""

import numpy as np


def resnet50_shapes():
  """ResNet-50's 214 trainable variables (25.6M parameters), from keras.applications."""
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.applications.ResNet50(weights=None)
  return [tuple(v.shape) for v in model.trainable_variables]


def alexnet_bn_shapes():
  """AlexNet-BN (Jia et al. 2018): BN after each conv and FC layer, conv/FC without
  bias where a BN follows; ~62M parameters, dominated by the FC layers."""
  layers = [((11, 11, 3, 96), 96), ((5, 5, 96, 256), 256), ((3, 3, 256, 384), 384),
            ((3, 3, 384, 384), 384), ((3, 3, 384, 256), 256), ((9216, 4096), 4096),
            ((4096, 4096), 4096)]
  shapes = []
  for kernel, channels in layers:
    shapes += [kernel, (channels,), (channels,)]  # kernel, BN gamma, BN beta
  shapes += [(4096, 1000), (1000,)]
  return shapes


SETS = {"resnet50": resnet50_shapes, "alexnet_bn": alexnet_bn_shapes}


def describe(shapes):
  params = int(sum(np.prod(s) for s in shapes))
  return f"{len(shapes)} tensors, {params / 1e6:.1f}M params, {params * 4 / 2**20:.1f} MiB"
