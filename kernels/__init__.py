"""vmamba_kernels: one selective-scan library for every 2D scan of the vision-Mamba zoo.

- ``selective_scan``: mamba_ssm's selective scan (drop-in for ``selective_scan_fn``).
- ``selective_scan_states``: every hidden state, for structure-aware state fusion.
- ``selective_scan_2d``: the fused gather → scan → scatter/merge over 2D routes, channels-last.
- ``dilated_dwconv_sum``: a sum of dilated depthwise convs with replicated borders (Spatial-Mamba's state
  fusion), one fused kernel on CUDA.
- ``layer_norm``: LayerNorm over the last dim (one affine, or one per group), one fused kernel on CUDA.
- ``scan_routes`` / ``scan_directions``: the families' scan orders as (K, L) index tensors.
- ``fvcore_handles``: FLOP handles in the papers' convention (also registered with torch's flop counter).

Backends: "reference" (pure PyTorch, any device), "triton" (fused GPU kernels), "auto" (triton on CUDA
when available, else reference). This package imports only torch (triton lazily).
"""
from .dwconv import dilated_dwconv_sum, dilated_dwconv_sum_ref
from .norm import layer_norm, layer_norm_ref
from .ops import BACKENDS, resolve_backend, selective_scan, selective_scan_2d, selective_scan_states, triton_available
from .reference import selective_scan_2d_ref, selective_scan_ref, selective_scan_states_ref
from .routes import DIRECTION_IDS, ROUTE_NAMES, scan_directions, scan_routes
from .flops import fvcore_handles, scan_flops

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DIRECTION_IDS",
    "dilated_dwconv_sum",
    "dilated_dwconv_sum_ref",
    "layer_norm",
    "layer_norm_ref",
    "ROUTE_NAMES",
    "fvcore_handles",
    "resolve_backend",
    "scan_directions",
    "scan_flops",
    "scan_routes",
    "selective_scan",
    "selective_scan_2d",
    "selective_scan_2d_ref",
    "selective_scan_ref",
    "selective_scan_states",
    "selective_scan_states_ref",
    "triton_available",
]
