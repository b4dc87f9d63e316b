"""Route sets against orders written out by hand, and their structural properties."""
import pytest
import torch

import vmamba_kernels as vk

# 3×4 grid:   0  1  2  3
#             4  5  6  7
#             8  9 10 11
ROW = list(range(12))
COL = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
ROW_SNAKE = [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]
COL_SNAKE = [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3]
ZIGZAG = [0, 1, 4, 8, 5, 2, 3, 6, 9, 10, 7, 11]       # anti-diagonals, alternating
ZIGZAG_MIRRORED = [3, 2, 7, 11, 6, 1, 0, 5, 10, 9, 4, 8]
SPIRAL = [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]        # clockwise from the top-left
SPIRAL_FLIPPED = [8, 9, 10, 11, 7, 3, 2, 1, 0, 4, 5, 6]


def rev(r):
    return list(reversed(r))


def test_raster_and_cross_3x4():
    assert vk.scan_routes("raster", 3, 4).tolist() == [ROW]
    assert vk.scan_routes("cross", 3, 4).tolist() == [ROW, COL, rev(ROW), rev(COL)]


def test_continuous_3x4_in_plainmamba_order():
    assert vk.scan_routes("continuous", 3, 4).tolist() == [ROW_SNAKE, rev(ROW_SNAKE), COL_SNAKE, rev(COL_SNAKE)]


def test_continuous_directions_3x4():
    # 0 start, 1 right, 2 left, 3 up, 4 down: the move that led into each pixel.
    assert vk.scan_directions("continuous", 3, 4).tolist() == [
        [0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1],
        [0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2],
        [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3],
        [0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3],
    ]


def test_continuous_4x4():
    snake = [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12]
    col_snake = [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3]
    assert vk.scan_routes("continuous", 4, 4).tolist() == [snake, rev(snake), col_snake, rev(col_snake)]


def test_atrous_3x4_and_4x4():
    assert vk.scan_routes("atrous", 3, 4).tolist() == [
        [0, 2, 8, 10], [4, 6, -1, -1], [1, 3, 9, 11], [5, 7, -1, -1]]
    assert vk.scan_routes("atrous", 4, 4, step=2).tolist() == [
        [0, 2, 8, 10], [4, 12, 6, 14], [1, 3, 9, 11], [5, 13, 7, 15]]


def test_multihead_3x4():
    routes = vk.scan_routes("multihead", 3, 4, patterns=("C", "X", "S", "Z")).tolist()
    assert routes == [
        ROW_SNAKE, rev(ROW_SNAKE), COL_SNAKE, rev(COL_SNAKE),
        ZIGZAG, rev(ZIGZAG), ZIGZAG_MIRRORED, rev(ZIGZAG_MIRRORED),
        SPIRAL, rev(SPIRAL), SPIRAL_FLIPPED, rev(SPIRAL_FLIPPED),
        ROW, rev(ROW), COL, rev(COL),
    ]
    assert vk.scan_routes("multihead", 3, 4, patterns=("S",)).tolist() == routes[8:12]


def test_spiral_4x4():
    spiral = [0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9]
    assert vk.scan_routes("multihead", 4, 4, patterns=("S",))[0].tolist() == spiral


SIZES = [(1, 1), (1, 5), (5, 1), (2, 2), (3, 3), (4, 7), (7, 4), (5, 6), (6, 9), (14, 14)]


@pytest.mark.parametrize("H,W", SIZES)
@pytest.mark.parametrize("name,options", [
    ("raster", {}), ("cross", {}), ("continuous", {}),
    ("multihead", dict(patterns=("C", "X", "Z"))),
])
def test_every_route_visits_every_pixel_once(name, options, H, W):
    routes = vk.scan_routes(name, H, W, **options)
    assert routes.dtype == torch.long and routes.shape[1] == H * W
    for r in routes:
        assert sorted(r.tolist()) == list(range(H * W))


@pytest.mark.parametrize("H,W", [(2, 2), (3, 3), (4, 4), (6, 6), (4, 6), (3, 4), (5, 6), (6, 9)])
def test_spiral_is_a_permutation(H, W):
    for r in vk.scan_routes("multihead", H, W, patterns=("S",)):
        assert sorted(r.tolist()) == list(range(H * W))


@pytest.mark.parametrize("H,W", SIZES)
def test_continuous_steps_between_neighbours(H, W):
    routes = vk.scan_routes("continuous", H, W)
    h, w = routes // W, routes % W
    assert ((h[:, 1:] - h[:, :-1]).abs() + (w[:, 1:] - w[:, :-1]).abs() == 1).all()
    dirs = vk.scan_directions("continuous", H, W)
    assert dirs.shape == routes.shape and (dirs[:, 0] == 0).all() and ((dirs[:, 1:] >= 1) & (dirs[:, 1:] <= 4)).all()


@pytest.mark.parametrize("H,W", [(1, 1), (2, 3), (3, 3), (5, 4), (7, 9), (56, 56), (55, 57)])
def test_atrous_partitions_the_grid(H, W):
    routes = vk.scan_routes("atrous", H, W)
    assert routes.shape == (4, ((H + 1) // 2) * ((W + 1) // 2))
    visited = routes[routes >= 0].tolist()
    assert sorted(visited) == list(range(H * W))
    for r in routes:  # -1 only pads the end
        n = int((r >= 0).sum())
        assert (r[:n] >= 0).all() and (r[n:] == -1).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="route name must be one of"):
        vk.scan_routes("diagonal", 4, 4)
    with pytest.raises(ValueError, match="H must be a positive int, got 0"):
        vk.scan_routes("cross", 0, 4)
    with pytest.raises(ValueError, match="step=2"):
        vk.scan_routes("atrous", 4, 4, step=3)
    with pytest.raises(ValueError, match="unknown"):
        vk.scan_routes("cross", 4, 4, step=2)
    with pytest.raises(ValueError, match="pattern must be one of"):
        vk.scan_routes("multihead", 4, 4, patterns=("Q",))
    with pytest.raises(ValueError, match="defined for 'continuous'"):
        vk.scan_directions("cross", 4, 4)


@pytest.mark.parametrize("name, options", [("raster", {}), ("cross", {}), ("continuous", {}),
                                           ("atrous", {"step": 2}), ("multihead", {})])
def test_routes_built_on_a_device_create_nothing_elsewhere(name, options):
    """device= builds every tensor there (a compiled graph then holds no host work and no copy); the meta
    device, which has no data, fails an op that would mix in a tensor made elsewhere."""
    routes = vk.scan_routes(name, 5, 6, device="meta", **options)
    want = vk.scan_routes(name, 5, 6, **options)
    assert routes.device.type == "meta" and routes.shape == want.shape and routes.dtype == want.dtype
    if name == "continuous":
        directions = vk.scan_directions(name, 5, 6, device="meta")
        assert directions.device.type == "meta" and directions.shape == vk.scan_directions(name, 5, 6).shape
