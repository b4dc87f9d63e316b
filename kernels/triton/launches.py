"""Launches of the fused kernels: each op described as a ``Problem`` (K scans of CPG channels over Lr steps, see
``scan.py``), its kernel arguments, and the launch through the tile tuners of ``tiles.py``.

The 1D scan has one scan per B/C group and reads positions t directly; the 2D scan has one scan per route
and reads through the route index. Tensors are passed with their strides (no permuted copies). The backend
functions that call these are in ``backend.py``.
"""
import functools
import os
import warnings
from typing import NamedTuple, Optional

import torch

from ..graphs import capturing
from . import scan, scan_n1, scan_steps, tiles
from .alloc import empty, persistent
from .tiles import (
    INTERPRET,
    bwd_block_d_candidates,
    bwd_tuner,
    chunk_size,
    even_flags,
    even_flags_n1,
    even_flags_steps,
    fwd_tuner,
    interpret_n1_tile,
    n1_bwd_block_d_candidates,
    n1_bwd_tuner,
    n1_tuner,
    next_pow2,
    prune_bwd,
    prune_fwd,
    steps_tuner,
)

__all__ = [
    "Problem",
    "N1_STEP_AXIS",
    "cdiv",
    "n1_applies",
    "n1_step_axis",
    "problem_1d",
    "problem_2d",
    "run_bwd",
    "run_bwd_n1",
    "run_fwd",
    "run_fwd_n1",
    "set_adjoint_scan",
    "set_atomic_merge",
    "set_n1_kernel",
    "set_steps_kernel",
    "settings",
]


# Which kernels serve a problem (set with the functions below; read by the backend functions too).
settings = {"atomic_merge": os.environ.get("VMAMBA_KERNELS_ATOMIC_MERGE", "0") == "1",
            "n1_kernel": os.environ.get("VMAMBA_KERNELS_N1", "1") == "1",
            "steps_kernel": os.environ.get("VMAMBA_KERNELS_STEPS", "1") == "1",
            "adjoint": 2 if os.environ.get("VMAMBA_KERNELS_ADJOINT", "4") == "2" else 4,
            "adjoint_flip": {"1": True, "0": False}.get(os.environ.get("VMAMBA_KERNELS_ADJOINT_FLIP", "auto"))}


def set_n1_kernel(enabled: bool) -> None:
    """Whether 2D scans with d_state 1 use their own forward kernel (``scan_n1.py``, the default) or the
    general one (for comparisons)."""
    settings["n1_kernel"] = bool(enabled)


def set_steps_kernel(enabled: bool) -> None:
    """Whether forwards with d_state > 1 (outputs y or the backward's chunk states) run step by step
    (``scan_steps.py``, the default: 1.3-1.9x faster model inference on an H100) or as chunks with the general
    kernel (``VMAMBA_KERNELS_STEPS=0``, for comparisons)."""
    settings["steps_kernel"] = bool(enabled)


def set_atomic_merge(enabled: bool) -> None:
    """Opt in to fp32 atomic adds for sums over routes (faster where routes overlap, not deterministic)."""
    settings["atomic_merge"] = bool(enabled)


def set_adjoint_scan(form: int = 4, flip: Optional[bool] = None) -> None:
    """How the general backward (``selective_scan_bwd_kernel``) scans its adjoint: ``form`` 4 (the default) or 2,
    the 2-tuple scan that rereads delta one step later; ``flip`` runs the reverse scan as a forward scan between
    flips of the steps, None (the default) where d_state > 1. There each thread holds its chunk's steps, and
    Triton's reverse scan would still move every operand across lanes, in and out: on one H100, EfficientVMamba-T
    trained at 67.2 ms per step flipped against 71.0 and 72.6 unflipped (form 2 flipped: 72.9;
    model_cards/benchmarks/side_by_side.md). With d_state 1 a chunk spans warps and the flips cost more than they
    save (offline sm_90 instruction counts). Tiles picked so far are forgotten: they were picked for the previous
    form (the tile table does not tell the forms apart)."""
    if form not in (2, 4):
        raise ValueError(f"adjoint scan form must be 2 or 4, got {form!r}")
    settings["adjoint"] = form
    settings["adjoint_flip"] = None if flip is None else bool(flip)
    tiles.bwd_tuner.cache.clear()


# A plain integer helper: triton.cdiv is a constexpr function in Triton 3.8, whose calls from Python cost
# microseconds each, and the launchers call it a few dozen times per op.
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# --------------------------------------------------------------------------------------------------
# Launches (the tiles and their tuners are in tiles.py; plain launches with a fixed tile under the interpreter)


def _launch_fwd(grid, **kw):
    if INTERPRET:
        kw.update(BT=4, BD=min(8, next_pow2(kw["CPG"])), PREFETCH=os.environ.get("VMAMBA_KERNELS_PREFETCH", "1") == "1",
                  VEC=True)
    elif kw["MERGE"] == scan.MERGE_ATOMIC:
        cfg = prune_fwd(fwd_tuner.configs, {}, **kw)[0]
        kw.update(cfg.kwargs, num_warps=cfg.num_warps)
    else:
        _tuned(fwd_tuner, grid, kw)
        return
    kw.update(even_flags(kw))
    scan.selective_scan_fwd_kernel[grid(kw)](**kw)


def _launch_steps(grid, **kw):
    # An internal the interpreter tests wrap, to see which forms of the kernel (PACK, BATCH_LANES, ...) ran.
    if INTERPRET:
        kw.update(BD=8 if kw["BATCH_LANES"] else min(8, next_pow2(kw["CPG"])), UNROLL=1, num_warps=1)
        kw.update(even_flags_steps(kw))
        scan_steps.selective_scan_steps_fwd_kernel[grid(kw)](**kw)
    else:
        _tuned(steps_tuner, grid, kw)


def _launch_n1(grid, **kw):
    if INTERPRET:
        tile = interpret_n1_tile(kw["CPG"])
        del tile["FLIP"]  # the backward's
        kw.update(tile, num_warps=1)
        kw.update(even_flags_n1(kw))
        scan_n1.route_scan_n1_fwd_kernel[grid(kw)](**kw)
    else:
        _tuned(n1_tuner, grid, kw)


def _launch_n1_bwd(grid, **kw) -> int:
    """Launch the d_state-1 backward; returns the channel block it ran with."""
    if INTERPRET:
        kw.update(interpret_n1_tile(kw["CPG"]), num_warps=1)
        kw.update(even_flags_n1(kw))
        scan_n1.route_scan_n1_bwd_kernel[grid(kw)](**kw)
        return kw["BD"]
    return _tuned(n1_bwd_tuner, grid, kw).kwargs["BD"]


def _launch_bwd(grid, **kw) -> int:
    """Launch the backward; returns the channel block it ran with."""
    if INTERPRET:
        kw.update(BD=bwd_block_d_candidates(kw["CPG"], kw["N"])[0])
    elif kw["DX_MERGE"] == scan.MERGE_ATOMIC:
        cfg = prune_bwd(bwd_tuner.configs, {}, **kw)[0]
        kw.update(cfg.kwargs, num_warps=cfg.num_warps)
    else:
        return _tuned(bwd_tuner, grid, kw).kwargs["BD"]
    kw.update(even_flags(kw))
    scan.selective_scan_bwd_kernel[grid(kw)](**kw)
    return kw["BD"]


warned_untuned = set()


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
    if tiles.tuning_runs() and (name, key) not in warned_untuned:
        warned_untuned.add((name, key))
        warnings.warn(f"{name}: no tuned tile for problem {key} while a CUDA graph is captured; running "
                      f"{config.all_kwargs()} untuned (run one step before capturing to tune it)", RuntimeWarning,
                      stacklevel=2)
    tuner.fn.run(grid=grid, warmup=False, **kw, **config.all_kwargs())
    return config


placeholders = {}  # per device; like the caches of ops, an internal the graph-safety tests empty and count


def _dummy(device) -> torch.Tensor:
    """A one-element buffer for pointer arguments a launch does not use (never an input: a kernel or a
    tuner must not be able to touch user tensors through an unused argument). Kept per device outside CUDA
    graph pools; while a graph is captured one that is not kept yet is made for the call (the graph's)."""
    dummy = placeholders.get(device)
    if dummy is None:
        if capturing():
            return torch.zeros(1, device=device, dtype=torch.float32)
        with persistent(device) as keep:
            dummy = torch.zeros(1, device=device, dtype=torch.float32)
            keep(dummy)
        placeholders[device] = dummy
    return dummy


# --------------------------------------------------------------------------------------------------
# Problem description


class Problem(NamedTuple):
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


def problem_1d(u, delta, A, B, C=None, D=None, z=None, delta_bias=None) -> Problem:
    Bt, Dm, L = u.shape
    G = next((M.shape[1] for M in (B, C) if M is not None and M.dim() == 4), 1)
    CPG = Dm // G

    def chan(t):  # (Bt, Dm, L): group k is the channel block k
        return (t.stride(0), CPG * t.stride(1), t.stride(2), t.stride(1))

    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    sD = (CPG, 1)
    return Problem(Bt, G, CPG, A.shape[1], L, L, False, u, chan(u), delta, chan(delta),
                    A, (CPG * A.stride(0), A.stride(0), A.stride(1)), B, _bc_1d(B), C, _bc_1d(C), D, delta_bias,
                    sD, z, chan(z) if z is not None else (0, 0, 0, 0), None, None)


def problem_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes) -> Problem:
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
    return Problem(Bt, K, Dm, N, routes.shape[1], L, True, x, sx, delta, sdt, A,
                    (A.stride(0), A.stride(1), A.stride(2)), B, sB, C, sC, D, delta_bias, sD, None, (0, 0, 0, 0),
                    routes.contiguous(), param_routes.contiguous())


def _common_args(pb: Problem, plan, softplus: bool):
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
        SOFTPLUS=bool(softplus), GATHER=pb.gather, BN=next_pow2(pb.N),
    )


def run_fwd(pb: Problem, plan, softplus, out_mode, out=None, so=(0, 0, 0, 0, 0), merge=scan.MERGE_STORE,
             out_visited=None, last_state=None, save_chunks=False):
    """Launch the forward kernel; returns the chunk states when ``save_chunks``."""
    save_t = chunk_size(pb.N)
    BN = next_pow2(pb.N)
    chunk_states = None
    if save_chunks:
        chunk_states = empty(pb.Bt, pb.K, cdiv(pb.Lr, save_t), pb.CPG, BN, device=pb.x.device,
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

    def grid(meta):
        return (cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K)

    if steps_apply(pb, out_mode, merge):
        del kw["so_n"]  # it writes no states
        batch_lanes = pb.CPG == 1  # (1D only: steps_apply)
        kw.update({"PACK": 1} if batch_lanes else _packed_states(pb, BN, with_C=out_mode == scan.OUT_Y),
                  Bt=pb.Bt, BATCH_LANES=batch_lanes, EVEN_N=pb.N == BN, FAST_MATH=not INTERPRET)
        if batch_lanes:
            _launch_steps(lambda meta: (cdiv(pb.Bt, meta["BD"]), 1, pb.K), **kw)
        else:
            _launch_steps(grid, **kw)
    else:
        _launch_fwd(grid, **kw)
    return chunk_states


_PACKED = {4: torch.int64, 2: torch.int32}


def _packed_states(pb: Problem, BN: int, with_C: bool) -> dict:
    """Arguments of the step-by-step forward that read bf16 B and C ``PACK`` states at a time (as int64 or
    int32, see ``scan_steps._state_row``), where their states are contiguous, fill BN and every row is aligned
    to PACK elements; PACK 1 (as stored) otherwise."""
    tensors = [("B", pb.B, pb.sB)] + ([("C", pb.C, pb.sC)] if with_C else [])
    for pack, dtype in _PACKED.items():
        if pb.N == BN and pb.N % pack == 0 and all(
                M.dtype == torch.bfloat16 and s[3] == 1 and all(v % pack == 0 for v in s[:3])
                and M.data_ptr() % (2 * pack) == 0 for _, M, s in tensors):
            kw = {"PACK": pack}
            for name, M, s in tensors:
                kw[name] = M.view(dtype)
                kw.update({f"s{name}_{axis}": v // pack for axis, v in zip("bkt", s[:3])})
            return kw
    return {"PACK": 1}


def steps_apply(pb: Problem, out_mode, merge) -> bool:
    """Whether the step-by-step forward (``scan_steps.py``) serves a problem: d_state > 1, outputs y or chunk
    states only, no atomic merge, and lanes to fill: 8 or more channels, which it puts on lanes, or, in 1D, one
    channel per scan (ViM2's channel mixer), where it puts images on lanes."""
    return (settings["steps_kernel"] and pb.N > 1 and (pb.CPG >= 8 or (pb.CPG == 1 and not pb.gather))
            and out_mode in (scan.OUT_NONE, scan.OUT_Y) and merge != scan.MERGE_ATOMIC)


def n1_applies(pb: Problem, routes, param_routes) -> bool:
    """Whether the d_state-1 kernel serves this 2D problem: one state, parameters read at the route's own
    pixels, channels contiguous (the layout the 2D op hands over)."""
    same_routes = param_routes is routes or (param_routes.data_ptr() == routes.data_ptr()
                                             and param_routes.stride() == routes.stride())
    return (pb.N == 1 and same_routes and not settings["atomic_merge"] and pb.sx[3] == 1 and pb.sdt[3] == 1
            and settings["n1_kernel"])


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
    return 0 if INTERPRET else _probed_step_axis()


def _n1_common_args(pb: Problem, plan, softplus: bool):
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
        FAST_MATH=not INTERPRET, STEP_AXIS=n1_step_axis(),
    )


def run_fwd_n1(pb: Problem, plan, softplus, out, so, merge, out_visited, save_chunks):
    """The d_state-1 forward (y only); returns the chunk states when ``save_chunks``."""
    save_t = chunk_size(1)
    chunk_states = None
    if save_chunks:
        chunk_states = empty(pb.Bt, pb.K, cdiv(pb.Lr, save_t), pb.CPG, 1, device=pb.x.device, dtype=torch.float32)
    kw = _n1_common_args(pb, plan, softplus)
    kw.update(
        out_visited=out_visited, out=out,
        chunk_states=chunk_states if chunk_states is not None else _dummy(pb.x.device),
        so_b=so[0], so_k=so[1], so_t=so[2],
        MERGE=merge, SAVE_CHUNKS=save_chunks, SAVE_T=save_t,
    )
    _launch_n1(lambda meta: (cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K), **kw)
    return chunk_states


def run_bwd_n1(pb: Problem, plan, softplus, chunk_states, dout, sg, dx, sdx, dx_merge, ddelta, sdd):
    """The d_state-1 backward; returns what ``run_bwd`` returns."""
    n_blocks = cdiv(pb.CPG, min(n1_bwd_block_d_candidates(pb.CPG)))
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
    BD = _launch_n1_bwd(lambda meta: (cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K), **kw)
    used = cdiv(pb.CPG, BD)
    dB = dB_part[:used].sum(0)[..., None]
    dC = dC_part[:used].sum(0)[..., None]
    dA = dA_part.sum(0)[..., None]
    dD = dD_part.sum(0) if pb.D is not None else None
    dbias = dbias_part.sum(0) if pb.delta_bias is not None else None
    return dB, dC, dA, dD, dbias


def run_bwd(pb: Problem, plan, softplus, chunk_states, dout, sg, in_mode, dx, sdx, dx_merge, ddelta, sdd,
             dz=None, sdz=(0, 0, 0, 0), dlast_state=None):
    """Launch the backward kernel; returns fp32 (dB, dC) per step (Bt, K, Lr, N), dA (K, CPG, N), dD, dbias."""
    BT = chunk_size(pb.N)
    BN = next_pow2(pb.N)
    n_blocks = cdiv(pb.CPG, min(bwd_block_d_candidates(pb.CPG, pb.N)))
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
        HAS_DLAST=dlast_state is not None, ADJOINT=settings["adjoint"],
        FLIP=pb.N > 1 if settings["adjoint_flip"] is None else settings["adjoint_flip"], BT=BT,
    )
    kw["HAS_D"] = kw["HAS_D"] and in_mode == 1
    BD = _launch_bwd(lambda meta: (cdiv(pb.CPG, meta["BD"]), pb.Bt, pb.K), **kw)
    used = cdiv(pb.CPG, BD)  # the partials of the channel blocks that ran
    dB_part, dC_part = dB_part[:used], dC_part[:used]
    N = pb.N
    dB = dB_part.sum(0)[..., :N]
    dC = dC_part.sum(0)[..., :N] if in_mode == 1 else None
    dA = dA_part.sum(0)[..., :N]
    dD = dD_part.sum(0) if pb.D is not None and in_mode == 1 else None
    dbias = dbias_part.sum(0) if pb.delta_bias is not None else None
    return dB, dC, dA, dD, dbias
