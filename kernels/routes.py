"""2D scan routes as data.

A route set is a LongTensor (K, Lr): entry [k, t] is the raster index h*W + w of the pixel that route k
visits at step t. Routes shorter than Lr are padded at the end with -1. Every family's scan pattern is a
route set, so one kernel serves them all; the orders below reproduce the official code of each family.

- ``raster``      K=1: row-major.
- ``cross``       K=4: row-major, column-major, row-major reversed, column-major reversed (VMamba's
                  CrossScan; GroupMamba gives one of the four to each channel group).
- ``continuous``  K=4: PlainMamba's snakes: a row snake from the top-left, the same snake from its end
                  (PlainMamba's bottom start), a column snake from the top-left, and that one from its end.
- ``atrous``      K=4 (step=2): EfficientVMamba's ES2D sub-grids (even h, even w) row-major, (odd h, even
                  w) column-major, (even h, odd w) row-major, (odd h, odd w) column-major. They partition
                  the grid; with odd H or W their lengths differ.
- ``multihead``   MHS-VM: each pattern gives two routes and their reverses, ordered
                  [r0, r0 reversed, r1, r1 reversed]; patterns C (row snake, column snake), X
                  (anti-diagonal zigzag, its mirror), S (clockwise spiral, its vertical flip),
                  Z (row-major, column-major).
"""
from typing import Sequence

import torch

__all__ = ["ROUTE_NAMES", "DIRECTION_IDS", "scan_routes", "scan_directions"]

ROUTE_NAMES = ("raster", "cross", "continuous", "atrous", "multihead")
# PlainMamba's direction vocabulary: the move that led into a pixel.
DIRECTION_IDS = {"start": 0, "right": 1, "left": 2, "up": 3, "down": 4}
MULTIHEAD_PATTERNS = ("C", "X", "S", "Z")


def _grid(H: int, W: int) -> torch.Tensor:
    return torch.arange(H * W, dtype=torch.long).view(H, W)


def _row_snake(H: int, W: int) -> torch.Tensor:
    grid = _grid(H, W)
    odd_rows = (torch.arange(H) % 2 == 1)[:, None]
    return torch.where(odd_rows, grid.flip(1), grid).reshape(-1)


def _column_snake(H: int, W: int) -> torch.Tensor:
    grid = _grid(H, W).t()
    odd_cols = (torch.arange(W) % 2 == 1)[:, None]
    return torch.where(odd_cols, grid.flip(1), grid).reshape(-1)


def _antidiagonal_zigzag(H: int, W: int) -> torch.Tensor:
    # MHS-VM's diag_scan(cw=True): walk the anti-diagonals i + j = k in order; even k run from the
    # bottom (large i) up, odd k from the top down.
    i = torch.arange(H)[:, None].expand(H, W)
    j = torch.arange(W)[None, :].expand(H, W)
    k = i + j
    within = torch.where(k % 2 == 0, H - 1 - i, i)
    order = torch.argsort((k * H + within).reshape(-1))
    return _grid(H, W).reshape(-1)[order]


def _clockwise_spiral(H: int, W: int) -> torch.Tensor:
    # MHS-VM's spiral_scan, ring by ring from the outside; its last ring may repeat pixels, which the
    # truncation to H*W removes, exactly as in the original.
    rows, cols = [], []
    top, left, bottom, right = 0, 0, H - 1, W - 1
    while True:
        rows += [top] * (right - left) + list(range(top, bottom)) + [bottom] * (right - left)
        rows += list(range(bottom, top, -1))
        cols += list(range(left, right)) + [right] * (bottom - top) + list(range(right, left, -1))
        cols += [left] * (bottom - top)
        top, left, bottom, right = top + 1, left + 1, bottom - 1, right - 1
        if top > bottom or left > right:
            break
        if top == bottom and left == right:
            rows.append(top)
            cols.append(left)
    rows, cols = torch.tensor(rows[: H * W]), torch.tensor(cols[: H * W])
    return rows * W + cols


def _pattern_pair(pattern: str, H: int, W: int):
    grid = _grid(H, W)
    if pattern == "C":
        return _row_snake(H, W), _column_snake(H, W)
    if pattern == "X":
        zigzag = _antidiagonal_zigzag(H, W)
        mirrored = (zigzag // W) * W + (W - 1 - zigzag % W)
        return zigzag, mirrored
    if pattern == "S":
        spiral = _clockwise_spiral(H, W)
        flipped = (H - 1 - spiral // W) * W + spiral % W
        return spiral, flipped
    if pattern == "Z":
        return grid.reshape(-1), grid.t().reshape(-1)
    raise ValueError(f"multihead pattern must be one of {MULTIHEAD_PATTERNS}, got {pattern!r}")


def _pad_stack(routes: Sequence[torch.Tensor]) -> torch.Tensor:
    length = max(r.numel() for r in routes)
    out = torch.full((len(routes), length), -1, dtype=torch.long)
    for k, r in enumerate(routes):
        out[k, : r.numel()] = r
    return out


def _atrous(H: int, W: int, step: int) -> torch.Tensor:
    if step != 2:
        raise ValueError(f"atrous routes are defined for step=2 (EfficientVMamba's 4 sub-grids), got step={step}")
    grid = _grid(H, W)
    return _pad_stack([
        grid[0::2, 0::2].reshape(-1),
        grid[1::2, 0::2].t().reshape(-1),
        grid[0::2, 1::2].reshape(-1),
        grid[1::2, 1::2].t().reshape(-1),
    ])


def scan_routes(name: str, H: int, W: int, **options) -> torch.Tensor:
    """Route set ``name`` on an H×W grid as a (K, Lr) LongTensor of raster indices, -1 padded.

    Options: ``step`` for "atrous" (2); ``patterns`` for "multihead" (default ("C", "X", "S", "Z")).
    """
    if not isinstance(name, str) or name not in ROUTE_NAMES:
        raise ValueError(f"route name must be one of {ROUTE_NAMES}, got {name!r}")
    for dim_name, dim in (("H", H), ("W", W)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{dim_name} must be a positive int, got {dim!r}")
    allowed = {"atrous": {"step"}, "multihead": {"patterns"}}.get(name, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"route {name!r} takes options {sorted(allowed)}, got unknown {sorted(unknown)}")

    grid = _grid(H, W)
    if name == "raster":
        return grid.reshape(1, -1)
    if name == "cross":
        rows, cols = grid.reshape(-1), grid.t().reshape(-1)
        return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])
    if name == "continuous":
        rows, cols = _row_snake(H, W), _column_snake(H, W)
        return torch.stack([rows, rows.flip(0), cols, cols.flip(0)])
    if name == "atrous":
        return _atrous(H, W, options.get("step", 2))
    patterns = options.get("patterns", MULTIHEAD_PATTERNS)
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"patterns must be a non-empty sequence of {MULTIHEAD_PATTERNS}, got {patterns!r}")
    routes = []
    for pattern in patterns:
        r0, r1 = _pattern_pair(pattern, H, W)
        routes += [r0, r0.flip(0), r1, r1.flip(0)]
    return torch.stack(routes)


def scan_directions(name: str, H: int, W: int, **options) -> torch.Tensor:
    """(K, L) direction ids of each step (0 start, 1 right, 2 left, 3 up, 4 down): the move that led
    into the pixel, as PlainMamba indexes its ``direction_Bs``. Defined for routes that move between
    4-neighbours ("continuous")."""
    if name != "continuous":
        raise ValueError(f"scan_directions is defined for 'continuous' routes, got {name!r}")
    routes = scan_routes(name, H, W, **options)
    h, w = routes // W, routes % W
    dh, dw = h[:, 1:] - h[:, :-1], w[:, 1:] - w[:, :-1]
    moves = torch.zeros_like(dh)
    moves[dw == 1] = DIRECTION_IDS["right"]
    moves[dw == -1] = DIRECTION_IDS["left"]
    moves[dh == -1] = DIRECTION_IDS["up"]
    moves[dh == 1] = DIRECTION_IDS["down"]
    start = torch.full((routes.shape[0], 1), DIRECTION_IDS["start"], dtype=torch.long)
    return torch.cat([start, moves], dim=1)
