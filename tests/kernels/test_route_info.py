"""The per-route description the d_state-1 kernel reads (``route_plan._route_info``): which routes are affine
walks of the image, with which numbers, and which steps are first visits. Torch ops only, on CPU."""
import pytest
import torch

import vmamba_kernels as vk
from vmamba_kernels.triton import scan_n1
from vmamba_kernels.triton.route_plan import _route_info

BASE, N_INNER, S_INNER, S_OUTER, AFFINE, FIRST = (scan_n1.INFO_BASE.value, scan_n1.INFO_N_INNER.value,
                                                  scan_n1.INFO_S_INNER.value, scan_n1.INFO_S_OUTER.value,
                                                  scan_n1.INFO_AFFINE.value, scan_n1.INFO_FIRST_MODE.value)


def _first_visits(routes):
    """Step t of route k is the first visit of its pixel in route-major order (what route_plan computes)."""
    seen, first = set(), torch.zeros(routes.shape, dtype=torch.int8)
    for k, route in enumerate(routes.tolist()):
        for t, p in enumerate(route):
            if p >= 0 and p not in seen:
                seen.add(p)
                first[k, t] = 1
    return first


def _walk(row):
    """Positions of an affine row of route_info: base + (t mod n)·s_inner + (t div n)·s_outer."""
    t = torch.arange(12)
    return (row[BASE] + (t % row[N_INNER]) * row[S_INNER] + (t // row[N_INNER]) * row[S_OUTER]).tolist()


def test_cross_routes_are_affine_walks_with_their_numbers():
    routes = vk.scan_routes("cross", 3, 4)
    info = _route_info(routes, _first_visits(routes))
    assert info.dtype == torch.int32 and info.shape == (4, scan_n1.ROUTE_INFO_COLS.value)
    # (base, row length, inner stride, outer stride): raster is one row of 12 pixels; column-major rows of 3
    assert info[:, [BASE, N_INNER, S_INNER, S_OUTER]].tolist() == [[0, 12, 1, 0], [0, 3, 4, 1], [11, 12, -1, 0],
                                                                   [11, 3, -4, -1]]
    assert info[:, AFFINE].tolist() == [1, 1, 1, 1]
    for k in range(4):
        assert _walk(info[k]) == routes[k].tolist()
    # Route 0 visits every pixel first; the others only revisit.
    assert info[:, FIRST].tolist() == [scan_n1.FIRST_ALL.value] + [scan_n1.FIRST_NONE.value] * 3


def test_snakes_and_padded_routes_are_read_through_the_index():
    snakes = vk.scan_routes("continuous", 3, 4)
    assert _route_info(snakes, _first_visits(snakes))[:, AFFINE].tolist() == [0, 0, 0, 0]
    atrous = vk.scan_routes("atrous", 3, 5)  # odd sizes: the sub-grids differ in length, short ones padded
    assert (atrous < 0).any()
    info = _route_info(atrous, _first_visits(atrous))
    padded = (atrous < 0).any(1)
    assert info[padded, AFFINE].tolist() == [0] * int(padded.sum())
    # No pixel is visited twice: every real step is a first visit.
    assert info[:, FIRST].tolist() == [scan_n1.FIRST_ALL.value] * atrous.shape[0]


def test_atrous_sub_grids_of_even_images_are_affine_walks():
    routes = vk.scan_routes("atrous", 4, 6)
    info = _route_info(routes, _first_visits(routes))
    assert info[:, AFFINE].tolist() == [1, 1, 1, 1]
    t = torch.arange(routes.shape[1])
    for k in range(4):
        row = info[k]
        walk = row[BASE] + (t % row[N_INNER]) * row[S_INNER] + (t // row[N_INNER]) * row[S_OUTER]
        assert walk.tolist() == routes[k].tolist()


def test_first_visits_that_vary_within_a_route_are_mixed():
    raster = torch.arange(12)
    routes = torch.stack([torch.where(raster < 6, raster, -1), raster.flip(0)])
    info = _route_info(routes, _first_visits(routes))
    assert info[:, FIRST].tolist() == [scan_n1.FIRST_ALL.value, scan_n1.FIRST_MIXED.value]
    assert info[:, AFFINE].tolist() == [0, 1]  # the padded route is read through its index


@pytest.mark.parametrize("H, W", [(1, 1), (1, 5), (5, 1)])
def test_degenerate_images(H, W):
    routes = vk.scan_routes("cross", H, W)
    info = _route_info(routes, _first_visits(routes))
    assert info[:, AFFINE].tolist() == [1] * 4
    t = torch.arange(H * W)
    for k in range(4):
        row = info[k]
        assert (row[BASE] + (t % row[N_INNER]) * row[S_INNER] + (t // row[N_INNER]) * row[S_OUTER]).tolist() \
            == routes[k].tolist()
