"""Triton forward kernel of the selective scan with several states per channel (d_state > 1), one step at a
time: the forward of EfficientVMamba, PlainMamba and ViM2 (and of the 1D op with d_state > 1) where
``launches.steps_apply`` says so (``set_steps_kernel``).

The general kernel (``scan.py``) solves chunks of steps as [BT, BD, BN] tiles with an associative scan, whose
lane shuffles, masks and partial products cost several times the recurrence itself. Here a program owns one
image and ``BD`` channels, holds the state as a [BN, BD] tile (each thread: one channel's states, or a part
of them where BD < 32·num_warps), and walks a route step by step:

    h = exp(dt·A)·h + dt·x·B,    y = Σ_n h·C (+ D·x) (· silu(z))

which is one exp and three multiply-adds per state and step. The states of a channel stay in one thread, so
the sum over states needs no exchange; the loads of step t + 1 (and the route positions of step t + 2) are
issued before step t is computed, so that memory latency overlaps the recurrence. ``UNROLL`` 2 unrolls the step
loop, so that one step's exponentials can overlap the previous step's multiply-adds where too few warps run to
hide their latency (few channels and images).

The state tile is [states, channels] so that Triton's default layout puts channels across lanes and warps
and a channel's states in one thread's registers. The channel and state strides are not specialized on
(``do_not_specialize``): a stride known to be 1 would make Triton vectorize those loads, with a layout of its
own and an exchange through shared memory at every step.

Same arguments, outputs and merges as ``selective_scan_fwd_kernel`` for the outputs y (OUT_MODE 1) and
saved chunk states only (OUT_MODE 0): the chunk states it saves are the ones the backward kernel reads. As
there, a serial merge (MERGE 1) runs the routes of an (image, channel block) in order in one program, and a
pixel is visited at most once per route.
"""
import triton
import triton.language as tl

from .scan import _image_inputs, _positions, _route_range, _route_skip_and_bias, _zero_unvisited_outputs
from .scan_n1 import LOG2E, _sigmoid, _softplus


@triton.jit
def _state_row(ptr, q, s_t, s_n, offs_n, mask_n, valid, PACK: tl.constexpr, EVEN_N: tl.constexpr,
               BATCH_LANES: tl.constexpr):
    """B or C of the step at q as fp32 [BN]. With PACK 2 or 4 the tensor is bf16 viewed as int32 or int64 (states
    contiguous, BN = N), and each load brings PACK states: a 64-bit address and a load per state would otherwise
    be most of a step's instructions. Loads need no mask where BN = N: q is a real position even at padded
    steps (whose dt is 0). With BATCH_LANES (a pointer per lane): [BN, BD], each lane's image's."""
    BN: tl.constexpr = offs_n.shape[0]
    if BATCH_LANES:  # ptr [BD], one image per lane: [BN, BD]
        v = tl.load(ptr[None, :] + q * s_t + offs_n[:, None] * s_n, mask=valid & mask_n[:, None], other=0.0)
        v = v.to(tl.float32)
    elif PACK == 1:
        if EVEN_N:
            v = tl.load(ptr + q * s_t + offs_n * s_n)
        else:
            v = tl.load(ptr + q * s_t + offs_n * s_n, mask=valid & mask_n, other=0.0)
        v = v.to(tl.float32)
    else:
        u = tl.load(ptr + q * s_t + tl.arange(0, BN // PACK))  # PACK > 1 only where BN = N
        if PACK == 2:
            v = tl.join(_bf16_low(u), _bf16_high(u))
        else:
            lo = u.to(tl.int32)
            hi = (u >> 32).to(tl.int32)
            v = tl.join(tl.join(_bf16_low(lo), _bf16_low(hi)), tl.join(_bf16_high(lo), _bf16_high(hi)))
        v = tl.reshape(v, [BN])  # state PACK·i + j from bits 16·j of word i
    return v


@triton.jit
def _per_lane(v, BATCH_LANES: tl.constexpr):
    """B or C of a step as a [BN, BD] tile: per lane already with BATCH_LANES, else one row for all lanes."""
    if BATCH_LANES:
        out = v
    else:
        out = v[:, None]
    return out


@triton.jit
def _state_ptrs(ptr, chan, row, offs_n, BATCH_LANES: tl.constexpr):
    """[BN, BD] addresses of the lanes' states in a buffer of rows of ``row`` states per channel, from the
    image's start ``ptr`` (per lane with BATCH_LANES, channel 0): 32-bit offsets from one address where it can."""
    if BATCH_LANES:
        out = ptr[None, :] + offs_n[:, None]
    else:
        out = ptr + chan[None, :] * row + offs_n[:, None]
    return out


@triton.jit
def _bf16_low(w):
    """The bf16 in the low half of an int32, as fp32 (a bf16 is the high half of its fp32)."""
    return (w << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_high(w):
    return (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _step_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t, sB_n, C_img, sC_k, sC_t,
                sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d, first_visit, k, t, Lr, p, q, valid,
                chan, offs_n, mask_l, mask_n, OUT_MODE: tl.constexpr, HAS_Z: tl.constexpr, MERGE: tl.constexpr,
                PACK: tl.constexpr, EVEN_N: tl.constexpr, BATCH_LANES: tl.constexpr):
    """What step t needs: x, delta [BD] as stored (and z, and for serial merges the partial sum already at p,
    zero at the pixel's first visit), B and C [BN] in fp32. Stand-ins where unused keep the loop-carried types
    fixed."""
    m = valid & mask_l
    xv = tl.load(x_img + k * sx_k + p * sx_t + chan * sx_d, mask=m, other=0.0)
    dt = tl.load(dt_img + k * sdt_k + q * sdt_t + chan * sdt_d, mask=m, other=0.0)
    Bv = _state_row(B_img + k * sB_k, q, sB_t, sB_n, offs_n, mask_n, valid, PACK, EVEN_N, BATCH_LANES)
    Cv = Bv
    zv = xv
    old = xv
    if OUT_MODE == 1:
        Cv = _state_row(C_img + k * sC_k, q, sC_t, sC_n, offs_n, mask_n, valid, PACK, EVEN_N, BATCH_LANES)
        if HAS_Z:
            zv = tl.load(z_img + k * sz_k + p * sz_t + chan * sz_d, mask=m, other=0.0)
        if MERGE == 1:
            first = tl.load(first_visit + k * Lr + t, mask=valid, other=1)
            # in out's dtype, which may be wider than x's (out_dtype)
            old = tl.load(out_img + k * so_k + p * so_t + chan * so_d, mask=m & (first == 0), other=0.0)
    return xv, dt, Bv, Cv, zv, old


@triton.jit(do_not_specialize=["Lr", "L", "sx_d", "sdt_d", "sz_d", "so_d", "sB_n", "sC_n", "sA_d", "sA_n"])
def selective_scan_steps_fwd_kernel(
    x, delta, A, B, C, D, delta_bias, z,
    routes, param_routes, first_visit, parallel_ok, coverage, out_visited,
    out, last_state, chunk_states,
    Lr, L, K, CPG, N, Bt,
    sx_b, sx_k, sx_t, sx_d,
    sdt_b, sdt_k, sdt_t, sdt_d,
    sB_b, sB_k, sB_t, sB_n,
    sC_b, sC_k, sC_t, sC_n,
    sz_b, sz_k, sz_t, sz_d,
    sA_k, sA_d, sA_n,
    sD_k, sD_d,
    so_b, so_k, so_t, so_d,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATHER: tl.constexpr, OUT_MODE: tl.constexpr, MERGE: tl.constexpr, ZERO_UNVISITED: tl.constexpr,
    STORE_LAST: tl.constexpr, SAVE_CHUNKS: tl.constexpr, SAVE_T: tl.constexpr, FAST_MATH: tl.constexpr,
    PACK: tl.constexpr, BATCH_LANES: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_d, pid_b, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lanes = pid_d * BD + tl.arange(0, BD)
    if BATCH_LANES:  # one channel (CPG 1); lane i scans image lanes[i]
        img = lanes.to(tl.int64)
        chan = lanes * 0
        mask_l = lanes < Bt
    else:  # lane i scans channel lanes[i] of image pid_b
        img = pid_b.to(tl.int64)
        chan = lanes
        if EVEN_D:
            mask_l = tl.full([BD], 1, tl.int1)
        else:
            mask_l = lanes < CPG
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < N
    mask_nl = mask_n[:, None] & mask_l[None, :]

    x_img, dt_img, B_img, C_img = _image_inputs(x, delta, B, C, img, sx_b, sdt_b, sB_b, sC_b)
    z_img = z + img * sz_b
    out_img = out + img * so_b
    n_saved = tl.cdiv(Lr, SAVE_T)

    k_lo, k_hi = _route_range(parallel_ok, pid_k, K, MERGE)
    if ZERO_UNVISITED:  # (2D: channel lanes)
        _zero_unvisited_outputs(out_img, out_visited, coverage, pid_k, so_k, so_t, so_d, chan, mask_l, L, 16, MERGE)
    for k in range(k_lo, k_hi):
        A_nd = tl.load(A + k * sA_k + offs_n[:, None] * sA_n + chan[None, :] * sA_d, mask=mask_nl,
                       other=0.0).to(tl.float32)
        if FAST_MATH:
            A_nd = A_nd * LOG2E  # exp(dt·A) = exp2(dt·A·log2 e)
        D_k, bias_k = _route_skip_and_bias(D, delta_bias, k, sD_k, sD_d, chan, mask_l, HAS_D, HAS_BIAS)
        h = tl.zeros([BN, BD], dtype=tl.float32)
        p0, q0, v0 = _positions(routes, param_routes, k, 0, 0, Lr, GATHER, False)
        x0, d0, B0, C0, z0, o0 = _step_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t,
                                             sB_n, C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k,
                                             so_t, so_d, first_visit, k, 0, Lr, p0, q0, v0, chan, offs_n, mask_l,
                                             mask_n, OUT_MODE, HAS_Z, MERGE, PACK, EVEN_N, BATCH_LANES)
        p1, q1, v1 = _positions(routes, param_routes, k, 1, 0, Lr, GATHER, False)
        for t in tl.range(0, Lr, loop_unroll_factor=UNROLL):
            # step t + 1's loads and step t + 2's positions, before step t's arithmetic
            x1, d1, B1, C1, z1, o1 = _step_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k,
                                                 sB_t, sB_n, C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img,
                                                 so_k, so_t, so_d, first_visit, k, t + 1, Lr, p1, q1, v1, chan,
                                                 offs_n, mask_l, mask_n, OUT_MODE, HAS_Z, MERGE, PACK, EVEN_N,
                                                 BATCH_LANES)
            p2, q2, v2 = _positions(routes, param_routes, k, t + 2, 0, Lr, GATHER, False)
            if SAVE_CHUNKS:
                if t % SAVE_T == 0:
                    ptr = chunk_states + ((img * K + k) * n_saved + t // SAVE_T) * CPG * BN
                    tl.store(_state_ptrs(ptr, chan, BN, offs_n, BATCH_LANES), h, mask=mask_l[None, :])
            dt = d0.to(tl.float32)
            if HAS_BIAS:
                dt += bias_k
            if SOFTPLUS:
                dt = _softplus(dt, FAST_MATH)
            dt = tl.where(v0, dt, 0.0)  # padded steps leave the state unchanged
            xf = x0.to(tl.float32)
            if FAST_MATH:
                decay = tl.math.exp2(dt[None, :] * A_nd)
            else:
                decay = tl.exp(dt[None, :] * A_nd)
            h = decay * h + (dt * xf)[None, :] * _per_lane(B0, BATCH_LANES)
            if OUT_MODE == 1:
                y = tl.sum(h * _per_lane(C0, BATCH_LANES), axis=0)
                if HAS_D:
                    y += D_k * xf
                if HAS_Z:
                    zf = z0.to(tl.float32)
                    y = y * zf * _sigmoid(zf, FAST_MATH)
                if MERGE == 1:
                    y += o0.to(tl.float32)
                tl.store(out_img + k * so_k + p0 * so_t + chan * so_d, y.to(out.dtype.element_ty),
                         mask=v0 & mask_l)
            p0, q0, v0, x0, d0, B0, C0, z0, o0 = p1, q1, v1, x1, d1, B1, C1, z1, o1
            p1, q1, v1 = p2, q2, v2
        if STORE_LAST:
            ptr = last_state + (img * K + k) * CPG * N
            tl.store(_state_ptrs(ptr, chan, N, offs_n, BATCH_LANES), h, mask=mask_nl)
        if MERGE == 1:
            tl.debug_barrier()  # the next route reads what this one wrote
