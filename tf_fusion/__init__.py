"""tf_fusion: fast large-batch data-parallel training for TensorFlow 2 / Keras 3.

Tensor fusion, FP16 on the wire and per-pack choice of all-reduce algorithm, after
Jia et al. 2018, "Training ImageNet in Four Minutes" (arXiv:1807.11205).
"""

from tf_fusion import callbacks
from tf_fusion import cluster
from tf_fusion import mixed_precision
from tf_fusion.cost_model import CostModel
from tf_fusion.calibration import calibrate
from tf_fusion.compression import Compression
from tf_fusion.cross_device_ops import FusedAllReduce
from tf_fusion.cross_device_ops import MultiWorkerFusedAllReduce
from tf_fusion.optimizers import LAMB
from tf_fusion.optimizers import LARS
from tf_fusion.options import FusionOptions
from tf_fusion.preemption import SaveOnPreemption
from tf_fusion.stall import StallWatch
from tf_fusion.stats import PackPlan
from tf_fusion.strategy import fused_ops_of
from tf_fusion.strategy import mirrored_strategy
from tf_fusion.strategy import multi_worker_strategy

from tf_fusion import keras_paths as _keras_paths

_keras_paths.install()

__version__ = "0.1.0"

# The public API in one list: the names below (__all__) and the modules users import by
# name. tools/api_docs.py renders these modules; tests/test_api_docs.py checks that the
# recipes use nothing else of tf_fusion.
PUBLIC_MODULES = (
    "tf_fusion", "tf_fusion.options", "tf_fusion.strategy", "tf_fusion.cross_device_ops",
    "tf_fusion.compression", "tf_fusion.cost_model", "tf_fusion.calibration",
    "tf_fusion.stats", "tf_fusion.plans", "tf_fusion.optimizers",
    "tf_fusion.optimizers.lars", "tf_fusion.optimizers.lamb", "tf_fusion.mixed_precision",
    "tf_fusion.callbacks", "tf_fusion.cluster", "tf_fusion.stall", "tf_fusion.preemption",
    "tf_fusion.launch", "tf_fusion.no_communication",
)

__all__ = [
    "Compression",
    "CostModel",
    "FusedAllReduce",
    "FusionOptions",
    "LAMB",
    "LARS",
    "MultiWorkerFusedAllReduce",
    "PackPlan",
    "SaveOnPreemption",
    "StallWatch",
    "calibrate",
    "callbacks",
    "cluster",
    "fused_ops_of",
    "mirrored_strategy",
    "mixed_precision",
    "multi_worker_strategy",
    "__version__",
]
