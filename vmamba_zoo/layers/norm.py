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

from vmamba_kernels import layer_norm

__all__ = ["LayerNorm", "LowPrecisionLayerNorm"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, run by ``vmamba_kernels.layer_norm`` (fused on CUDA). Other normalized
    shapes, and TorchScript, run ``nn.LayerNorm`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or torch.jit.is_scripting():
            return super().forward(x)
        if x.dim() < 1 or x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(f"LayerNorm({self.normalized_shape[0]}) normalizes the last dim of (..., "
                             f"{self.normalized_shape[0]}) inputs, got {tuple(x.shape)}")
        return layer_norm(x, self.weight, self.bias, self.eps)


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
