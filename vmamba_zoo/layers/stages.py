"""The stages of the zoo's channels-last backbones, and timm's intermediate-feature API over them."""
from typing import Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from .input_size import check_images

__all__ = ["ChannelsLastStagesMixin", "Stage"]


class Stage(nn.Module):
    """One stage of a channels-last backbone: ``downsample`` (None: none), the ``blocks`` in order, then ``norm``
    (None: none). The blocks run through timm's ``checkpoint_seq`` while ``grad_checkpointing`` is set.

    ``channels_first``: the blocks are NCHW modules (timm's inverted residuals), so the map is permuted to
    (B, C, H, W) for them and back after; each block is still checkpointed on its own."""

    def __init__(self, downsample: Optional[nn.Module], blocks: Iterable[nn.Module], norm: Optional[nn.Module] = None,
                 channels_first: bool = False):
        super().__init__()
        self.grad_checkpointing = False
        self.channels_first = channels_first
        self.downsample = nn.Identity() if downsample is None else downsample
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.channels_first:
            x = x.permute(0, 3, 1, 2)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class ChannelsLastStagesMixin:
    """timm's stage API for a model that runs ``stem`` → ``stages`` (an nn.Sequential of stages on
    (B, H, W, C) maps, each with a ``grad_checkpointing`` flag) → ``norm`` → head, one feature map per stage.
    A model whose ``norm`` belongs to its head (applied after pooling) sets ``features_end_with_norm = False``."""

    features_end_with_norm = True
    # timm's parameter groups after the stages' blocks (layer-wise lr decay puts them last)
    final_groups = ((r'^norm', (99999,)),)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                *self.final_groups,
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and norm / head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.prune_norm_and_head(max_index, prune_norm, prune_head)
        return take_indices

    def prune_norm_and_head(self, max_index: int, prune_norm: bool, prune_head: bool):
        """What ``prune_intermediate_layers`` does after keeping stages ``0..max_index``: drop the norm and the head
        when asked (a family whose norm or head cannot read an earlier stage drops them whenever stages go)."""
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs, channels-first unless ``output_fmt='NHWC'``.

        Args:
            x: input images (B, C, H, W).
            indices: take the last n stages if int, all if None, or the listed stages.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC'.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        intermediates = []
        x = self.stem(check_images(self, x))
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                y = self.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx and self.features_end_with_norm:
            x = self.norm(x)
        return x, intermediates
