"""AlexNet-BN for Keras 3: AlexNet with batch norm, as trained at 64K batch by Jia et al.

Batch norm replaces local response normalisation: after conv1-conv4 and after pool5
(the paper's addition), and after fc6 and fc7, each before its ReLU; layers followed by
batch norm carry no bias. Dropout is left out (batch norm regularises; You et al. 2017
trained AlexNet-BN that way). conv1 is padded "same" so a 224 image gives pool5 of
6x6x256, the 9,216 features of the original 227-pixel net. The classifier computes in
float32 whatever the dtype policy.

References:
  Krizhevsky et al. 2012; Ioffe & Szegedy 2015; You, Gitman, Ginsburg 2017
  (arXiv:1708.03888); Jia et al. 2018 (arXiv:1807.11205), §3.
"""

import keras
from keras import layers

BN_MOMENTUM = 0.9
# conv1 stride 4 and three 3x3/2 valid pools: the smallest side that leaves pool5 1x1.
MIN_IMAGE_SIZE = 57


def _bn_relu(x, name):
  x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name=f"{name}_bn")(x)
  return layers.ReLU(name=f"{name}_relu")(x)


def _conv(x, filters, kernel, stride, name, bias=False):
  return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=bias,
                       kernel_initializer="he_normal", name=name)(x)


def _pool(x, name):
  return layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)


def alexnet_bn(num_classes=1000, image_size=224):
  """The Keras model: images [B, S, S, 3] (normalised) -> float32 logits [B, classes]."""
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"alexnet_bn needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}.")
  inputs = keras.Input((image_size, image_size, 3), name="images")
  x = _pool(_bn_relu(_conv(inputs, 96, 11, 4, "conv1"), "conv1"), "pool1")
  x = _pool(_bn_relu(_conv(x, 256, 5, 1, "conv2"), "conv2"), "pool2")
  x = _bn_relu(_conv(x, 384, 3, 1, "conv3"), "conv3")
  x = _bn_relu(_conv(x, 384, 3, 1, "conv4"), "conv4")
  x = layers.ReLU(name="conv5_relu")(_conv(x, 256, 3, 1, "conv5", bias=True))
  x = _pool(x, "pool5")
  x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name="pool5_bn")(x)
  x = layers.Flatten(name="flatten")(x)
  for name in ("fc6", "fc7"):
    x = layers.Dense(4096, use_bias=False, kernel_initializer="he_normal", name=name)(x)
    x = _bn_relu(x, name)
  logits = layers.Dense(num_classes, dtype="float32", name="logits",
                        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(x)
  return keras.Model(inputs, logits, name="alexnet_bn")
