"""Optimizers for large-batch training."""

from tf_fusion.optimizers.lamb import LAMB
from tf_fusion.optimizers.lars import LARS

__all__ = ["LAMB", "LARS"]
