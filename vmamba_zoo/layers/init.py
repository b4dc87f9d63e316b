"""The weight init the official vision-Mamba codes share (VMamba's, PlainMamba's mmcls init_cfg, ...)."""
from typing import Tuple, Type

import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ["init_linear_and_norm"]


def init_linear_and_norm(m: nn.Module, norm_types: Tuple[Type[nn.Module], ...] = (nn.LayerNorm,)):
    """For ``model.apply``: trunc-normal(.02) Linear weights with zero biases, unit norms with zero biases;
    convs and the scan parameters keep their own init."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, norm_types):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
