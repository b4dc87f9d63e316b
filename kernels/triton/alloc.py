"""Allocation of the kernels' outputs and workspaces.

Tests turn on poisoning: every fresh buffer is then filled with NaN (floating dtypes) or 77 (integer
dtypes), so that an element a kernel fails to write shows up instead of passing as leftover memory.
"""
import torch

_poison = {"on": False}


def poison(enabled: bool) -> None:
    _poison["on"] = bool(enabled)


def empty(*shape, dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _poison["on"]:
        t.fill_(float("nan") if t.is_floating_point() else 77)
    return t
