"""Parameters of a 2D selective scan over K routes, stored as the official VMamba-style code stores them.

A mixer subclasses ``RouteScanParams``, projects each pixel for every route (``x_proj_weight``), and hands
``scan_inputs(...)`` to ``vmamba_kernels.selective_scan_2d`` with its route set: the same block serves the
cross scan, the multi-head scan and the token mixers built on them.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scan_params import init_A_log_and_D_, init_dt_projection_

__all__ = ["RouteScanParams", "fewer_launches", "fused_projections", "per_route_linear",
           "route_projections"]

_fused = {"forced": None}


def fewer_launches(x: torch.Tensor) -> bool:
    """Whether a mixer trades arithmetic for launches (block-diagonal GEMMs, every route's projections of every
    pixel) on ``x``: on CUDA, where a training step is bound by its launches; not on CPU, where time follows the
    arithmetic, nor when traced (fvcore, ONNX), so that FLOP counts are the model's own. Both forms compute the
    same function; ``fused_projections`` forces one (tests of the other device's form)."""
    if torch.jit.is_tracing():
        return False
    forced = _fused["forced"]
    return x.is_cuda if forced is None else forced


@contextlib.contextmanager
def fused_projections(enabled: Optional[bool]):
    """Within the block, ``fewer_launches`` answers ``enabled`` on every device (None: by device again)."""
    previous, _fused["forced"] = _fused["forced"], enabled
    try:
        yield
    finally:
        _fused["forced"] = previous


def per_route_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K, I) and weight (K, O, I) → (..., K, O): route k's features through its own linear map.

    One GEMM per route instead of a batched one (einsum): the weight gradient sums over every pixel of the
    batch, and batched GEMMs with such a long reduction and a small output run on a handful of thread
    blocks (10 ms per call at VMamba-T stage 1, batch 128, on an H200), where a plain GEMM splits it."""
    if x.shape[-2] != weight.shape[0] or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x (..., K, I) = {tuple(x.shape)} does not match weight (K, O, I) = {tuple(weight.shape)}")
    return torch.stack([F.linear(xk, wk) for xk, wk in zip(x.unbind(-2), weight.unbind(0))], dim=-2)


def route_projections(
        x: torch.Tensor, x_proj_weight: torch.Tensor, dt_projs_weight: torch.Tensor, route_eye: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every route's x_proj (K, R + 2N, C) then dt_proj (K, C, R) of x (..., C) → delta (..., K, C),
    B (..., K, N), C (..., K, N); ``route_eye`` is the (K, K) identity (a buffer of the caller).

    Four kernels forward where per-route GEMMs take K + 4 (2K + 5 backward) under autocast, a step bound by
    launches: the x_proj rows are reordered feature-major (every route's dt ranks, then B, then C) and cast to
    x's dtype in one copy, so dt, B and C are plain slices of one GEMM's output; the K dt projections are one
    GEMM with the block-diagonal (K·C, R·K) weight (K times the FLOPs of a projection that is a small part of
    the block, and a plain GEMM for the weight gradient). B and C are strided views, which the scan reads.
    """
    K, P, C = x_proj_weight.shape
    R = dt_projs_weight.shape[-1]
    N = (P - R) // 2
    if x.shape[-1] != C or dt_projs_weight.shape != (K, C, R) or P != R + 2 * N or route_eye.shape != (K, K):
        raise ValueError(f"x (..., C) = {tuple(x.shape)}, x_proj_weight (K, R + 2N, C) = {tuple(x_proj_weight.shape)}, "
                         f"dt_projs_weight (K, C, R) = {tuple(dt_projs_weight.shape)} and route_eye (K, K) = "
                         f"{tuple(route_eye.shape)} do not match")
    w_x = x_proj_weight.transpose(0, 1).to(dtype=x.dtype, copy=True, memory_format=torch.contiguous_format)
    dts, Bs, Cs = F.linear(x, w_x.view(P * K, C)).split([R * K, N * K, N * K], dim=-1)
    w_dt = (dt_projs_weight.unsqueeze(-1) * route_eye.view(K, 1, 1, K)).to(x.dtype)
    delta = F.linear(dts, w_dt.view(K * C, R * K)).unflatten(-1, (K, C))
    return delta, Bs.unflatten(-1, (N, K)).transpose(-1, -2), Cs.unflatten(-1, (N, K)).transpose(-1, -2)


class RouteScanParams(nn.Module):
    """Per-route projections of a 2D selective scan, stored as the official code stores them.

    x_proj_weight (K, R + 2N, C), dt_projs_weight (K, C, R), dt_projs_bias (K, C), A_logs (K·C, N),
    Ds (K·C). ``scan_inputs`` turns the per-pixel projections (..., K, R + 2N) into the scan's inputs.
    """

    def __init__(self, num_routes: int, channels: int, d_state: int, dt_rank: int):
        super().__init__()
        self.num_routes, self.channels, self.d_state, self.dt_rank = num_routes, channels, d_state, dt_rank
        self.x_proj_weight = nn.Parameter(torch.empty(num_routes, dt_rank + 2 * d_state, channels))
        self.dt_projs_weight = nn.Parameter(torch.empty(num_routes, channels, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(num_routes, channels))
        self.A_logs = nn.Parameter(torch.empty(num_routes * channels, d_state))
        self.Ds = nn.Parameter(torch.empty(num_routes * channels))
        self.register_buffer('route_eye', torch.eye(num_routes), persistent=False)
        self.reset_scan_parameters()

    @torch.no_grad()
    def reset_scan_parameters(self):
        bound = self.channels ** -0.5  # nn.Linear's default init, as the official x_proj
        self.x_proj_weight.uniform_(-bound, bound)
        init_dt_projection_(self.dt_projs_weight, self.dt_projs_bias)
        init_A_log_and_D_(self.A_logs, self.Ds)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., C), read by every route → delta (..., K, C), B (..., K, N), C (..., K, N): the values of
        ``scan_inputs`` on ``F.linear(x, x_proj_weight.view(-1, C))``, through ``route_projections``."""
        if not fewer_launches(x):  # the K dt GEMMs, without the zero blocks
            K, C = self.num_routes, self.channels
            return self.scan_inputs(F.linear(x, self.x_proj_weight.reshape(-1, C)).unflatten(-1, (K, -1)))[:3]
        return route_projections(x, self.x_proj_weight, self.dt_projs_weight, self.route_eye)

    def scan_params(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A (K, C, N), D (K, C) and delta_bias (K, C) in fp32, as ``scan_inputs`` returns them."""
        A = -torch.exp(self.A_logs.float()).view(self.num_routes, self.channels, self.d_state)
        return A, self.Ds.float().view(self.num_routes, self.channels), self.dt_projs_bias.float()

    def scan_inputs(self, x_dbl: torch.Tensor):
        """x_dbl (..., K, R + 2N) → delta (..., K, C), B (..., K, N), C (..., K, N), and A, D, delta_bias."""
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = per_route_linear(dts, self.dt_projs_weight)
        A = -torch.exp(self.A_logs.float()).view(self.num_routes, self.channels, self.d_state)
        D = self.Ds.float().view(self.num_routes, self.channels)
        delta_bias = self.dt_projs_bias.float()
        return delta, Bs.contiguous(), Cs.contiguous(), A, D, delta_bias
