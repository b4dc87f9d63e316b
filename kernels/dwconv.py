"""A sum of dilated depthwise convolutions with replicated borders, as one op (Spatial-Mamba's state fusion).

    dilated_dwconv_sum(x, weight, dilations)[b, c] = Σ_i conv2d(pad(x, r·d_i, "replicate"), weight[i, c],
                                                                dilation=d_i)[b, c],    r = k // 2

On CUDA it runs as one fused Triton kernel (``vmamba_kernels.triton.dwconv``): PyTorch sends dilated depthwise
convs to its own slow kernels (cuDNN is not used for them), after a padded copy per dilation, and sums the
outputs in more passes. Elsewhere, and as the oracle of the tests, it is that plain PyTorch form. Both compute
in fp32 (fp64 for fp64 inputs) whatever the autocast state, and return ``out_dtype``.
"""
import importlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import uses_fused_kernels

__all__ = ["dilated_dwconv_sum", "dilated_dwconv_sum_ref"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dilated_dwconv_sum_ref(x: Tensor, weight: Tensor, dilations: Sequence[int], out_dtype: Optional[torch.dtype] = None,
                           channels_last: bool = False) -> Tensor:
    """The plain form: per dilation a replicate pad and a depthwise conv, summed (differentiable, any device)."""
    dtype = _compute_dtype(x)
    channels, k = weight.shape[1], weight.shape[-1]
    out = None
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype)
        for i, d in enumerate(dilations):
            p = (k // 2) * int(d)
            y = F.conv2d(F.pad(xc, (p, p, p, p), mode="replicate"), weight[i].unsqueeze(1).to(dtype),
                         dilation=int(d), groups=channels)
            out = y if out is None else out + y
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return out.to(dtype=out_dtype or x.dtype, memory_format=fmt)


def _taps(weight: Tensor) -> Tensor:
    """(n, C, k, k) → (n·k·k, C) fp32, the kernels' layout (tap index (i·k + a)·k + e)."""
    n, C, k, _ = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(n * k * k, C).float().contiguous()


def _triton():
    return importlib.import_module("vmamba_kernels.triton.dwconv")


@torch.library.custom_op("vmamba::dilated_dwconv_sum_fwd", mutates_args=())
def _fused_fwd(x: Tensor, weight: Tensor, dilations: List[int], out_dtype: torch.dtype, channels_last: bool) -> Tensor:
    return _triton().dwconv_sum_fwd(x, _taps(weight), dilations, weight.shape[-1], out_dtype, channels_last)


@_fused_fwd.register_fake
def _(x, weight, dilations, out_dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("vmamba::dilated_dwconv_sum_bwd", mutates_args=())
def _fused_bwd(g: Tensor, x: Tensor, weight: Tensor, dilations: List[int]) -> Tuple[Tensor, Tensor]:
    n, C, k, _ = weight.shape
    dx, dw = _triton().dwconv_sum_bwd(g, x, _taps(weight), dilations, k)
    return dx, dw.view(n, k, k, C).permute(0, 3, 1, 2).to(weight.dtype).contiguous()


@_fused_bwd.register_fake
def _(g, x, weight, dilations):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, dilations, out_dtype, channels_last = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilations = dilations


def _backward(ctx, g):
    x, weight = ctx.saved_tensors
    dx, dw = _fused_bwd(g, x, weight, ctx.dilations)
    return dx, dw, None, None, None


_fused_fwd.register_autograd(_backward, setup_context=_setup)


def dilated_dwconv_sum(x: Tensor, weight: Tensor, dilations: Sequence[int], *, out_dtype: Optional[torch.dtype] = None,
                       channels_last: bool = False, backend: str = "auto") -> Tensor:
    """Σ_i depthwise conv of x with weight[i] at dilation dilations[i], borders replicated.

    x: (B, C, H, W), any strides; weight: (n, C, k, k) with odd k, one kernel per dilation. Returns (B, C, H, W)
    in ``out_dtype`` (default x's), channels_last memory if ``channels_last``. Computes in fp32 (fp64 for fp64
    x). backend: "auto" (the fused kernel on CUDA), "triton" or "reference".
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    dilations = [int(d) for d in dilations]
    if (not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[:2] != (len(dilations), x.shape[1])
            or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 != 1):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (n, C, k, k) = ({len(dilations)}, {x.shape[1]}, k, k) with odd k for "
                         f"{len(dilations)} dilations and x of {x.shape[1]} channels, got {got}")
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be ints >= 1, got {dilations}")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    out_dtype = out_dtype or x.dtype
    if uses_fused_kernels(x, backend) and len(dilations) <= 4:
        return _fused_fwd(x, weight, dilations, out_dtype, bool(channels_last))
    return dilated_dwconv_sum_ref(x, weight, dilations, out_dtype, channels_last)
