"""What the 2D kernels need to know about a route set, computed on the device without a host sync.

- ``first_visit`` (K, Lr) int8: step t of route k is the first visit of its pixel, in route-major order.
  Outputs summed over routes are stored there and read-added at later visits.
- ``parallel_ok`` (1,) int32: no pixel is visited twice, so routes may run in parallel programs.
- ``coverage`` (3,) int32: every route visits every pixel; every pixel is visited by some route; every
  route reads parameters at every pixel. Kernels skip zeroing unvisited outputs when these hold.
- ``x_visited`` (K, L) and ``x_visited_any`` (L,) int8: pixel p is visited (position routes[k, t]).
- ``param_visited`` (K, L) int8: pixel q is read for parameters (position param_routes[k, t]).
  Outputs that no route writes are zero; the visit maps say where.
- ``param_target`` (1, K·Lr, 1): where step t of route k lands in a (pixel, route) table, for placing the
  per-step B/C gradients (padded steps point at pixel 0 and carry zeros).
- ``route_info`` (K, 8) int32, for the d_state-1 kernel (``scan_n1.py``): whether route k walks the image
  as p = base + (t mod n)·s_inner + (t div n)·s_outer, with those numbers, and whether its steps are all,
  none or some first visits.

A route must not visit a pixel twice (every ``scan_routes`` set satisfies this); routes may overlap
each other arbitrarily.
"""
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..graphs import capturing
from . import scan_n1
from .alloc import empty, persistent

__all__ = ["RoutePlan", "route_plan"]

_INT32_MAX = tl.constexpr(2**31 - 1)


class RoutePlan(NamedTuple):
    routes: torch.Tensor  # int32 copies for the kernels
    param_routes: torch.Tensor
    first_visit: torch.Tensor
    parallel_ok: torch.Tensor
    coverage: torch.Tensor
    x_visited: torch.Tensor
    x_visited_any: torch.Tensor
    param_visited: torch.Tensor
    param_target: torch.Tensor  # (1, K·Lr, 1) int64: row param_routes[k, t]·K + k of a (pixel·K + route) table
    route_info: torch.Tensor  # (K, ROUTE_INFO_COLS) int32, columns as in scan_n1


@triton.jit
def route_plan_kernel(routes, param_routes, first_key, first_visit, parallel_ok, coverage, x_visited,
                      x_visited_any, param_visited, K, Lr, L, BLOCK: tl.constexpr):
    # One program: phases separated by barriers (fill, scatter, compare and count).
    offs = tl.arange(0, BLOCK)
    for i in range(0, tl.cdiv(L, BLOCK)):
        pos = i * BLOCK + offs
        m = pos < L
        tl.store(first_key + pos, tl.full([BLOCK], _INT32_MAX, tl.int32), mask=m)
        tl.store(x_visited_any + pos, tl.zeros([BLOCK], tl.int8), mask=m)
        for k in range(0, K):
            tl.store(x_visited + k * L + pos, tl.zeros([BLOCK], tl.int8), mask=m)
            tl.store(param_visited + k * L + pos, tl.zeros([BLOCK], tl.int8), mask=m)
    tl.debug_barrier()
    n_entries = K * Lr
    for i in range(0, tl.cdiv(n_entries, BLOCK)):
        idx = i * BLOCK + offs
        m = idx < n_entries
        k = idx // Lr
        p = tl.load(routes + idx, mask=m, other=-1).to(tl.int32)
        q = tl.load(param_routes + idx, mask=m, other=-1).to(tl.int32)
        valid = m & (p >= 0)
        p = tl.where(valid, p, 0)
        q = tl.where(valid, q, 0)
        tl.atomic_min(first_key + p, idx, mask=valid)
        ones = tl.full([BLOCK], 1, tl.int8)
        tl.store(x_visited + k * L + p, ones, mask=valid)
        tl.store(x_visited_any + p, ones, mask=valid)
        tl.store(param_visited + k * L + q, ones, mask=valid)
    tl.debug_barrier()
    repeats = tl.zeros([BLOCK], tl.int32)
    for i in range(0, tl.cdiv(n_entries, BLOCK)):
        idx = i * BLOCK + offs
        m = idx < n_entries
        p = tl.load(routes + idx, mask=m, other=-1).to(tl.int32)
        valid = m & (p >= 0)
        key = tl.load(first_key + tl.where(valid, p, 0), mask=valid, other=-1, cache_modifier=".cg")
        first = valid & (key == idx)
        tl.store(first_visit + idx, first.to(tl.int8), mask=m)
        repeats += (valid & (key != idx)).to(tl.int32)
    tl.store(parallel_ok, (tl.sum(repeats, axis=0) == 0).to(tl.int32))
    x_missing = tl.zeros([BLOCK], tl.int32)
    any_missing = tl.zeros([BLOCK], tl.int32)
    param_missing = tl.zeros([BLOCK], tl.int32)
    for i in range(0, tl.cdiv(L, BLOCK)):
        pos = i * BLOCK + offs
        m = pos < L
        any_missing += (tl.load(x_visited_any + pos, mask=m, other=1, cache_modifier=".cg") == 0).to(tl.int32)
        for k in range(0, K):
            x_missing += (tl.load(x_visited + k * L + pos, mask=m, other=1, cache_modifier=".cg") == 0).to(tl.int32)
            param_missing += (tl.load(param_visited + k * L + pos, mask=m, other=1,
                                      cache_modifier=".cg") == 0).to(tl.int32)
    tl.store(coverage + 0, (tl.sum(x_missing, axis=0) == 0).to(tl.int32))
    tl.store(coverage + 1, (tl.sum(any_missing, axis=0) == 0).to(tl.int32))
    tl.store(coverage + 2, (tl.sum(param_missing, axis=0) == 0).to(tl.int32))


def _route_info(routes: torch.Tensor, first_visit: torch.Tensor) -> torch.Tensor:
    """Per route: the affine walk that reproduces it, if one does, and its first-visit mode (device ops
    only, no host sync). An internal that tests/kernels/test_route_info.py checks on its own."""
    K, Lr = routes.shape
    if Lr == 0:  # routes of an empty grid take no step: nothing to describe
        return torch.zeros(K, scan_n1.ROUTE_INFO_COLS.value, dtype=torch.int32, device=routes.device)
    r = routes.to(torch.int64)
    t = torch.arange(Lr, device=r.device)
    base = r[:, 0]
    s_inner = r[:, 1] - base if Lr > 1 else torch.zeros_like(base)
    # The row length n is where the stride first changes (a sentinel change after the last step); the outer
    # stride is the jump to the next row.
    sentinel = torch.ones_like(base, dtype=torch.bool)[:, None]
    breaks = torch.cat([(r[:, 1:] - r[:, :-1]) != s_inner[:, None], sentinel], 1)
    n_inner = breaks.to(torch.int8).argmax(1) + 1
    s_outer = torch.where(n_inner < Lr, r.gather(1, n_inner.clamp(max=Lr - 1)[:, None])[:, 0] - base, 0)
    walk = base[:, None] + (t % n_inner[:, None]) * s_inner[:, None] + (t // n_inner[:, None]) * s_outer[:, None]
    affine = ((walk == r) & (r >= 0)).all(1)
    real = r >= 0
    all_first = ((first_visit != 0) | ~real).all(1)
    none_first = ((first_visit == 0) | ~real).all(1)
    first_mode = torch.where(all_first, scan_n1.FIRST_ALL.value,
                             torch.where(none_first, scan_n1.FIRST_NONE.value, scan_n1.FIRST_MIXED.value))
    zeros = torch.zeros_like(base)
    columns = [base, n_inner, s_inner, s_outer, affine.to(torch.int64), first_mode]
    columns += [zeros] * (scan_n1.ROUTE_INFO_COLS.value - len(columns))
    return torch.stack(columns, 1).to(torch.int32).contiguous()


# Plans of route tensors seen before, keyed by the identity of the tensor objects (models keep their
# routes in device_routes' cache); an entry dies with its routes tensor. Cached plans are allocated outside CUDA graph
# pools, and none is cached while a graph is captured: that call's plan belongs to the graph. An internal the
# graph-safety tests empty and count.
_cache: dict = {}


def route_plan(routes: torch.Tensor, param_routes: torch.Tensor, L: int) -> RoutePlan:
    """The plan of (routes, param_routes) over L pixels; cached while both tensors are unchanged."""
    stamp = (routes.data_ptr(), param_routes.data_ptr(), routes._version, param_routes._version, L)
    hit = _cache.get(id(routes))
    if hit is not None and hit[0]() is routes and hit[1]() is param_routes and hit[2] == stamp:
        return hit[3]
    if capturing():
        return _build_plan(routes, param_routes, L)
    with persistent(routes.device) as keep:
        plan = _build_plan(routes, param_routes, L)
        keep(*plan)
    key = id(routes)
    try:
        _cache[key] = (weakref.ref(routes, lambda _: _cache.pop(key, None)), weakref.ref(param_routes), stamp, plan)
    except TypeError:  # objects that take no weak references are simply not cached
        pass
    return plan


def _build_plan(routes: torch.Tensor, param_routes: torch.Tensor, L: int) -> RoutePlan:
    K, Lr = routes.shape
    dev = routes.device
    plan = RoutePlan(
        routes=routes.to(torch.int32).contiguous(),
        param_routes=param_routes.to(torch.int32).contiguous(),
        first_visit=empty(K, Lr, dtype=torch.int8, device=dev),
        parallel_ok=empty(1, dtype=torch.int32, device=dev),
        coverage=empty(3, dtype=torch.int32, device=dev),
        x_visited=empty(K, L, dtype=torch.int8, device=dev),
        x_visited_any=empty(L, dtype=torch.int8, device=dev),
        param_visited=empty(K, L, dtype=torch.int8, device=dev),
        param_target=(param_routes.clamp(min=0) * K + torch.arange(K, device=dev)[:, None]).reshape(1, -1, 1),
        route_info=None,
    )
    first_key = empty(L, dtype=torch.int32, device=dev)
    route_plan_kernel[(1,)](routes.contiguous(), param_routes.contiguous(), first_key, plan.first_visit,
                            plan.parallel_ok, plan.coverage, plan.x_visited, plan.x_visited_any, plan.param_visited,
                            K, Lr, L, BLOCK=1024, num_warps=8)
    return plan._replace(route_info=_route_info(routes, plan.first_visit))
