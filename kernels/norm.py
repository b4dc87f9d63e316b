"""LayerNorm over the last dim, as one op: a drop-in for ``F.layer_norm`` that also takes one affine per group.

    layer_norm(x, weight, bias, eps)    weight, bias (N,):   F.layer_norm(x, (N,), weight, bias, eps)
                                        weight, bias (G, N): x (..., G, N), group g normalized as above and
                                                             scaled by weight[g], shifted by bias[g]

On CUDA it runs as one Triton kernel per direction (``vmamba_kernels.triton.layer_norm``), which normalizes
many short rows per program: PyTorch's kernels give each row a block of threads, and the zoo's rows hold 16 to
768 features, so most of those threads idle. Elsewhere (CPU, fp64, traced or exported calls), and as the oracle
of the tests, it is the PyTorch form. Both compute in fp32 and follow autocast as ``F.layer_norm`` does: under
CUDA autocast the result is fp32, else x's dtype (promoted with the affine's for groups).
"""
import importlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import uses_fused_kernels

__all__ = ["layer_norm", "layer_norm_ref"]

MAX_FUSED_FEATURES = 8192  # longer rows run the PyTorch form (one program holds a whole row)


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> Tensor:
    """The PyTorch form (differentiable, any device). The normalized size is the affine's (a constant in traced
    graphs) where there is one."""
    if weight is None or weight.dim() == 1:
        return F.layer_norm(x, weight.shape if weight is not None else x.shape[-1:], weight, bias, eps)
    y = F.layer_norm(x, weight.shape[-1:], eps=eps)
    return y * weight if bias is None else torch.addcmul(bias, y, weight)


def _triton():
    return importlib.import_module("vmamba_kernels.triton.layer_norm")


def _rows(t: Tensor) -> Tensor:
    """(..., N) as (M, N) rows with unit feature stride: a view where the strides allow, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _affine_rows(t: Optional[Tensor], features: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1, features).contiguous()


@torch.library.custom_op("vmamba::layer_norm_fwd", mutates_args=())
def _fused_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    N = x.shape[-1]
    out, mean, rstd = _triton().layer_norm_fwd(_rows(x), _affine_rows(weight, N), _affine_rows(bias, N), eps,
                                               out_dtype)
    return out.view(x.shape), mean, rstd


@_fused_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("vmamba::layer_norm_bwd", mutates_args=())
def _fused_bwd(g: Tensor, x: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Tensor,
               rstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an absent affine's gradient is an empty tensor (custom ops return tensors)."""
    N = x.shape[-1]
    groups = weight.numel() // N if weight is not None else 1
    dx, dw, db = _triton().layer_norm_bwd(_rows(g), _rows(x), _affine_rows(weight, N), has_bias, mean, rstd, groups)
    dw = dw.view(weight.shape).to(weight.dtype) if weight is not None else x.new_empty((0,))
    db = db.view(weight.shape if weight is not None else (N,)) if has_bias else x.new_empty((0,))
    return dx.view(x.shape), dw, db


@_fused_bwd.register_fake
def _(g, x, weight, has_bias, mean, rstd):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    db = (torch.empty_like(weight) if weight is not None else x.new_empty(x.shape[-1:])) if has_bias else x.new_empty((0,))
    return torch.empty_like(x), dw, db


def _setup(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, g, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _fused_bwd(g, x, weight, ctx.bias_dtype is not None, mean, rstd)
    return (dx, dw if weight is not None else None, db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
            None, None)


_fused_fwd.register_autograd(_backward, setup_context=_setup)


def _out_dtype(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    """F.layer_norm's result dtype: fp32 under CUDA autocast (which runs it in fp32), else x's; the grouped form's
    affine (an addcmul) promotes it with the parameters'."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.float32
    dtype = x.dtype
    if weight is not None and weight.dim() == 2:
        for p in (weight, bias):
            dtype = dtype if p is None else torch.promote_types(dtype, p.dtype)
    return dtype


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               out_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """Normalize x over its last dim (N features), then apply the affine.

    weight and bias: (N,) (one affine, as ``nn.LayerNorm``), (G, N) with x (..., G, N) (one affine per group),
    or None. Returns x's shape, in fp32 under CUDA autocast, else in x's dtype (promoted with a grouped affine's);
    ``out_dtype`` asks for another (the fp32 result rounded once, as a cast of it would be, without the fp32 copy).
    backend: "auto" (the fused kernels on CUDA), "triton" or "reference".
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor (..., N), got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    N = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        plain = p.dim() == 1 and p.shape[0] == N
        grouped = p.dim() == 2 and p.shape[1] == N and x.dim() >= 2 and p.shape[0] == x.shape[-2]
        if not (plain or grouped):
            raise ValueError(f"{name} must be (N,) = ({N},), or (G, N) = ({x.shape[-2] if x.dim() >= 2 else 'G'}, "
                             f"{N}) for x (..., G, N), for x of shape {tuple(x.shape)}; got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} on {p.device}")
    if bias is not None and bias.dim() == 2 and weight is None:
        raise ValueError(f"a grouped bias {tuple(bias.shape)} needs the grouped weight of the same shape")
    if weight is not None and bias is not None and weight.shape != bias.shape:
        raise ValueError(f"weight and bias must have one shape, got {tuple(weight.shape)} and {tuple(bias.shape)}")
    groups = weight.shape[0] if weight is not None and weight.dim() == 2 else 1
    fusable = (0 < N <= MAX_FUSED_FEATURES and groups & (groups - 1) == 0 and x.numel() > 0
               and x.dtype in (torch.float16, torch.bfloat16, torch.float32))
    if fusable and uses_fused_kernels(x, backend):
        return _fused_fwd(x, weight, bias, float(eps), out_dtype or _out_dtype(x, weight, bias))[0]
    out = layer_norm_ref(x, weight, bias, eps)
    return out if out_dtype is None else out.to(out_dtype)
