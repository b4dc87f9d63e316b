"""Structure-aware state fusion: a learned sum of dilated depthwise convolutions over SSM hidden states.

Spatial-Mamba (https://arxiv.org/abs/2410.15091) runs one raster scan, keeps every hidden state h, lays the
states back on the image grid and mixes each pixel's state with its neighbours at several dilations:

    fused = Σ_i α_i · dwconv_{k×k, dilation d_i}(pad(h, d_i·(k//2), mode=padding_mode))

The sum can also run as one depthwise conv whose kernel is the α-weighted sum of the dilated kernels placed
on a common (k-1)·max(d)+1 grid (11×11 for k=3, d=(1, 3, 5)); Spatial-Mamba's official code does that in eval
mode with its own large-kernel CUDA conv, whose border handling clamps indices (replicate padding). Every tap
at offset o reads the padded pixel at o whatever the pad width, so both forms are the same function, borders
included. The merged form costs K² = 121 instead of n·k² = 27 multiply-adds per output for k=3, d=(1, 3, 5)
and in PyTorch it is no faster on GPU (it is on CPU), so it is opt-in here (``merge_at_eval``).
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StateFusion", "merge_dilated_kernels"]

_PADDING_MODES = ("replicate", "zeros", "reflect", "circular")


def merge_dilated_kernels(weight: torch.Tensor, alpha: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """One depthwise kernel equal to Σ_i alpha[i] · (weight[i] dilated by dilations[i]).

    weight: (n, C, 1, k, k); alpha: (n,). Returns (C, 1, K, K) with K = (k - 1) * max(dilations) + 1,
    every dilated kernel centred on the same tap.
    """
    if weight.ndim != 5 or weight.shape[2] != 1 or weight.shape[3] != weight.shape[4] or weight.shape[3] % 2 != 1:
        raise ValueError(f"weight must be (n, C, 1, k, k) with odd k, got {tuple(weight.shape)}")
    n, channels, _, k, _ = weight.shape
    if alpha.shape != (n,):
        raise ValueError(f"alpha must be ({n},) to match weight's {n} kernels, got {tuple(alpha.shape)}")
    if len(dilations) != n or any(int(d) < 1 for d in dilations):
        raise ValueError(f"need {n} dilations >= 1, got {tuple(dilations)}")
    size = (k - 1) * max(dilations) + 1
    merged = None
    for i, d in enumerate(dilations):
        span = (k - 1) * d + 1
        dilated = weight.new_zeros(channels, 1, span, span)
        dilated[..., ::d, ::d] = alpha[i] * weight[i]
        pad = (size - span) // 2
        dilated = F.pad(dilated, (pad, pad, pad, pad))
        # summed, not assigned: the centre tap is shared by every dilation
        merged = dilated if merged is None else merged + dilated
    return merged


class StateFusion(nn.Module):
    """Σ_i α_i · depthwise k×k conv with dilation d_i over a (B, C, H, W) state map.

    Args:
        dim: channels C (one kernel per channel and dilation).
        kernel_size: k (odd).
        dilations: one depthwise kernel per dilation; Spatial-Mamba uses (1, 3, 5).
        padding_mode: border handling of every conv ("replicate" in Spatial-Mamba).
        merge_at_eval: in eval mode run the single merged kernel instead of one conv per dilation (same
            result). The merged kernel is rebuilt from the parameters on every call, so it never goes stale.

    Parameters: ``weight`` (n, C, 1, k, k) and ``alpha`` (n,), all initialised to ones.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 3,
            dilations: Sequence[int] = (1, 3, 5),
            padding_mode: str = "replicate",
            merge_at_eval: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of ints >= 1, got {tuple(dilations)}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.kernel_size = kernel_size
        self.dilations: Tuple[int, ...] = tuple(int(d) for d in dilations)
        self.padding_mode = padding_mode
        self.merge_at_eval = merge_at_eval
        self.weight = nn.Parameter(torch.ones(len(self.dilations), dim, 1, kernel_size, kernel_size, **dd))
        self.alpha = nn.Parameter(torch.ones(len(self.dilations), **dd))

    def extra_repr(self) -> str:
        return (f"{self.dim}, kernel_size={self.kernel_size}, dilations={self.dilations}, "
                f"padding_mode={self.padding_mode!r}, merge_at_eval={self.merge_at_eval}")

    def merged_kernel(self) -> torch.Tensor:
        """The single (C, 1, K, K) depthwise kernel equivalent to the sum of dilated convs."""
        return merge_dilated_kernels(self.weight, self.alpha, self.dilations)

    def _pad(self, h: torch.Tensor, p: int) -> torch.Tensor:
        if self.padding_mode == "zeros":
            return F.pad(h, (p, p, p, p))
        return F.pad(h, (p, p, p, p), mode=self.padding_mode)

    def forward_dilated(self, h: torch.Tensor) -> torch.Tensor:
        """Training form: one padded depthwise conv per dilation, weighted by alpha."""
        r = self.kernel_size // 2
        out = None
        for i, d in enumerate(self.dilations):
            y = self.alpha[i] * F.conv2d(self._pad(h, r * d), self.weight[i], dilation=d, groups=self.dim)
            out = y if out is None else out + y
        return out

    def forward_merged(self, h: torch.Tensor) -> torch.Tensor:
        """Eval form: one padded depthwise conv with the merged kernel."""
        kernel = self.merged_kernel()
        return F.conv2d(self._pad(h, kernel.shape[-1] // 2), kernel, groups=self.dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim != 4 or h.shape[1] != self.dim:
            raise ValueError(f"expected states (B, {self.dim}, H, W), got {tuple(h.shape)}")
        if h.dtype != self.weight.dtype:
            h = h.to(self.weight.dtype)
        if self.merge_at_eval and not self.training:
            return self.forward_merged(h)
        return self.forward_dilated(h)
