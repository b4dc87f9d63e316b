"""Launchers of the fused kernels: the six backend functions of ``vmamba_kernels.ops``.

Each op is described as K scans of CPG channels over Lr steps (see ``scan.py``): the 1D scan has one
scan per B/C group and reads positions t directly; the 2D scan has one scan per route and reads through
the route index. Tensors are passed with their strides (no permuted copies).

The backward recomputes each chunk's states from the state saved at the chunk's start. For the 2D op the
forward saves them when a gradient is needed (``selective_scan_2d_fwd_saving``) and the backward reads them
(``selective_scan_2d_bwd_from_saved``); otherwise, and for the 1D ops, the backward first recomputes them
with a states-only pass.

fp64 inputs (gradcheck) go to the reference backend. Routes must not visit a pixel twice (every
``scan_routes`` set satisfies this).
"""
import functools
import os
import warnings
from typing import NamedTuple, Optional

import torch

from ..graphs import capturing
from . import scan, scan_n1, tiles
from .alloc import empty, persistent
from .route_plan import route_plan
from .tiles import (
    _INTERPRET,
    _bwd_tuned,
    _even,
    _even_n1,
    _fwd_tuned,
    _interpret_n1_tile,
    _n1_bwd_tuned,
    _n1_tuned,
    _pow2,
    _prune_bwd,
    _prune_fwd,
    bwd_block_d_candidates,
    chunk_size,
    n1_bwd_block_d_candidates,
)

__all__ = [
    "selective_scan_fwd",
    "selective_scan_bwd",
    "selective_scan_states_fwd",
    "selective_scan_states_bwd",
    "selective_scan_2d_fwd",
    "selective_scan_2d_bwd",
    "selective_scan_2d_fwd_saving",
    "selective_scan_2d_bwd_from_saved",
    "chunk_size",
    "chunk_states_shape",
    "set_atomic_merge",
    "set_n1_kernel",
]

_settings = {"atomic_merge": os.environ.get("VMAMBA_KERNELS_ATOMIC_MERGE", "0") == "1",
             "n1_kernel": os.environ.get("VMAMBA_KERNELS_N1", "1") == "1"}


def set_n1_kernel(enabled: bool) -> None:
    """Whether 2D scans with d_state 1 use their own forward kernel (``scan_n1.py``, the default) or the
    general one (for comparisons)."""
    _settings["n1_kernel"] = bool(enabled)


def set_atomic_merge(enabled: bool) -> None:
    """Opt in to fp32 atomic adds for sums over routes (faster where routes overlap, not deterministic)."""
    _settings["atomic_merge"] = bool(enabled)


# A plain integer helper: triton.cdiv is a constexpr function in Triton 3.8, whose calls from Python cost
# microseconds each, and the launchers call it a few dozen times per op.
def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------------------------------
# Launches (the tiles and their tuners are in tiles.py; plain launches with a fixed tile under the interpreter)


def _launch_fwd(grid, **kw):
    if _INTERPRET:
        kw.update(BT=4, BD=min(8, _pow2(kw["CPG"])), PREFETCH=os.environ.get("VMAMBA_KERNELS_PREFETCH", "1") == "1",
                  VEC=True)
    elif kw["MERGE"] == scan.MERGE_ATOMIC:
        cfg = _prune_fwd(_fwd_tuned.configs, {}, **kw)[0]
        kw.update(cfg.kwargs, num_warps=cfg.num_warps)
    else:
        _tuned(_fwd_tuned, grid, kw)
        return
    kw.update(_even(kw))
    scan.selective_scan_fwd_kernel[grid(kw)](**kw)


def _launch_n1(grid, **kw):
    if _INTERPRET:
        tile = _interpret_n1_tile(kw["CPG"])
        del tile["FLIP"]  # the backward's
        kw.update(tile, num_warps=1)
        kw.update(_even_n1(kw))
        scan_n1.route_scan_n1_fwd_kernel[grid(kw)](**kw)
    else:
        _tuned(_n1_tuned, grid, kw)


def _launch_n1_bwd(grid, **kw) -> int:
    """Launch the d_state-1 backward; returns the channel block it ran with."""
    if _INTERPRET:
        kw.update(_interpret_n1_tile(kw["CPG"]), num_warps=1)
        kw.update(_even_n1(kw))
        scan_n1.route_scan_n1_bwd_kernel[grid(kw)](**kw)
        return kw["BD"]
    return _tuned(_n1_bwd_tuned, grid, kw).kwargs["BD"]


def _launch_bwd(grid, **kw) -> int:
    """Launch the backward; returns the channel block it ran with."""
    if _INTERPRET:
        kw.update(BD=bwd_block_d_candidates(kw["CPG"], kw["N"])[0])
    elif kw["DX_MERGE"] == scan.MERGE_ATOMIC:
        cfg = _prune_bwd(_bwd_tuned.configs, {}, **kw)[0]
        kw.update(cfg.kwargs, num_warps=cfg.num_warps)
    else:
        return _tuned(_bwd_tuned, grid, kw).kwargs["BD"]
    kw.update(_even(kw))
    scan.selective_scan_bwd_kernel[grid(kw)](**kw)
    return kw["BD"]


_warned_untuned = set()


def _tuned(tuner, grid, kw):
    """Launch through ``tuner``; returns the config it ran with.

    While a CUDA graph is captured a problem the tuner has not seen yet runs with the tile the tuner would
    pick without timing runs (the table's, or the first fitting one), and is not remembered, so nothing is
    cached during the capture; where tuning runs are on (which time launches with host syncs, forbidden in a
    capture) it says so once per kernel and problem. Its first call outside a capture tunes it."""
    if not capturing():
        tuner[grid](**kw)
        return tuner.best_config
    key = tuner.problem_key(kw)
    config = tuner.cache.get(key)
    if config is not None:
        tuner[grid](**kw)  # a known problem: no tuning runs
        return config
    config = tuner.pick(kw, key)
    name = tuner.base_fn.__name__
    if tiles.tuning_runs() and (name, key) not in _warned_untuned:
        _warned_untuned.add((name, key))
        warnings.warn(f"{name}: no tuned tile for problem {key} while a CUDA graph is captured; running "
                      f"{config.all_kwargs()} untuned (run one step before capturing to tune it)", RuntimeWarning,
                      stacklevel=2)
    tuner.fn.run(grid=grid, warmup=False, **kw, **config.all_kwargs())
    return config


_dummies = {}


def _dummy(device) -> torch.Tensor:
    """A one-element buffer for pointer arguments a launch does not use (never an input: a kernel or a
    tuner must not be able to touch user tensors through an unused argument). Kept per device outside CUDA
    graph pools; while a graph is captured one that is not kept yet is made for the call (the graph's)."""
    dummy = _dummies.get(device)
    if dummy is None:
        if capturing():
            return torch.zeros(1, device=device, dtype=torch.float32)
        with persistent(device) as keep:
            dummy = torch.zeros(1, device=device, dtype=torch.float32)
            keep(dummy)
        _dummies[device] = dummy
    return dummy


# --------------------------------------------------------------------------------------------------
# Problem description


class _Problem(NamedTuple):
    Bt: int
    K: int
    CPG: int
    N: int
    Lr: int
    L: int
    gather: bool
    x: torch.Tensor
    sx: tuple
    delta: torch.Tensor
    sdt: tuple
    A: torch.Tensor
    sA: tuple
    B: torch.Tensor
    sB: tuple
    C: Optional[torch.Tensor]
    sC: tuple
    D: Optional[torch.Tensor]
    delta_bias: Optional[torch.Tensor]
    sD: tuple
    z: Optional[torch.Tensor]
    sz: tuple
    routes: Optional[torch.Tensor]
    param_routes: Optional[torch.Tensor]


def _bc_1d(M):
    if M is None:
        return (0, 0, 0, 0)
    if M.dim() == 4:  # (Bt, G, N, L)
        return (M.stride(0), M.stride(1), M.stride(3), M.stride(2))
    return (M.stride(0), 0, M.stride(2), M.stride(1))


def _problem_1d(u, delta, A, B, C=None, D=None, z=None, delta_bias=None) -> _Problem:
    Bt, Dm, L = u.shape
    G = next((M.shape[1] for M in (B, C) if M is not None and M.dim() == 4), 1)
    CPG = Dm // G

    def chan(t):  # (Bt, Dm, L): group k is the channel block k
        return (t.stride(0), CPG * t.stride(1), t.stride(2), t.stride(1))

    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    sD = (CPG, 1)
    return _Problem(Bt, G, CPG, A.shape[1], L, L, False, u, chan(u), delta, chan(delta),
                    A, (CPG * A.stride(0), A.stride(0), A.stride(1)), B, _bc_1d(B), C, _bc_1d(C), D, delta_bias,
                    sD, z, chan(z) if z is not None else (0, 0, 0, 0), None, None)


def _problem_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes) -> _Problem:
    Bt, H, W, K, Dm = delta.shape
    L = H * W
    N = A.shape[2]
    if x.dim() == 4:
        x = x.reshape(Bt, L, Dm)
        sx = (x.stride(0), 0, x.stride(1), x.stride(2))
    else:
        x = x.reshape(Bt, L, K, Dm)
        sx = (x.stride(0), x.stride(2), x.stride(1), x.stride(3))

    def per_route(t, F):  # (Bt, H, W, K, F) → strides (batch, route, pixel, feature)
        t = t.reshape(Bt, L, K, F)
        return t, (t.stride(0), t.stride(2), t.stride(1), t.stride(3))

    delta, sdt = per_route(delta, Dm)
    B, sB = per_route(B, N)
    C, sC = per_route(C, N)
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    sD = (Dm, 1)
    return _Problem(Bt, K, Dm, N, routes.shape[1], L, True, x, sx, delta, sdt, A,
                    (A.stride(0), A.stride(1), A.stride(2)), B, sB, C, sC, D, delta_bias, sD, None, (0, 0, 0, 0),
                    routes.contiguous(), param_routes.contiguous())


def _common_args(pb: _Problem, plan, softplus: bool):
    dummy = _dummy(pb.x.device)
    return dict(
        x=pb.x, delta=pb.delta, A=pb.A, B=pb.B, C=pb.C if pb.C is not None else dummy,
        D=pb.D if pb.D is not None else dummy, delta_bias=pb.delta_bias if pb.delta_bias is not None else dummy,
        z=pb.z if pb.z is not None else dummy,
        routes=plan.routes if plan is not None else dummy,
        param_routes=plan.param_routes if plan is not None else dummy,
        first_visit=plan.first_visit if plan is not None else dummy,
        parallel_ok=plan.parallel_ok if plan is not None else dummy,
        coverage=plan.coverage if plan is not None else dummy,
        Lr=pb.Lr, L=pb.L, K=pb.K, CPG=pb.CPG, N=pb.N,
        sx_b=pb.sx[0], sx_k=pb.sx[1], sx_t=pb.sx[2], sx_d=pb.sx[3],
        sdt_b=pb.sdt[0], sdt_k=pb.sdt[1], sdt_t=pb.sdt[2], sdt_d=pb.sdt[3],
        sB_b=pb.sB[0], sB_k=pb.sB[1], sB_t=pb.sB[2], sB_n=pb.sB[3],
        sC_b=pb.sC[0], sC_k=pb.sC[1], sC_t=pb.sC[2], sC_n=pb.sC[3],
        sz_b=pb.sz[0], sz_k=pb.sz[1], sz_t=pb.sz[2], sz_d=pb.sz[3],
        sA_k=pb.sA[0], sA_d=pb.sA[1], sA_n=pb.sA[2],
        sD_k=pb.sD[0], sD_d=pb.sD[1],
        HAS_D=pb.D is not None, HAS_BIAS=pb.delta_bias is not None, HAS_Z=pb.z is not None,
        SOFTPLUS=bool(softplus), GATHER=pb.gather, BN=_pow2(pb.N),
    )


def _run_fwd(pb: _Problem, plan, softplus, out_mode, out=None, so=(0, 0, 0, 0, 0), merge=scan.MERGE_STORE,
             out_visited=None, last_state=None, save_chunks=False):
    """Launch the forward kernel; returns the chunk states when ``save_chunks``."""
    save_t = chunk_size(pb.N)
    BN = _pow2(pb.N)
    chunk_states = None
    if save_chunks:
        chunk_states = empty(pb.Bt, pb.K, _cdiv(pb.Lr, save_t), pb.CPG, BN, device=pb.x.device,
                                   dtype=torch.float32)
    dummy = _dummy(pb.x.device)
    kw = _common_args(pb, plan, softplus)
    kw.update(
        out_visited=out_visited if out_visited is not None else dummy,
        out=out if out is not None else dummy,
        last_state=last_state if last_state is not None else dummy,
        chunk_states=chunk_states if chunk_states is not None else dummy,
        so_b=so[0], so_k=so[1], so_t=so[2], so_d=so[3], so_n=so[4],
        OUT_MODE=out_mode, MERGE=merge, ZERO_UNVISITED=pb.gather and out_visited is not None and out is not None,
        STORE_LAST=last_state is not None, SAVE_CHUNKS=save_chunks, SAVE_T=save_t,
    )
    grid_k = pb.K

    def grid(meta):
        return (_cdiv(pb.CPG, meta["BD"]), pb.Bt, grid_k)

    _launch_fwd(grid, **kw)
    return chunk_states


def _n1_applies(pb: _Problem, routes, param_routes) -> bool:
    """Whether the d_state-1 kernel serves this 2D problem: one state, parameters read at the route's own
    pixels, channels contiguous (the layout the 2D op hands over)."""
    same_routes = param_routes is routes or (param_routes.data_ptr() == routes.data_ptr()
                                             and param_routes.stride() == routes.stride())
    return (pb.N == 1 and same_routes and not _settings["atomic_merge"] and pb.sx[3] == 1 and pb.sdt[3] == 1
            and _settings["n1_kernel"])


# The d_state-1 kernels' step axis (0 or 1; see scan_n1._tile_ranges); None probes the installed Triton.
N1_STEP_AXIS = None


@functools.lru_cache(maxsize=None)
def _probed_step_axis() -> int:
    """The tile axis this Triton keeps in one thread: the probe kernel compiled (for sm_90: the layout passes
    that decide it do not depend on the target) with the steps on each axis, the one whose scan has no lane
    shuffles (axis 0 where neither compiles)."""
    from . import offline

    shuffles = []
    for axis in (0, 1):
        try:
            ptx = offline.compile_kernel(scan_n1.step_axis_probe_kernel, {"STEP_AXIS": axis}, 2).asm["ptx"]
            shuffles.append(ptx.count("shfl.sync"))
        except Exception:  # a Triton the probe cannot compile with
            return 0
    return 0 if shuffles[0] <= shuffles[1] else 1


def n1_step_axis() -> int:
    if N1_STEP_AXIS is not None:
        return N1_STEP_AXIS
    return 0 if _INTERPRET else _probed_step_axis()


def _n1_common_args(pb: _Problem, plan, softplus: bool):
    """What the d_state-1 forward and backward launches share (``_common_args`` of the general kernels)."""
    dummy = _dummy(pb.x.device)
    return dict(
        x=pb.x, delta=pb.delta, A=pb.A, B=pb.B, C=pb.C,
        D=pb.D if pb.D is not None else dummy, delta_bias=pb.delta_bias if pb.delta_bias is not None else dummy,
        routes=plan.routes, route_info=plan.route_info, first_visit=plan.first_visit, parallel_ok=plan.parallel_ok,
        coverage=plan.coverage,
        Lr=pb.Lr, L=pb.L, K=pb.K, CPG=pb.CPG,
        sx_b=pb.sx[0], sx_k=pb.sx[1], sx_t=pb.sx[2],
        sdt_b=pb.sdt[0], sdt_k=pb.sdt[1], sdt_t=pb.sdt[2],
        sB_b=pb.sB[0], sB_k=pb.sB[1], sB_t=pb.sB[2],
        sC_b=pb.sC[0], sC_k=pb.sC[1], sC_t=pb.sC[2],
        sA_k=pb.sA[0], sA_d=pb.sA[1], sD_k=pb.sD[0],
        HAS_D=pb.D is not None, HAS_BIAS=pb.delta_bias is not None, SOFTPLUS=bool(softplus), ZERO_UNVISITED=True,
        FAST_MATH=not _INTERPRET, STEP_AXIS=n1_step_axis(),
    )


def _run_fwd_n1(pb: _Problem, plan, softplus, out, so, merge, out_visited, save_chunks):
    """The d_state-1 forward (y only); returns the chunk states when ``save_chunks``."""
    save_t = chunk_size(1)
    chunk_states = None
    if save_chunks:
        chunk_states = empty(pb.Bt, pb.K, _cdiv(pb.Lr, save_t), pb.CPG, 1, device=pb.x.device, dtype=torch.float32)
    kw = _n1_common_args(pb, plan, softplus)
    kw.update(
        out_visited=out_visited, out=out,
        chunk_states=chunk_states if chunk_states is not None else _dummy(pb.x.device),
        so_b=so[0], so_k=so[1], so_t=so[2],
        MERGE=merge, SAVE_CHUNKS=save_chunks, SAVE_T=save_t,
    )
    _launch_n1(lambda meta: (_cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K), **kw)
    return chunk_states


def _run_bwd_n1(pb: _Problem, plan, softplus, chunk_states, dout, sg, dx, sdx, dx_merge, ddelta, sdd):
    """The d_state-1 backward; returns what ``_run_bwd`` returns."""
    n_blocks = _cdiv(pb.CPG, min(n1_bwd_block_d_candidates(pb.CPG)))
    f32 = dict(device=pb.x.device, dtype=torch.float32)
    dB_part = empty(n_blocks, pb.Bt, pb.K, pb.Lr, **f32)
    dC_part = empty(*dB_part.shape, **f32)
    dA_part = empty(pb.Bt, pb.K, pb.CPG, **f32)
    dD_part = empty(pb.Bt, pb.K, pb.CPG, **f32) if pb.D is not None else dA_part
    dbias_part = empty(pb.Bt, pb.K, pb.CPG, **f32) if pb.delta_bias is not None else dA_part
    kw = _n1_common_args(pb, plan, softplus)
    kw.update(
        x_visited=plan.x_visited_any if dx_merge == scan.MERGE_SERIAL else plan.x_visited,
        param_visited=plan.param_visited, dout=dout, chunk_states=chunk_states,
        dx=dx, ddelta=ddelta, dB_part=dB_part, dC_part=dC_part, dA_part=dA_part, dD_part=dD_part,
        dbias_part=dbias_part,
        sg_b=sg[0], sg_k=sg[1], sg_t=sg[2],
        sdx_b=sdx[0], sdx_k=sdx[1], sdx_t=sdx[2],
        sdd_b=sdd[0], sdd_k=sdd[1], sdd_t=sdd[2],
        sP_j=dB_part.stride(0), sP_b=dB_part.stride(1), sP_k=dB_part.stride(2),
        DX_MERGE=dx_merge,
    )
    BD = _launch_n1_bwd(lambda meta: (_cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K), **kw)
    used = _cdiv(pb.CPG, BD)
    dB = dB_part[:used].sum(0)[..., None]
    dC = dC_part[:used].sum(0)[..., None]
    dA = dA_part.sum(0)[..., None]
    dD = dD_part.sum(0) if pb.D is not None else None
    dbias = dbias_part.sum(0) if pb.delta_bias is not None else None
    return dB, dC, dA, dD, dbias


def _run_bwd(pb: _Problem, plan, softplus, chunk_states, dout, sg, in_mode, dx, sdx, dx_merge, ddelta, sdd,
             dz=None, sdz=(0, 0, 0, 0), dlast_state=None):
    """Launch the backward kernel; returns fp32 (dB, dC) per step (Bt, K, Lr, N), dA (K, CPG, N), dD, dbias."""
    BT = chunk_size(pb.N)
    BN = _pow2(pb.N)
    n_blocks = _cdiv(pb.CPG, min(bwd_block_d_candidates(pb.CPG, pb.N)))
    dev = pb.x.device
    f32 = dict(device=dev, dtype=torch.float32)
    dB_part = empty(n_blocks, pb.Bt, pb.K, pb.Lr, BN, **f32)
    dC_part = empty(*dB_part.shape, dtype=dB_part.dtype, device=dB_part.device) if in_mode == 1 else dB_part
    dA_part = empty(pb.Bt, pb.K, pb.CPG, BN, **f32)
    dD_part = empty(pb.Bt, pb.K, pb.CPG, **f32) if pb.D is not None and in_mode == 1 else dA_part
    dbias_part = empty(pb.Bt, pb.K, pb.CPG, **f32) if pb.delta_bias is not None else dA_part
    dummy = _dummy(pb.x.device)
    kw = _common_args(pb, plan, softplus)
    kw.update(
        x_visited=(plan.x_visited_any if dx_merge == scan.MERGE_SERIAL else plan.x_visited) if plan else dummy,
        param_visited=plan.param_visited if plan is not None else dummy,
        dout=dout, dlast_state=dlast_state if dlast_state is not None else dummy, chunk_states=chunk_states,
        dx=dx, ddelta=ddelta, dz=dz if dz is not None else dummy,
        dB_part=dB_part, dC_part=dC_part, dA_part=dA_part, dD_part=dD_part, dbias_part=dbias_part,
        sg_b=sg[0], sg_k=sg[1], sg_t=sg[2], sg_d=sg[3], sg_n=sg[4],
        sdx_b=sdx[0], sdx_k=sdx[1], sdx_t=sdx[2], sdx_d=sdx[3],
        sdd_b=sdd[0], sdd_k=sdd[1], sdd_t=sdd[2], sdd_d=sdd[3],
        sdz_b=sdz[0], sdz_k=sdz[1], sdz_t=sdz[2], sdz_d=sdz[3],
        sP_j=dB_part.stride(0), sP_b=dB_part.stride(1), sP_k=dB_part.stride(2), sP_t=dB_part.stride(3),
        sP_n=dB_part.stride(4),
        IN_MODE=in_mode, DX_MERGE=dx_merge, ZERO_UNVISITED=pb.gather and dx_merge != scan.MERGE_ATOMIC,
        HAS_DLAST=dlast_state is not None, BT=BT,
    )
    kw["HAS_D"] = kw["HAS_D"] and in_mode == 1
    BD = _launch_bwd(lambda meta: (_cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K), **kw)
    used = _cdiv(pb.CPG, BD)  # the partials of the channel blocks that ran
    dB_part, dC_part = dB_part[:used], dC_part[:used]
    N = pb.N
    dB = dB_part.sum(0)[..., :N]
    dC = dC_part.sum(0)[..., :N] if in_mode == 1 else None
    dA = dA_part.sum(0)[..., :N]
    dD = dD_part.sum(0) if pb.D is not None and in_mode == 1 else None
    dbias = dbias_part.sum(0) if pb.delta_bias is not None else None
    return dB, dC, dA, dD, dbias


def _is_fp64(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _reference():
    from .. import ops  # the reference backend serves fp64 (gradcheck) inputs

    return ops._ReferenceBackend


# --------------------------------------------------------------------------------------------------
# 1D: selective_scan


def _bc_grad_1d(dBC, M):
    """Per-step (Bt, K, L, N) gradient → M's layout (Bt, N, L) or (Bt, G, N, L)."""
    if M.dim() == 4:
        return dBC.permute(0, 1, 3, 2).to(M.dtype)
    return dBC.sum(1).permute(0, 2, 1).to(M.dtype)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, C, D, z, delta_bias):
        return _reference().selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    pb = _problem_1d(u, delta, A, B, C, D, z, delta_bias)
    Bt, Dm, L = u.shape
    out = empty(Bt, Dm, L, device=u.device, dtype=u.dtype)
    last_state = empty(Bt, Dm, pb.N, device=u.device, dtype=torch.float32)
    _run_fwd(pb, None, delta_softplus, scan.OUT_Y, out, (Dm * L, pb.CPG * L, 1, L, 0), last_state=last_state)
    return out, last_state


def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, C, D, z, delta_bias):
        return _reference().selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                               delta_softplus)
    pb = _problem_1d(u, delta, A, B, C, D, z, delta_bias)
    Bt, Dm, L = u.shape
    states = _run_fwd(pb, None, delta_softplus, scan.OUT_NONE, save_chunks=True)
    du = empty(Bt, Dm, L, device=u.device, dtype=u.dtype)
    ddelta = empty(Bt, Dm, L, device=u.device, dtype=delta.dtype)
    dz = empty(Bt, Dm, L, device=u.device, dtype=z.dtype) if z is not None else None
    chan = (Dm * L, pb.CPG * L, 1, L)
    sg = (dout.stride(0), pb.CPG * dout.stride(1), dout.stride(2), dout.stride(1), 0)
    dlast = dlast_state.contiguous() if dlast_state is not None else None
    dB, dC, dA, dD, dbias = _run_bwd(pb, None, delta_softplus, states, dout, sg, 1, du, chan, scan.MERGE_STORE,
                                     ddelta, chan, dz, chan, dlast)
    return (du, ddelta, dA.reshape(A.shape).to(A.dtype), _bc_grad_1d(dB, B), _bc_grad_1d(dC, C),
            None if D is None else dD.reshape(D.shape).to(D.dtype), dz,
            None if delta_bias is None else dbias.reshape(delta_bias.shape).to(delta_bias.dtype))


# --------------------------------------------------------------------------------------------------
# 1D: selective_scan_states


def selective_scan_states_fwd(u, delta, A, B, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, delta_bias):
        return _reference().selective_scan_states_fwd(u, delta, A, B, delta_bias, delta_softplus)
    pb = _problem_1d(u, delta, A, B, delta_bias=delta_bias)
    Bt, Dm, L = u.shape
    N = pb.N
    states = empty(Bt, Dm, N, L, device=u.device, dtype=torch.float32)
    _run_fwd(pb, None, delta_softplus, scan.OUT_STATES, states, (Dm * N * L, pb.CPG * N * L, 1, N * L, L))
    return states


def selective_scan_states_bwd(dstates, u, delta, A, B, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, delta_bias):
        return _reference().selective_scan_states_bwd(dstates, u, delta, A, B, delta_bias, delta_softplus)
    pb = _problem_1d(u, delta, A, B, delta_bias=delta_bias)
    Bt, Dm, L = u.shape
    chunk_states = _run_fwd(pb, None, delta_softplus, scan.OUT_NONE, save_chunks=True)
    du = empty(Bt, Dm, L, device=u.device, dtype=u.dtype)
    ddelta = empty(Bt, Dm, L, device=u.device, dtype=delta.dtype)
    chan = (Dm * L, pb.CPG * L, 1, L)
    s = dstates.stride()
    sg = (s[0], pb.CPG * s[1], s[3], s[1], s[2])
    dB, _, dA, _, dbias = _run_bwd(pb, None, delta_softplus, chunk_states, dstates, sg, 2, du, chan,
                                   scan.MERGE_STORE, ddelta, chan)
    return (du, ddelta, dA.reshape(A.shape).to(A.dtype), _bc_grad_1d(dB, B),
            None if delta_bias is None else dbias.reshape(delta_bias.shape).to(delta_bias.dtype))


# --------------------------------------------------------------------------------------------------
# 2D: selective_scan_2d


def _fwd_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, save_chunks):
    Bt, H, W, K, Dm = delta.shape
    L = H * W
    if L == 0:  # an empty grid: nothing to scan (the kernels would read a route's first step)
        out = x.new_empty((Bt, H, W, Dm) if merge == "sum" else (Bt, H, W, K, Dm))
        states = x.new_empty(chunk_states_shape(x, delta, A, B, C, D, delta_bias, routes), dtype=torch.float32)
        return out, states
    pb = _problem_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes)
    plan = route_plan(pb.routes, pb.param_routes, L)
    if _n1_applies(pb, routes, param_routes):
        if merge == "none":
            out = empty(Bt, H, W, K, Dm, device=x.device, dtype=x.dtype)
            states = _run_fwd_n1(pb, plan, delta_softplus, out, (L * K * Dm, Dm, K * Dm), scan.MERGE_STORE,
                                 plan.x_visited, save_chunks)
        else:
            out = empty(Bt, H, W, Dm, device=x.device, dtype=x.dtype)
            states = _run_fwd_n1(pb, plan, delta_softplus, out, (L * Dm, 0, Dm), scan.MERGE_SERIAL,
                                 plan.x_visited_any, save_chunks)
        return out, states
    if merge == "none":
        out = empty(Bt, H, W, K, Dm, device=x.device, dtype=x.dtype)
        states = _run_fwd(pb, plan, delta_softplus, scan.OUT_Y, out, (L * K * Dm, Dm, K * Dm, 1, 0),
                          out_visited=plan.x_visited, save_chunks=save_chunks)
        return out, states
    if _settings["atomic_merge"]:
        acc = torch.zeros(Bt, H, W, Dm, device=x.device, dtype=torch.float32)
        states = _run_fwd(pb, plan, delta_softplus, scan.OUT_Y, acc, (L * Dm, 0, Dm, 1, 0), scan.MERGE_ATOMIC,
                          save_chunks=save_chunks)
        return acc.to(x.dtype), states
    out = empty(Bt, H, W, Dm, device=x.device, dtype=x.dtype)
    states = _run_fwd(pb, plan, delta_softplus, scan.OUT_Y, out, (L * Dm, 0, Dm, 1, 0), scan.MERGE_SERIAL,
                      out_visited=plan.x_visited_any, save_chunks=save_chunks)
    return out, states


def _bwd_2d(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, chunk_states):
    Bt, H, W, K, Dm = delta.shape
    if H * W == 0:  # an empty grid: empty gradients, and the parameters' sums over no step are 0
        return tuple(None if t is None else torch.zeros_like(t) for t in (x, delta, A, B, C, D, delta_bias))
    pb = _problem_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes)
    L, N = H * W, pb.N
    plan = route_plan(pb.routes, pb.param_routes, L)
    if chunk_states is None:
        chunk_states = _run_fwd(pb, plan, delta_softplus, scan.OUT_NONE, save_chunks=True)
    single_state = _n1_applies(pb, routes, param_routes)
    if single_state and dout.stride(-1) != 1:  # its kernel reads channels contiguously (an expanded dout is not)
        dout = dout.contiguous()
    if merge == "none":
        dout = dout.reshape(Bt, L, K, Dm)
        sg = (dout.stride(0), dout.stride(2), dout.stride(1), dout.stride(3), 0)
    else:
        dout = dout.reshape(Bt, L, Dm)
        sg = (dout.stride(0), 0, dout.stride(1), dout.stride(2), 0)
    if x.dim() == 5:
        dx = empty(Bt, H, W, K, Dm, device=x.device, dtype=x.dtype)
        sdx, dx_merge = (L * K * Dm, Dm, K * Dm, 1), scan.MERGE_STORE
    elif _settings["atomic_merge"]:
        dx = torch.zeros(Bt, H, W, Dm, device=x.device, dtype=torch.float32)
        sdx, dx_merge = (L * Dm, 0, Dm, 1), scan.MERGE_ATOMIC
    else:
        dx = empty(Bt, H, W, Dm, device=x.device, dtype=x.dtype)
        sdx, dx_merge = (L * Dm, 0, Dm, 1), scan.MERGE_SERIAL
    ddelta = empty(Bt, H, W, K, Dm, device=x.device, dtype=delta.dtype)
    if single_state:
        dB, dC, dA, dD, dbias = _run_bwd_n1(pb, plan, delta_softplus, chunk_states, dout, sg, dx, sdx, dx_merge,
                                            ddelta, (L * K * Dm, Dm, K * Dm))
    else:
        dB, dC, dA, dD, dbias = _run_bwd(pb, plan, delta_softplus, chunk_states, dout, sg, 1, dx, sdx, dx_merge,
                                         ddelta, (L * K * Dm, Dm, K * Dm, 1))
    # Per-step B/C gradients (Bt, K, Lr, N) → their pixels (Bt, L, K, N); padded steps add their zeros.
    target = plan.param_target.expand(Bt, -1, N)

    def place(g, like):
        full = torch.zeros(Bt, L * K, N, device=x.device, dtype=torch.float32)
        full.scatter_add_(1, target, g.flatten(1, 2))  # (Bt, K·Lr, N), whatever Bt (reshape's -1 fails on 0)
        return full.reshape(like.shape).to(like.dtype)

    return (dx.to(x.dtype), ddelta, dA.reshape(A.shape).to(A.dtype), place(dB, B), place(dC, C),
            None if D is None else dD.reshape(D.shape).to(D.dtype),
            None if delta_bias is None else dbias.reshape(delta_bias.shape).to(delta_bias.dtype))


def selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge):
    if _is_fp64(x, delta, A, B, C, D, delta_bias):
        return _reference().selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                                  delta_softplus, merge)
    return _fwd_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, False)[0]


def selective_scan_2d_bwd(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge):
    if _is_fp64(x, delta, A, B, C, D, delta_bias):
        return _reference().selective_scan_2d_bwd(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                                  delta_softplus, merge)
    return _bwd_2d(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, None)


def chunk_states_shape(x, delta, A, B, C, D, delta_bias, routes):
    """Shape of the chunk states ``selective_scan_2d_fwd_saving`` returns: (Bt, K, ceil(Lr / chunk_size(N)),
    Dm, next_pow2(N)), or (0,) for fp64 inputs, which the reference serves."""
    if _is_fp64(x, delta, A, B, C, D, delta_bias):
        return (0,)
    Bt, K, Dm, N = delta.shape[0], delta.shape[3], delta.shape[4], A.shape[2]
    return (Bt, K, _cdiv(routes.shape[1], chunk_size(N)), Dm, _pow2(N))


def selective_scan_2d_fwd_saving(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge):
    """Forward that also returns the chunk states (fp32, ``chunk_states_shape``) for
    ``selective_scan_2d_bwd_from_saved``."""
    if _is_fp64(x, delta, A, B, C, D, delta_bias):
        return selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus,
                                     merge), x.new_empty(0, dtype=torch.float32)
    return _fwd_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, True)


def selective_scan_2d_bwd_from_saved(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                     delta_softplus, merge, chunk_states):
    if _is_fp64(x, delta, A, B, C, D, delta_bias):
        return selective_scan_2d_bwd(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                     delta_softplus, merge)
    return _bwd_2d(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge,
                   chunk_states)


# --------------------------------------------------------------------------------------------------
# Batches larger than a launch grid's batch axis

MAX_GRID_BATCH = 65535  # CUDA's limit on a grid's second axis, where the kernels put the batch


def _split_batch(fn, batch_args, param_outputs=()):
    """Run ``fn`` on batch slices of at most MAX_GRID_BATCH when the batch is larger: outputs that carry
    the batch are concatenated, parameter gradients (positions ``param_outputs``) summed."""

    @functools.wraps(fn)
    def run(*args):
        total = args[batch_args[0]].shape[0]
        if total <= MAX_GRID_BATCH:
            return fn(*args)
        parts = []
        for start in range(0, total, MAX_GRID_BATCH):
            piece = slice(start, start + MAX_GRID_BATCH)
            parts.append(fn(*[a[piece] if i in batch_args and a is not None else a for i, a in enumerate(args)]))
        if not isinstance(parts[0], tuple):
            return torch.cat(parts)
        return tuple(None if outs[0] is None else
                     torch.stack(outs).sum(0) if j in param_outputs else torch.cat(outs)
                     for j, outs in enumerate(zip(*parts)))

    return run


# Argument positions that carry the batch, and the parameter-gradient positions of each backward.
selective_scan_fwd = _split_batch(selective_scan_fwd, (0, 1, 3, 4, 6))
selective_scan_bwd = _split_batch(selective_scan_bwd, (0, 1, 2, 3, 5, 6, 8), param_outputs=(2, 5, 7))
selective_scan_states_fwd = _split_batch(selective_scan_states_fwd, (0, 1, 3))
selective_scan_states_bwd = _split_batch(selective_scan_states_bwd, (0, 1, 2, 4), param_outputs=(2, 4))
selective_scan_2d_fwd = _split_batch(selective_scan_2d_fwd, (0, 1, 3, 4))
selective_scan_2d_bwd = _split_batch(selective_scan_2d_bwd, (0, 1, 2, 4, 5), param_outputs=(2, 5, 6))
selective_scan_2d_fwd_saving = _split_batch(selective_scan_2d_fwd_saving, (0, 1, 3, 4))
selective_scan_2d_bwd_from_saved = _split_batch(selective_scan_2d_bwd_from_saved, (0, 1, 2, 4, 5, 12),
                                                param_outputs=(2, 5, 6))
