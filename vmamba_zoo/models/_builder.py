"""What every family's registration shares: the pretrained cfg defaults, and the one call every ``_create_<family>``
makes (timm's ``build_model_with_cfg`` for a zoo model)."""
from typing import Any, Callable, Dict, Sequence, Type, Union

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, get_pretrained_cfg

from ..checkpoint import check_pretrained_source

__all__ = ["build_zoo_model", "zoo_cfg"]


def zoo_cfg(url: str, family: Dict[str, Any], **kwargs) -> Dict[str, Any]:
    """A pretrained cfg: what the zoo's ImageNet-1k models share (224 px, bicubic, crop 0.875, ImageNet mean and
    std, a 7x7 last map, the classifier ``head.fc``), then the ``family``'s entries (first_conv, license, paper,
    origin), then the variant's ``kwargs`` (hf_hub_id, ...)."""
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head.fc',
        **family,
        **kwargs,
    }


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
