"""A pytest plugin that points Keras's own optimizer tests (shipped in the Keras wheel)
at tf_fusion: every `SGD` they build is a `tf_fusion.LARS` set up to take SGD's steps,
every LossScaleOptimizer is tf_fusion's.

LARS with no variable adapted (every path excluded from the trust ratio) is momentum
SGD: v = m v + lr g, w -= v, as Keras's SGD (v = m v - lr g, w += v). What the tests
then check is LARS's contract as a Keras optimizer: clipping, EMA, gradient
accumulation, loss scaling, saving, naming, raw tf.Variables, sparse gradients, under
tf.distribute too. Used by tests/test_keras_optimizer_suite.py:
    python -m pytest -p tests.harness.keras_retarget <keras test files>
"""

import keras
from keras.src import optimizers as keras_optimizers
from keras.src.optimizers import loss_scale_optimizer as keras_lso_module
from keras.src.optimizers import sgd as keras_sgd_module

import tf_fusion


@keras.saving.register_keras_serializable(package="tf_fusion_tests")
class SGD(tf_fusion.LARS):
  """tf_fusion.LARS with SGD's arguments and defaults and no trust ratio (the class is
  called SGD so that Keras names it "sgd", "sgd_1", ... as the tests expect)."""

  def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False,
               weight_decay=None, exclude_from_layer_adaptation=(".*",), eta=0.001,
               **kwargs):
    super().__init__(learning_rate=learning_rate, momentum=momentum,
                     nesterov=nesterov, weight_decay=weight_decay, eta=eta,
                     exclude_from_layer_adaptation=exclude_from_layer_adaptation,
                     **kwargs)


LossScaleOptimizer = tf_fusion.mixed_precision.LossScaleOptimizer

# Where the tests look the classes up: `optimizers.SGD(...)`, `from ...sgd import SGD`,
# `from ...loss_scale_optimizer import LossScaleOptimizer`.
for _module in (keras_optimizers, keras_sgd_module, keras.optimizers):
  _module.SGD = SGD
for _module in (keras_optimizers, keras_lso_module, keras.optimizers):
  _module.LossScaleOptimizer = LossScaleOptimizer
