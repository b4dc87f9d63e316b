"""Fused Triton kernels for the selective scan (GPU; CPU under TRITON_INTERPRET=1).

The six backend functions of ``vmamba_kernels.ops`` (forward and backward of ``selective_scan``,
``selective_scan_states`` and ``selective_scan_2d``). Importing this package imports triton; the rest of
``vmamba_kernels`` does not.
"""
from .backend import (
    chunk_size,
    chunk_states_shape,
    selective_scan_2d_bwd,
    selective_scan_2d_bwd_from_saved,
    selective_scan_2d_fwd,
    selective_scan_2d_fwd_saving,
    selective_scan_bwd,
    selective_scan_fwd,
    selective_scan_states_bwd,
    selective_scan_states_fwd,
    set_atomic_merge,
    set_n1_kernel,
)

__all__ = [
    "chunk_size",
    "chunk_states_shape",
    "selective_scan_2d_bwd",
    "selective_scan_2d_bwd_from_saved",
    "selective_scan_2d_fwd",
    "selective_scan_2d_fwd_saving",
    "selective_scan_bwd",
    "selective_scan_fwd",
    "selective_scan_states_bwd",
    "selective_scan_states_fwd",
    "set_atomic_merge",
    "set_n1_kernel",
]
