"""Scan routes on the device the features live on, built once per (route set, table, grid, options, device).

``device_routes`` is how every model gets its routes: a cache per device (a routes tensor the scan ops have
checked once is not checked again, and a CUDA graph replays it), built in the graph where a model is traced.
"""
import functools
from typing import Tuple

import torch

from vmamba_kernels import scan_directions, scan_routes
from vmamba_kernels.reference import exporting
from vmamba_kernels.graphs import capturing

__all__ = ["ROUTE_TABLES", "device_routes"]

# What a route set provides: the routes, the direction id of each step (``scan_directions``), or the raster
# route once per route, for parameters every route reads in raster order (``param_routes`` of the 2D scan), or,
# for a route set that visits every pixel once (atrous), the (H·W,) positions p·K + k of each pixel p's own
# route k among per-route values laid out (..., H·W, K, ...): the only ones the scan reads.
ROUTE_TABLES = ("routes", "directions", "raster_params", "owned_entries")


def _build(name: str, H, W, table: str, options: dict, device) -> torch.Tensor:
    routes = scan_routes(name, H, W, device=device, **options)
    if table == "routes":
        return routes
    if table == "directions":
        return scan_directions(name, H, W, device=device, **options)
    if table == "owned_entries":
        return _owned_entries(routes, H, W)
    return scan_routes("raster", H, W, device=device).expand_as(routes).contiguous()


def _owned_entries(routes: torch.Tensor, H, W) -> torch.Tensor:
    K, Lr = routes.shape
    # Padded steps (-1) write to a slot past the grid, which is dropped.
    pixels = routes.flatten().masked_fill(routes.flatten() < 0, H * W)
    entries = (pixels * K).view(K, Lr) + torch.arange(K, device=routes.device).view(K, 1)
    owned = torch.full((H * W + 1,), -1, dtype=torch.long, device=routes.device)
    return owned.scatter_(0, pixels, entries.flatten())[:H * W]


@functools.lru_cache(maxsize=128)
def _cached_routes(name: str, table: str, H: int, W: int, options: Tuple, device: torch.device) -> torch.Tensor:
    # Built outside inference mode: the scan saves the routes for backward, which an inference tensor
    # cached during evaluation would forbid in a later training step.
    with torch.inference_mode(False):
        return _build(name, H, W, table, dict(options), device)


def device_routes(name: str, H, W, device: torch.device, table: str = "routes", **options) -> torch.Tensor:
    """``scan_routes(name, H, W, **options)`` on ``device``, cached; the scan ops never modify routes.
    ``table`` picks another table of the same route set (``ROUTE_TABLES``).

    Inside a compiled graph the routes are built in the graph, on ``device`` (no host computation or copy there,
    which would keep CUDA graphs out), and the cache is not read: a compiled graph holds no guard on it."""
    if table not in ROUTE_TABLES:
        raise ValueError(f"table must be one of {ROUTE_TABLES}, got {table!r}")
    if exporting() or torch.jit.is_tracing():
        # Built in the graph from the traced sizes (0-dim tensors under jit.trace, symbolic under
        # torch.export), so that an exported or traced model follows its input's size.
        return _build(name, H, W, table, options, device)
    H, W = int(H), int(W)
    if torch.compiler.is_compiling():
        return _build(name, H, W, table, options, device)
    key = (name, table, H, W, tuple(sorted(options.items())), torch.device(device))
    if key not in _built and capturing():
        # A routes tensor cached during a capture would live in the graph's memory pool.
        raise RuntimeError(f"device_routes{key[:5]} is first asked for while a CUDA graph is captured; run the "
                           "model once before capturing it (that call builds and caches its routes)")
    _built.add(key)
    return _cached_routes(*key)


_built = set()  # keys asked for outside a capture (the cache keeps the last 128)
