"""The one check of a model's input images, before any layer or kernel runs."""
import torch
import torch.fx

__all__ = ["check_images"]


def check_images(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged if it is a (B, C, H, W) batch whose H and W reach the model's total stride (the last
    entry of its ``feature_info``); otherwise a ValueError naming the minimum and the actual size. Below the
    total stride the last stage would see an image smaller than one of its pixels, which convolution padding
    hides as a plausible but meaningless answer.

    A model whose class sets ``torchscript_onnx_unsupported`` (why, in words) refuses the TorchScript ONNX
    exporter with a RuntimeError that says so and names dynamo=True."""
    if isinstance(x, torch.fx.Proxy):  # FX symbolic tracing (timm's feature extraction): no sizes to check yet
        return x
    reason = getattr(model, "torchscript_onnx_unsupported", None)
    if reason and torch.onnx.is_in_onnx_export() and torch.jit.is_tracing() and not torch.compiler.is_exporting():
        raise RuntimeError(f"{type(model).__name__} cannot be exported by the TorchScript ONNX exporter "
                           f"(torch.onnx.export(..., dynamo=False)): {reason}. Export it with "
                           f"torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=...), whose graph follows "
                           f"every input size (tools/export.py does).")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(model).__name__} takes images (B, C, H, W), got {got}")
    minimum = model.feature_info[-1]["reduction"]
    H, W = x.shape[-2:]
    if H < minimum or W < minimum:
        raise ValueError(f"{type(model).__name__} needs images of at least {minimum}x{minimum} pixels (its total "
                         f"stride), got {int(H)}x{int(W)}")
    return x
