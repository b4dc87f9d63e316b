"""timm's classifier API for the zoo's models whose head is timm's ``ClassifierHead`` on a channels-last map."""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import ClassifierHead

__all__ = ["ClassifierHeadMixin", "channels_last_head", "linear_head_keys_to_fc"]


def channels_last_head(num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                       device=None, dtype=None) -> ClassifierHead:
    """Pool the (B, H, W, C) map (``global_pool``), dropout, then the Linear ``fc`` (none for 0 classes)."""
    return ClassifierHead(num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt='NHWC',
                          device=device, dtype=dtype)


def linear_head_keys_to_fc(state_dict: dict) -> dict:
    """``head.weight`` / ``head.bias`` of a bare Linear head (official layouts, and this zoo's own files from
    before its heads were ``ClassifierHead``) → ``head.fc.weight`` / ``head.fc.bias``; other keys unchanged."""
    return {f"head.fc.{k[len('head.'):]}" if k in ("head.weight", "head.bias") else k: v for k, v in state_dict.items()}


class ClassifierHeadMixin:
    """``get_classifier``, ``reset_classifier`` and ``forward_head`` for a model whose ``head`` is
    ``channels_last_head(...)`` and whose ``global_pool`` is one of ``global_pools``."""

    global_pools = ('avg', '')

    def check_global_pool(self, global_pool: str) -> None:
        if global_pool not in self.global_pools:
            choices = ", ".join(repr(p) for p in self.global_pools[:-1]) + f" or {self.global_pools[-1]!r}"
            raise ValueError(f"global_pool must be {choices}, got {global_pool!r}")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head.in_features = self.num_features  # a pruned model's head reads an earlier stage
        weight = next(self.parameters())  # a new classifier lives where the model does
        self.head.reset(num_classes, pool_type=global_pool, device=weight.device, dtype=weight.dtype)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)
