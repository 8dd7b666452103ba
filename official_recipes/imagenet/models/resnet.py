"""ResNet-50 v1.5 for Keras 3, as trained by Jia et al. 2018 and TF Model Garden.

v1.5 puts the stride-2 of each down-sampling block on the 3x3 convolution (not the first
1x1), which costs a little speed for ~0.5% top-1. The last batch norm of each residual
block starts with gamma = 0, so every block starts as the identity: large-batch training
is stable from the first steps (Goyal et al. 2017, §5.1; Jia et al. 2018, §3).
Convolutions carry no bias (batch norm follows); the classifier computes in float32
whatever the dtype policy, so logits and softmax stay in FP32 under mixed precision.
25,557,032 parameters for 1000 classes, as in torchvision's resnet50.

References:
  He et al. 2016, arXiv:1512.03385; Goyal et al. 2017, arXiv:1706.02677.
"""

import keras
from keras import layers

STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))   # (filters, blocks)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _conv(x, filters, kernel, stride, name):
  return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                       kernel_initializer="he_normal", name=name)(x)


def _bn(x, name, zero_gamma=False):
  return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                   gamma_initializer="zeros" if zero_gamma else "ones",
                                   name=name)(x)


def bottleneck(x, filters, stride, name):
  """1x1 -> 3x3 (stride here: v1.5) -> 1x1 x4, plus a projection when shapes change."""
  shortcut = x
  if stride != 1 or x.shape[-1] != 4 * filters:
    shortcut = _bn(_conv(x, 4 * filters, 1, stride, f"{name}_proj_conv"), f"{name}_proj_bn")
  x = layers.ReLU(name=f"{name}_relu1")(_bn(_conv(x, filters, 1, 1, f"{name}_conv1"),
                                            f"{name}_bn1"))
  x = layers.ReLU(name=f"{name}_relu2")(_bn(_conv(x, filters, 3, stride, f"{name}_conv2"),
                                            f"{name}_bn2"))
  x = _bn(_conv(x, 4 * filters, 1, 1, f"{name}_conv3"), f"{name}_bn3", zero_gamma=True)
  return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, shortcut]))


def resnet50(num_classes=1000, image_size=224):
  """The Keras model: images [B, S, S, 3] (normalised) -> float32 logits [B, classes]."""
  inputs = keras.Input((image_size, image_size, 3), name="images")
  x = _bn(_conv(inputs, 64, 7, 2, "stem_conv"), "stem_bn")
  x = layers.ReLU(name="stem_relu")(x)
  x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
  for stage, (filters, blocks) in enumerate(STAGES):
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      x = bottleneck(x, filters, stride, f"stage{stage + 1}_block{block + 1}")
  x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
  logits = layers.Dense(num_classes, dtype="float32", name="logits",
                        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(x)
  return keras.Model(inputs, logits, name="resnet50_v1_5")
