"""Fused Triton kernels for the selective scan (GPU; CPU under TRITON_INTERPRET=1).

This package is the Triton implementation of ``vmamba_kernels.backend.SavingScanBackend``: forward and backward
of ``selective_scan``, ``selective_scan_states`` and ``selective_scan_2d``, which ``vmamba_kernels.ops`` calls.
Importing it imports triton; the rest of ``vmamba_kernels`` does not.

- ``tiles``: the tile configurations, the tuners that pick one per problem, and the committed tile table;
- ``launches``: each op as a problem of K scans, its kernel arguments and its launch;
- ``backend``: the backend functions built from those launches;
- ``scan`` / ``scan_n1`` / ``scan_steps``: the kernels (general; d_state 1; the forward with d_state > 1, step by
  step); ``route_plan``: what they need to know about a route set.
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
    set_adjoint_scan,
    set_atomic_merge,
    set_n1_kernel,
    set_steps_kernel,
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
    "set_adjoint_scan",
    "set_atomic_merge",
    "set_n1_kernel",
    "set_steps_kernel",
]
