"""Optimizers for large-batch training."""

from tf_fusion.optimizers.lars import LARS

__all__ = ["LARS"]
