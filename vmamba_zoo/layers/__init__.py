"""Reusable blocks of the zoo: family-agnostic, built on vmamba_kernels."""
from .state_fusion import StateFusion, merge_dilated_kernels
from .routes import device_routes

__all__ = ["StateFusion", "device_routes", "merge_dilated_kernels"]
