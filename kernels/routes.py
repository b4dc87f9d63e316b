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


# Every builder computes indices from arange with tensor ops, so that the sizes H and W may be Python
# ints, symbolic sizes (torch.export) or 0-dim tensors (torch.jit.trace): an exported or traced graph
# then builds the routes of whatever grid it is given.


def _steps(n, device=None) -> torch.Tensor:
    return torch.arange(n, dtype=torch.long, device=device)


def _index_value(n):
    """A size for index arithmetic: symbolic sizes become 0-dim tensors, since the ONNX exporter
    translates arithmetic between tensors but not with a symbolic scalar."""
    return torch.scalar_tensor(n, dtype=torch.long) if isinstance(n, torch.SymInt) else n


def _at_least_one(n):
    """max(n, 1) for an int or a 0-dim tensor (a divisor for empty sub-grids)."""
    if isinstance(n, torch.Tensor):
        return n.clamp_min(1)
    return max(n, 1)


def _column_major(t: torch.Tensor, H, W) -> torch.Tensor:
    return (t % H) * W + t // H


def _row_snake(t: torch.Tensor, H, W) -> torch.Tensor:
    h, c = t // W, t % W
    return h * W + torch.where(h % 2 == 1, W - 1 - c, c)


def _column_snake(t: torch.Tensor, H, W) -> torch.Tensor:
    w, c = t // H, t % H
    return torch.where(w % 2 == 1, H - 1 - c, c) * W + w


def _antidiagonal_zigzag(t: torch.Tensor, H, W) -> torch.Tensor:
    # MHS-VM's diag_scan(cw=True): walk the anti-diagonals i + j = k in order; even k run from the
    # bottom (large i) up, odd k from the top down.
    i, j = t // W, t % W
    k = i + j
    within = torch.where(k % 2 == 0, H - 1 - i, i)
    return torch.argsort(k * H + within)


def _clockwise_spiral(t: torch.Tensor, H, W) -> torch.Tensor:
    # MHS-VM's spiral_scan, ring by ring from the outside, each ring clockwise from its top-left corner;
    # a ring one pixel high runs left to right, one pixel wide top to bottom (the original's loop
    # revisits pixels there, which its truncation to H*W removes). Closed form: each pixel's position is
    # the pixels of the outer rings plus its place on its own ring; the route is the inverse.
    i, j = t // W, t % W
    r = torch.minimum(torch.minimum(i, j), torch.minimum(H - 1 - i, W - 1 - j))
    top, bottom, right = r, H - 1 - r, W - 1 - r
    across, down = right - r, bottom - top  # ring width - 1, ring height - 1
    place = torch.where(
        (i == top) & ((j < right) | (down == 0)), j - r,
        torch.where((j == right) & ((i < bottom) | (across == 0)), across + i - top,
                    torch.where(i == bottom, across + down + right - j,
                                2 * across + down + bottom - i)))
    position = H * W - (across + 1) * (down + 1) + place
    return torch.zeros_like(t).scatter(0, position, t)


def _pattern_pair(pattern: str, t: torch.Tensor, H, W):
    if pattern == "C":
        return _row_snake(t, H, W), _column_snake(t, H, W)
    if pattern == "X":
        zigzag = _antidiagonal_zigzag(t, H, W)
        mirrored = (zigzag // W) * W + (W - 1 - zigzag % W)
        return zigzag, mirrored
    if pattern == "S":
        spiral = _clockwise_spiral(t, H, W)
        flipped = (H - 1 - spiral // W) * W + spiral % W
        return spiral, flipped
    if pattern == "Z":
        return t, _column_major(t, H, W)
    raise ValueError(f"multihead pattern must be one of {MULTIHEAD_PATTERNS}, got {pattern!r}")


def _atrous(H, W, step: int, device) -> torch.Tensor:
    if step != 2:
        raise ValueError(f"atrous routes are defined for step=2 (EfficientVMamba's 4 sub-grids), got step={step}")
    # Sub-grids (even h, even w) row-major, (odd h, even w) column-major, (even h, odd w) row-major,
    # (odd h, odd w) column-major; the first is the largest, the others are padded (-1) to its length.
    t = _steps(((H + 1) // 2) * ((W + 1) // 2), device)
    H, W = _index_value(H), _index_value(W)
    even_h, odd_h, even_w, odd_w = (H + 1) // 2, H // 2, (W + 1) // 2, W // 2

    def sub_grid(rows, cols, h0, w0, column_major):
        if column_major:
            q, c = t % _at_least_one(rows), t // _at_least_one(rows)
        else:
            q, c = t // _at_least_one(cols), t % _at_least_one(cols)
        return torch.where(t < rows * cols, (2 * q + h0) * W + 2 * c + w0, -1)

    return torch.stack([
        sub_grid(even_h, even_w, 0, 0, False),
        sub_grid(odd_h, even_w, 1, 0, True),
        sub_grid(even_h, odd_w, 0, 1, False),
        sub_grid(odd_h, odd_w, 1, 1, True),
    ])


def scan_routes(name: str, H: int, W: int, *, device=None, **options) -> torch.Tensor:
    """Route set ``name`` on an H×W grid as a (K, Lr) LongTensor of raster indices, -1 padded, built on
    ``device`` (default: the default device).

    Options: ``step`` for "atrous" (2); ``patterns`` for "multihead" (default ("C", "X", "S", "Z")).
    """
    if not isinstance(name, str) or name not in ROUTE_NAMES:
        raise ValueError(f"route name must be one of {ROUTE_NAMES}, got {name!r}")
    for dim_name, dim in (("H", H), ("W", W)):
        if isinstance(dim, bool) or not isinstance(dim, (int, torch.SymInt, torch.Tensor)):
            raise ValueError(f"{dim_name} must be a positive int, got {dim!r}")
        if isinstance(dim, torch.Tensor) and (dim.dim() != 0 or dim.is_floating_point()):
            raise ValueError(f"{dim_name} must be an int or a 0-dim integer tensor (a traced size), got {dim!r}")
        if isinstance(dim, int) and dim < 1:
            raise ValueError(f"{dim_name} must be a positive int, got {dim!r}")
    allowed = {"atrous": {"step"}, "multihead": {"patterns"}}.get(name, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"route {name!r} takes options {sorted(allowed)}, got unknown {sorted(unknown)}")

    if name == "atrous":
        return _atrous(H, W, options.get("step", 2), device)
    t = _steps(H * W, device)  # raster order; the count stays an int or a symbolic size
    H, W = _index_value(H), _index_value(W)
    if name == "raster":
        return t.unsqueeze(0)
    if name == "cross":
        rows, cols = t, _column_major(t, H, W)
        return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])
    if name == "continuous":
        rows, cols = _row_snake(t, H, W), _column_snake(t, H, W)
        return torch.stack([rows, rows.flip(0), cols, cols.flip(0)])
    patterns = options.get("patterns", MULTIHEAD_PATTERNS)
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"patterns must be a non-empty sequence of {MULTIHEAD_PATTERNS}, got {patterns!r}")
    routes = []
    for pattern in patterns:
        r0, r1 = _pattern_pair(pattern, t, H, W)
        routes += [r0, r0.flip(0), r1, r1.flip(0)]
    return torch.stack(routes)


def scan_directions(name: str, H: int, W: int, *, device=None, **options) -> torch.Tensor:
    """(K, L) direction ids of each step (0 start, 1 right, 2 left, 3 up, 4 down): the move that led
    into the pixel, as PlainMamba indexes its ``direction_Bs``. Defined for routes that move between
    4-neighbours ("continuous")."""
    if name != "continuous":
        raise ValueError(f"scan_directions is defined for 'continuous' routes, got {name!r}")
    routes = scan_routes(name, H, W, device=device, **options)
    W = _index_value(W)
    h, w = routes // W, routes % W
    dh, dw = h[:, 1:] - h[:, :-1], w[:, 1:] - w[:, :-1]
    moves = torch.zeros_like(dh)
    for step, move in (((dw == 1), "right"), ((dw == -1), "left"), ((dh == -1), "up"), ((dh == 1), "down")):
        moves = torch.where(step, DIRECTION_IDS[move], moves)
    start = torch.full((routes.shape[0], 1), DIRECTION_IDS["start"], dtype=torch.long, device=routes.device)
    return torch.cat([start, moves], dim=1)
