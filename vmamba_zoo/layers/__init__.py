"""Reusable blocks of the zoo: family-agnostic, built on vmamba_kernels."""
from .state_fusion import StateFusion, merge_dilated_kernels

__all__ = ["StateFusion", "merge_dilated_kernels"]
