"""The one check of a model's input images, before any layer or kernel runs."""
import torch
import torch.fx

__all__ = ["check_images"]


def check_images(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged if it is a (B, C, H, W) batch whose H and W reach the model's total stride (the last
    entry of its ``feature_info``); otherwise a ValueError naming the minimum and the actual size. Below the
    total stride the last stage would see an image smaller than one of its pixels, which convolution padding
    hides as a plausible but meaningless answer."""
    if isinstance(x, torch.fx.Proxy):  # FX symbolic tracing (timm's feature extraction): no sizes to check yet
        return x
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(model).__name__} takes images (B, C, H, W), got {got}")
    minimum = model.feature_info[-1]["reduction"]
    H, W = x.shape[-2:]
    if H < minimum or W < minimum:
        raise ValueError(f"{type(model).__name__} needs images of at least {minimum}x{minimum} pixels (its total "
                         f"stride), got {int(H)}x{int(W)}")
    return x
