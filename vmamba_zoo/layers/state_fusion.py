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

Layout (``impl``). PyTorch sends a depthwise conv to cuDNN whenever the input's suggested memory format is
channels_last, but rejects cuDNN for dilated depthwise convs on NCHW-contiguous input and falls back to its own
slow kernels. The default ``impl="channels_last"`` therefore moves the states to channels_last once, in the same
copy that casts them to the compute dtype (autocast's, else the parameters'), folds α into the kernels (three
tiny products instead of three full-size scalings) and returns a channels_last map, which a channels-last
caller reads as (B, H, W, C) without a copy. ``impl="nchw"`` is the plain form (pad, conv, scale per dilation
in the input's layout), kept as the baseline for ``tools/bench_layers.py``; ``impl="merged"`` always runs the
merged 11×11 kernel, channels_last. ``impl="auto"`` (the default) runs "channels_last" in eval mode
and "nchw" in training: on one H100 (bf16, batch 128, model_cards/benchmarks/side_by_side.md) the channels-last
Spatial-Mamba-T inferred at 2150 img/s against 1709 in NCHW, but trained at 405 against 462.

``impl="fused"`` runs ``vmamba_kernels.dilated_dwconv_sum``: on CUDA one Triton kernel reads the fp32 states
with clamped indices (no padded copies), applies every dilated kernel and writes the sum once, channels_last in
the compute dtype, and its backward is two kernels (elsewhere the op is the plain PyTorch form). Its kernels
match a per-tap loop on an H100, but it is opt-in because it is slower there: Spatial-Mamba-T (bf16, batch 128,
one process) inferred at 913 img/s against 2152 with the default convs and trained at 515 against 550, though with
a 19.1 against 23.3 GB training peak (model_cards/benchmarks/side_by_side.md).
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vmamba_kernels import dilated_dwconv_sum

__all__ = ["StateFusion", "merge_dilated_kernels", "FUSION_IMPLS"]

_PADDING_MODES = ("replicate", "zeros", "reflect", "circular")
FUSION_IMPLS = ("auto", "fused", "channels_last", "nchw", "merged")


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
        impl: "auto" (default: "nchw" in training, "channels_last" in eval), "channels_last" (cuDNN-eligible
            layout, α folded into the kernels, one cast), "nchw" (pad, conv and scale per dilation in the input's
            layout) or "merged" (the merged kernel in training too). All compute the same function; see the
            module docstring.

    Parameters: ``weight`` (n, C, 1, k, k) and ``alpha`` (n,), all initialised to ones.
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 3,
            dilations: Sequence[int] = (1, 3, 5),
            padding_mode: str = "replicate",
            merge_at_eval: bool = False,
            impl: str = "auto",
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
        if impl not in FUSION_IMPLS:
            raise ValueError(f"impl must be one of {FUSION_IMPLS}, got {impl!r}")
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.kernel_size = kernel_size
        self.dilations: Tuple[int, ...] = tuple(int(d) for d in dilations)
        self.padding_mode = padding_mode
        self.merge_at_eval = merge_at_eval
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(len(self.dilations), dim, 1, kernel_size, kernel_size, **dd))
        self.alpha = nn.Parameter(torch.ones(len(self.dilations), **dd))

    def extra_repr(self) -> str:
        return (f"{self.dim}, kernel_size={self.kernel_size}, dilations={self.dilations}, "
                f"padding_mode={self.padding_mode!r}, merge_at_eval={self.merge_at_eval}, impl={self.impl!r}")

    def merged_kernel(self) -> torch.Tensor:
        """The single (C, 1, K, K) depthwise kernel equivalent to the sum of dilated convs."""
        return merge_dilated_kernels(self.weight, self.alpha, self.dilations)

    def _pad(self, h: torch.Tensor, p: int) -> torch.Tensor:
        if self.padding_mode == "zeros":
            return F.pad(h, (p, p, p, p))
        return F.pad(h, (p, p, p, p), mode=self.padding_mode)

    def _conv(self, h: torch.Tensor, weight: torch.Tensor, p: int, dilation: int) -> torch.Tensor:
        if self.padding_mode == "zeros":  # the conv pads with zeros itself, without a padded copy
            return F.conv2d(h, weight, padding=p, dilation=dilation, groups=self.dim)
        return F.conv2d(self._pad(h, p), weight, dilation=dilation, groups=self.dim)

    def _compute_dtype(self, h: torch.Tensor) -> torch.dtype:
        """Autocast's dtype, else the parameters'."""
        device_type = h.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.weight.dtype

    def _channels_last(self, h: torch.Tensor) -> torch.Tensor:
        """h in the dtype the convs compute in, channels_last: one copy (none if it already is)."""
        return h.to(dtype=self._compute_dtype(h), memory_format=torch.channels_last)

    def resolved_impl(self) -> str:
        """The implementation this call runs: "auto" is "nchw" in training and "channels_last" in eval."""
        if self.impl != "auto":
            return self.impl
        return "nchw" if self.training else "channels_last"

    def forward_fused(self, h: torch.Tensor) -> torch.Tensor:
        """The fused kernels: the dilated sum in one pass, channels_last in the compute dtype."""
        if self.padding_mode != "replicate":
            raise ValueError(f'impl="fused" clamps at the borders (padding_mode="replicate"), '
                             f'got padding_mode={self.padding_mode!r}')
        weight = (self.alpha.view(-1, 1, 1, 1, 1) * self.weight).squeeze(2)  # α folded: (n, C, k, k)
        return dilated_dwconv_sum(h, weight, self.dilations, out_dtype=self._compute_dtype(h), channels_last=True)

    def forward_dilated(self, h: torch.Tensor) -> torch.Tensor:
        """Training form: one padded depthwise conv per dilation, weighted by alpha."""
        if self.resolved_impl() == "nchw":
            return self._forward_dilated_nchw(h)
        h = self._channels_last(h)
        # α scales the kernels, not the outputs; cast once here rather than per conv by autocast
        # unbind, not indexing: its backward is one stack instead of a zero-filled copy per dilation
        weights = (self.alpha.view(-1, 1, 1, 1, 1) * self.weight).to(h.dtype).unbind(0)
        r = self.kernel_size // 2
        out = None
        # inputs are cast already; CPU autocast would also run the padding in fp32, with two more casts
        with torch.autocast(h.device.type, enabled=False):
            for i, d in enumerate(self.dilations):
                y = self._conv(h, weights[i], r * d, d)
                out = y if out is None else out + y
        return out

    def _forward_dilated_nchw(self, h: torch.Tensor) -> torch.Tensor:
        r = self.kernel_size // 2
        out = None
        for i, d in enumerate(self.dilations):
            y = self.alpha[i] * F.conv2d(self._pad(h, r * d), self.weight[i], dilation=d, groups=self.dim)
            out = y if out is None else out + y
        return out

    def forward_merged(self, h: torch.Tensor) -> torch.Tensor:
        """Eval form: one padded depthwise conv with the merged kernel."""
        kernel = self.merged_kernel()
        if self.resolved_impl() == "nchw":
            return self._conv(h, kernel, kernel.shape[-1] // 2, 1)
        h = self._channels_last(h)
        with torch.autocast(h.device.type, enabled=False):
            return self._conv(h, kernel.to(h.dtype), kernel.shape[-1] // 2, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim != 4 or h.shape[1] != self.dim:
            raise ValueError(f"expected states (B, {self.dim}, H, W), got {tuple(h.shape)}")
        impl = self.resolved_impl()
        if impl == "fused" and not (self.merge_at_eval and not self.training):
            return self.forward_fused(h)
        if impl == "nchw" and h.dtype != self.weight.dtype:
            h = h.to(self.weight.dtype)
        if self.impl == "merged" or (self.merge_at_eval and not self.training):
            return self.forward_merged(h)
        return self.forward_dilated(h)
