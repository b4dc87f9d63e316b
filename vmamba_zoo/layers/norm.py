"""The zoo's LayerNorms over the channels of channels-last maps.

``LayerNorm`` is ``nn.LayerNorm`` (same parameters, state-dict keys and function) that runs as
``vmamba_kernels.layer_norm``: on CUDA one Triton kernel normalizes many short rows per program, where PyTorch's
kernel gives every row a block of threads (the zoo's rows hold 16 to 768 channels). On one H100, LayerNorm was
the largest GPU item of GroupMamba-T's inference (21.5 of 61 ms at batch 128, bf16) and a quarter of
EfficientVMamba-T's. Under autocast it returns fp32, as ``nn.LayerNorm`` does.

``LowPrecisionLayerNorm`` keeps an input already in autocast's dtype (a scan's output) in that dtype.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from vmamba_kernels import layer_norm

__all__ = ["LayerNorm", "LowPrecisionLayerNorm", "read_by_gemm"]


@register_notrace_module  # torch.fx (timm's feature extraction) records it as one call, as it does nn.LayerNorm
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, run by ``vmamba_kernels.layer_norm`` (fused on CUDA). Other normalized
    shapes, and TorchScript, run ``nn.LayerNorm`` itself.

    ``autocast_output`` (set by ``read_by_gemm``): under CUDA autocast return autocast's dtype instead of fp32,
    for a norm whose only reader is a GEMM or conv, which would cast the fp32 result so at once. The kernel
    rounds once, as that cast does: the same values, without the fp32 copy and the cast's pass over it."""

    autocast_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or torch.jit.is_scripting():
            return super().forward(x)
        if x.dim() < 1 or x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(f"LayerNorm({self.normalized_shape[0]}) normalizes the last dim of (..., "
                             f"{self.normalized_shape[0]}) inputs, got {tuple(x.shape)}")
        out_dtype = None
        if self.autocast_output and x.is_cuda and torch.is_autocast_enabled("cuda"):
            out_dtype = torch.get_autocast_dtype("cuda")
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)


def read_by_gemm(norm: nn.Module) -> nn.Module:
    """``norm``, returning autocast's dtype under CUDA autocast if it is a ``LayerNorm``: for a norm whose output
    only a GEMM or conv reads (any other norm is returned as it is)."""
    if isinstance(norm, LayerNorm):
        norm.autocast_output = True
    return norm


@register_notrace_module
class LowPrecisionLayerNorm(LayerNorm):
    """``nn.LayerNorm`` (same parameters) for an input already in autocast's dtype, such as a scan's output:
    the result stays in that dtype instead of autocast's fp32, which the next GEMM casts back. On CUDA the fused
    ``vmamba_kernels.layer_norm`` computes in fp32 with the fp32 affine and rounds once; elsewhere PyTorch's
    kernel normalizes in that dtype (accumulating in fp32) with the affine rounded to it. Outside autocast, or
    for other inputs, it is ``LayerNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device) \
                and not torch.jit.is_scripting():
            if x.is_cuda:
                return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=x.dtype)
            with torch.autocast(device, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)
