"""Scan routes on the device the features live on, built once per (route set, grid, options, device)."""
import functools
from typing import Tuple

import torch

from vmamba_kernels import scan_routes
from vmamba_kernels.reference import exporting
from vmamba_kernels.graphs import capturing

__all__ = ["device_routes"]


@functools.lru_cache(maxsize=128)
def _cached_routes(name: str, H: int, W: int, options: Tuple, device: torch.device) -> torch.Tensor:
    # Built outside inference mode: the scan saves the routes for backward, which an inference tensor
    # cached during evaluation would forbid in a later training step.
    with torch.inference_mode(False):
        return scan_routes(name, H, W, **dict(options)).to(device)


def device_routes(name: str, H, W, device: torch.device, **options) -> torch.Tensor:
    """``scan_routes(name, H, W, **options)`` on ``device``, cached; the scan ops never modify routes.

    Inside a compiled graph the routes are built in the graph (constants there), not looked up."""
    if exporting() or torch.jit.is_tracing():
        # Built in the graph from the traced sizes (0-dim tensors under jit.trace, symbolic under
        # torch.export), so that an exported or traced model follows its input's size.
        return scan_routes(name, H, W, **options).to(device)
    H, W = int(H), int(W)
    if torch.compiler.is_compiling():
        return scan_routes(name, H, W, **options).to(device)
    key = (name, H, W, tuple(sorted(options.items())), torch.device(device))
    if key not in _built and capturing():
        # Building them copies from host memory, which a CUDA graph capture forbids; so would caching them.
        raise RuntimeError(f"device_routes{key[:4]} is first asked for while a CUDA graph is captured; run the "
                           "model once before capturing it (that call builds and caches its routes)")
    _built.add(key)
    return _cached_routes(*key)


_built = set()  # keys asked for outside a capture (the cache keeps the last 128)
