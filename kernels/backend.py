"""The interface every selective-scan backend implements; ``vmamba_kernels.ops`` picks one per call.

Two implementations:
- ``vmamba_kernels.reference.ReferenceBackend``: pure PyTorch on any device (the CPU path, and the path of
  fp64 inputs on every backend);
- the module ``vmamba_kernels.triton``: the fused Triton kernels (GPU).

The ops hand a backend validated tensors and take its results as they are; the custom ops in ``ops`` own
autograd, fake implementations and contiguity. Backward functions return one gradient per differentiable
input, None for an absent input.
"""
from typing import Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ScanBackend", "SavingScanBackend"]

Grads = Tuple[Optional[Tensor], ...]


@runtime_checkable
class ScanBackend(Protocol):
    """Forward and backward of the three ops. Shapes are those of the public ops in ``vmamba_kernels.ops``."""

    def selective_scan_fwd(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool
                           ) -> Tuple[Tensor, Tensor]:
        """(out, last_state): out (Bt, Dm, L) in u's dtype, last_state (Bt, Dm, N) in the compute dtype."""

    def selective_scan_bwd(self, dout: Tensor, dlast_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                           B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                           delta_bias: Optional[Tensor], delta_softplus: bool) -> Grads:
        """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)."""

    def selective_scan_states_fwd(self, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                                  delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
        """Every state, (Bt, Dm, N, L) in the compute dtype."""

    def selective_scan_states_bwd(self, dstates: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                                  delta_bias: Optional[Tensor], delta_softplus: bool) -> Grads:
        """(du, ddelta, dA, dB, ddelta_bias)."""

    def selective_scan_2d_fwd(self, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Optional[Tensor], delta_bias: Optional[Tensor], routes: Tensor,
                              param_routes: Tensor, delta_softplus: bool, merge: str,
                              out_dtype: Optional[torch.dtype] = None) -> Tensor:
        """out: (Bt, H, W, Dm) for merge "sum", (Bt, H, W, K, Dm) for "none", in ``out_dtype`` (None: x's
        dtype; a wider one gives what a copy of x in it would)."""

    def selective_scan_2d_bwd(self, dout: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Optional[Tensor], delta_bias: Optional[Tensor], routes: Tensor,
                              param_routes: Tensor, delta_softplus: bool, merge: str) -> Grads:
        """(dx, ddelta, dA, dB, dC, dD, ddelta_bias); dout is in out's dtype, and one wider than x's gives the
        gradients of a copy of x in it."""


@runtime_checkable
class SavingScanBackend(ScanBackend, Protocol):
    """A backend whose 2D forward can save what its backward needs (the chunk-start states), so that the
    backward does not recompute them. ``ops`` uses these where a backend has them."""

    def chunk_states_shape(self, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           delta_bias: Optional[Tensor], routes: Tensor,
                           out_dtype: Optional[torch.dtype] = None) -> tuple:
        """The shape of the saved states for these inputs (for fake tensors under torch.compile)."""

    def selective_scan_2d_fwd_saving(self, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                     D: Optional[Tensor], delta_bias: Optional[Tensor], routes: Tensor,
                                     param_routes: Tensor, delta_softplus: bool, merge: str,
                                     out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
        """(out, chunk_states)."""

    def selective_scan_2d_bwd_from_saved(self, dout: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                                         C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
                                         routes: Tensor, param_routes: Tensor, delta_softplus: bool, merge: str,
                                         chunk_states: Tensor) -> Grads:
        """What ``selective_scan_2d_bwd`` returns, reading ``chunk_states``."""
