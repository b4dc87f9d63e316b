"""The Triton implementation of ``vmamba_kernels.backend.ScanBackend``: forward and backward of the three ops,
built from the launches in ``launches.py``.

The backward recomputes each chunk's states from the state saved at the chunk's start. For the 2D op the
forward saves them when a gradient is needed (``selective_scan_2d_fwd_saving``) and the backward reads them
(``selective_scan_2d_bwd_from_saved``); otherwise, and for the 1D ops, the backward first recomputes them
with a states-only pass.

fp64 inputs (gradcheck) go to the reference backend. Routes must not visit a pixel twice (every
``scan_routes`` set satisfies this).
"""
import functools

import torch

from ..reference import ReferenceBackend
from . import scan
from .alloc import empty
from .launches import (
    cdiv,
    n1_applies,
    problem_1d,
    problem_2d,
    run_bwd,
    run_bwd_n1,
    run_fwd,
    run_fwd_n1,
    set_adjoint_scan,
    set_atomic_merge,
    set_n1_kernel,
    set_steps_kernel,
    settings,
)
from .route_plan import route_plan
from .tiles import chunk_size, next_pow2

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
    "set_adjoint_scan",
    "set_atomic_merge",
    "set_n1_kernel",
    "set_steps_kernel",
]


def _is_fp64(*tensors, out_dtype=None) -> bool:
    return out_dtype == torch.float64 or any(t is not None and t.dtype == torch.float64 for t in tensors)


# --------------------------------------------------------------------------------------------------
# 1D: selective_scan


def _bc_grad_1d(dBC, M):
    """Per-step (Bt, K, L, N) gradient → M's layout (Bt, N, L) or (Bt, G, N, L)."""
    if M.dim() == 4:
        return dBC.permute(0, 1, 3, 2).to(M.dtype)
    return dBC.sum(1).permute(0, 2, 1).to(M.dtype)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, C, D, z, delta_bias):
        return ReferenceBackend.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    pb = problem_1d(u, delta, A, B, C, D, z, delta_bias)
    Bt, Dm, L = u.shape
    out = empty(Bt, Dm, L, device=u.device, dtype=u.dtype)
    last_state = empty(Bt, Dm, pb.N, device=u.device, dtype=torch.float32)
    run_fwd(pb, None, delta_softplus, scan.OUT_Y, out, (Dm * L, pb.CPG * L, 1, L, 0), last_state=last_state)
    return out, last_state


def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, C, D, z, delta_bias):
        return ReferenceBackend.selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                               delta_softplus)
    pb = problem_1d(u, delta, A, B, C, D, z, delta_bias)
    Bt, Dm, L = u.shape
    states = run_fwd(pb, None, delta_softplus, scan.OUT_NONE, save_chunks=True)
    du = empty(Bt, Dm, L, device=u.device, dtype=u.dtype)
    ddelta = empty(Bt, Dm, L, device=u.device, dtype=delta.dtype)
    dz = empty(Bt, Dm, L, device=u.device, dtype=z.dtype) if z is not None else None
    chan = (Dm * L, pb.CPG * L, 1, L)
    sg = (dout.stride(0), pb.CPG * dout.stride(1), dout.stride(2), dout.stride(1), 0)
    dlast = dlast_state.contiguous() if dlast_state is not None else None
    dB, dC, dA, dD, dbias = run_bwd(pb, None, delta_softplus, states, dout, sg, 1, du, chan, scan.MERGE_STORE,
                                     ddelta, chan, dz, chan, dlast)
    return (du, ddelta, dA.reshape(A.shape).to(A.dtype), _bc_grad_1d(dB, B), _bc_grad_1d(dC, C),
            None if D is None else dD.reshape(D.shape).to(D.dtype), dz,
            None if delta_bias is None else dbias.reshape(delta_bias.shape).to(delta_bias.dtype))


# --------------------------------------------------------------------------------------------------
# 1D: selective_scan_states


def selective_scan_states_fwd(u, delta, A, B, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, delta_bias):
        return ReferenceBackend.selective_scan_states_fwd(u, delta, A, B, delta_bias, delta_softplus)
    pb = problem_1d(u, delta, A, B, delta_bias=delta_bias)
    Bt, Dm, L = u.shape
    N = pb.N
    states = empty(Bt, Dm, N, L, device=u.device, dtype=torch.float32)
    run_fwd(pb, None, delta_softplus, scan.OUT_STATES, states, (Dm * N * L, pb.CPG * N * L, 1, N * L, L))
    return states


def selective_scan_states_bwd(dstates, u, delta, A, B, delta_bias, delta_softplus):
    if _is_fp64(u, delta, A, B, delta_bias):
        return ReferenceBackend.selective_scan_states_bwd(dstates, u, delta, A, B, delta_bias, delta_softplus)
    pb = problem_1d(u, delta, A, B, delta_bias=delta_bias)
    Bt, Dm, L = u.shape
    chunk_states = run_fwd(pb, None, delta_softplus, scan.OUT_NONE, save_chunks=True)
    du = empty(Bt, Dm, L, device=u.device, dtype=u.dtype)
    ddelta = empty(Bt, Dm, L, device=u.device, dtype=delta.dtype)
    chan = (Dm * L, pb.CPG * L, 1, L)
    s = dstates.stride()
    sg = (s[0], pb.CPG * s[1], s[3], s[1], s[2])
    dB, _, dA, _, dbias = run_bwd(pb, None, delta_softplus, chunk_states, dstates, sg, 2, du, chan,
                                   scan.MERGE_STORE, ddelta, chan)
    return (du, ddelta, dA.reshape(A.shape).to(A.dtype), _bc_grad_1d(dB, B),
            None if delta_bias is None else dbias.reshape(delta_bias.shape).to(delta_bias.dtype))


# --------------------------------------------------------------------------------------------------
# 2D: selective_scan_2d


def _fwd_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, save_chunks,
            out_dtype=None):
    """out is written in ``out_dtype`` (None: x's dtype); the kernels read x in its own dtype and widen it."""
    Bt, H, W, K, Dm = delta.shape
    L = H * W
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if L == 0:  # an empty grid: nothing to scan (the kernels would read a route's first step)
        out = x.new_empty((Bt, H, W, Dm) if merge == "sum" else (Bt, H, W, K, Dm), dtype=out_dtype)
        states = x.new_empty(chunk_states_shape(x, delta, A, B, C, D, delta_bias, routes), dtype=torch.float32)
        return out, states
    pb = problem_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes)
    plan = route_plan(pb.routes, pb.param_routes, L)
    if n1_applies(pb, routes, param_routes):
        if merge == "none":
            out = empty(Bt, H, W, K, Dm, device=x.device, dtype=out_dtype)
            states = run_fwd_n1(pb, plan, delta_softplus, out, (L * K * Dm, Dm, K * Dm), scan.MERGE_STORE,
                                 plan.x_visited, save_chunks)
        else:
            out = empty(Bt, H, W, Dm, device=x.device, dtype=out_dtype)
            states = run_fwd_n1(pb, plan, delta_softplus, out, (L * Dm, 0, Dm), scan.MERGE_SERIAL,
                                 plan.x_visited_any, save_chunks)
        return out, states
    if merge == "none":
        out = empty(Bt, H, W, K, Dm, device=x.device, dtype=out_dtype)
        states = run_fwd(pb, plan, delta_softplus, scan.OUT_Y, out, (L * K * Dm, Dm, K * Dm, 1, 0),
                          out_visited=plan.x_visited, save_chunks=save_chunks)
        return out, states
    if settings["atomic_merge"]:
        acc = torch.zeros(Bt, H, W, Dm, device=x.device, dtype=torch.float32)
        states = run_fwd(pb, plan, delta_softplus, scan.OUT_Y, acc, (L * Dm, 0, Dm, 1, 0), scan.MERGE_ATOMIC,
                          save_chunks=save_chunks)
        return acc.to(out_dtype), states
    out = empty(Bt, H, W, Dm, device=x.device, dtype=out_dtype)
    states = run_fwd(pb, plan, delta_softplus, scan.OUT_Y, out, (L * Dm, 0, Dm, 1, 0), scan.MERGE_SERIAL,
                      out_visited=plan.x_visited_any, save_chunks=save_chunks)
    return out, states


def _bwd_2d(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, chunk_states):
    Bt, H, W, K, Dm = delta.shape
    if H * W == 0:  # an empty grid: empty gradients, and the parameters' sums over no step are 0
        return tuple(None if t is None else torch.zeros_like(t) for t in (x, delta, A, B, C, D, delta_bias))
    pb = problem_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes)
    L, N = H * W, pb.N
    plan = route_plan(pb.routes, pb.param_routes, L)
    if chunk_states is None:
        chunk_states = run_fwd(pb, plan, delta_softplus, scan.OUT_NONE, save_chunks=True)
    single_state = n1_applies(pb, routes, param_routes)
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
    elif settings["atomic_merge"]:
        dx = torch.zeros(Bt, H, W, Dm, device=x.device, dtype=torch.float32)
        sdx, dx_merge = (L * Dm, 0, Dm, 1), scan.MERGE_ATOMIC
    else:  # summed over routes in dout's dtype where wider (a wider out_dtype's), as a copy of x in it would be
        dx = empty(Bt, H, W, Dm, device=x.device, dtype=torch.promote_types(x.dtype, dout.dtype))
        sdx, dx_merge = (L * Dm, 0, Dm, 1), scan.MERGE_SERIAL
    ddelta = empty(Bt, H, W, K, Dm, device=x.device, dtype=delta.dtype)
    if single_state:
        dB, dC, dA, dD, dbias = run_bwd_n1(pb, plan, delta_softplus, chunk_states, dout, sg, dx, sdx, dx_merge,
                                            ddelta, (L * K * Dm, Dm, K * Dm))
    else:
        dB, dC, dA, dD, dbias = run_bwd(pb, plan, delta_softplus, chunk_states, dout, sg, 1, dx, sdx, dx_merge,
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


def selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge,
                          out_dtype=None):
    if _is_fp64(x, delta, A, B, C, D, delta_bias, out_dtype=out_dtype):
        return ReferenceBackend.selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                                  delta_softplus, merge, out_dtype)
    return _fwd_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, False,
                   out_dtype)[0]


def selective_scan_2d_bwd(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge):
    """dout is in out's dtype (a wider out_dtype's, or x's); the gradients in their inputs' dtypes."""
    if _is_fp64(dout, x, delta, A, B, C, D, delta_bias):
        return ReferenceBackend.selective_scan_2d_bwd(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                                  delta_softplus, merge)
    return _bwd_2d(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, None)


def chunk_states_shape(x, delta, A, B, C, D, delta_bias, routes, out_dtype=None):
    """Shape of the chunk states ``selective_scan_2d_fwd_saving`` returns: (Bt, K, ceil(Lr / chunk_size(N)),
    Dm, next_pow2(N)), or (0,) for fp64 inputs or output, which the reference serves."""
    if _is_fp64(x, delta, A, B, C, D, delta_bias, out_dtype=out_dtype):
        return (0,)
    Bt, K, Dm, N = delta.shape[0], delta.shape[3], delta.shape[4], A.shape[2]
    return (Bt, K, cdiv(routes.shape[1], chunk_size(N)), Dm, next_pow2(N))


def selective_scan_2d_fwd_saving(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge,
                                 out_dtype=None):
    """Forward that also returns the chunk states (fp32, ``chunk_states_shape``) for
    ``selective_scan_2d_bwd_from_saved``."""
    if _is_fp64(x, delta, A, B, C, D, delta_bias, out_dtype=out_dtype):
        return selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus,
                                     merge, out_dtype), x.new_empty(0, dtype=torch.float32)
    return _fwd_2d(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, True, out_dtype)


def selective_scan_2d_bwd_from_saved(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                     delta_softplus, merge, chunk_states):
    if _is_fp64(dout, x, delta, A, B, C, D, delta_bias):
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
    def run(*args, **options):  # options (keywords) carry no batch
        total = args[batch_args[0]].shape[0]
        if total <= MAX_GRID_BATCH:
            return fn(*args, **options)
        parts = []
        for start in range(0, total, MAX_GRID_BATCH):
            piece = slice(start, start + MAX_GRID_BATCH)
            parts.append(fn(*[a[piece] if i in batch_args and a is not None else a for i, a in enumerate(args)],
                            **options))
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
