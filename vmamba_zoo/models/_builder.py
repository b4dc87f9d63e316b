"""The one call every family's ``_create_<family>`` makes: timm's ``build_model_with_cfg`` for a zoo model."""
from typing import Callable, Sequence, Type, Union

import torch.nn as nn
from timm.models import build_model_with_cfg, get_pretrained_cfg

from ..checkpoint import check_pretrained_source

__all__ = ["build_zoo_model"]


def build_zoo_model(model_cls: Type[nn.Module], variant: str, pretrained: bool, checkpoint_filter_fn: Callable,
                    out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3), **kwargs) -> nn.Module:
    """``model_cls(**kwargs)`` with timm's pretrained loading (official files converted by the family's
    ``checkpoint_filter_fn``) and ``features_only`` support (the stage outputs ``out_indices``, through the
    model's ``forward_intermediates``). A pretrained source that cannot work (a missing local file) fails first."""
    check_pretrained_source(variant, pretrained, kwargs, get_pretrained_cfg(variant).to_dict())
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )
