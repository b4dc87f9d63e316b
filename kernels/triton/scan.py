"""Triton kernels of the fused selective scan: one forward and one backward kernel serve the 1D scan
(mamba_ssm layout), the all-states scan, and the 2D route scan.

Every problem is described the same way: ``K`` independent scans per image ("routes" in 2D, B/C groups
in 1D), each over ``CPG`` channels and ``Lr`` steps. Step ``t`` of route ``k`` reads x (and z) at
position ``p = routes[k, t]`` and delta, B, C at ``q = param_routes[k, t]`` (``p = q = t`` in 1D); its
output goes to ``p``. Tensors are addressed through (batch, route, position, channel) strides, so the 2D
kernels read channels-last activations in place and write each route's output straight to its pixel.

A program owns one image and a block of ``BD`` channels and walks a route in chunks of ``BT`` steps: it
loads a [BT, BD] tile of every input through the route index, forms decay = exp(dt·A) and drive =
dt·x·B as [BT, BD, BN] tiles, and solves h_t = decay_t·h_{t-1} + drive_t inside the chunk with an
associative scan, carrying the fp32 state [BD, BN] in registers from chunk to chunk.

Sums over routes (merge="sum" outputs, the gradient of an x shared by routes) must be deterministic:
unless no pixel is visited twice (then routes run in parallel, one program each), one program runs all
routes of its (image, channel block) in order and adds into the output; the first visit of a pixel
stores, later visits read, add and store, and a barrier separates routes. ``route_plan`` precomputes the
first-visit flags, the "no pixel visited twice" flag and the visit maps used to zero unvisited pixels.
"""
import triton
import triton.language as tl

# Output modes of the forward kernel.
OUT_NONE = 0  # only the saved chunk states (backward recomputation)
OUT_Y = 1  # y = C·h (+ D·x) (· silu(z))
OUT_STATES = 2  # every state h, fp32

# How a program's writes meet other routes' writes to the same element.
MERGE_STORE = 0  # no overlap: plain stores
MERGE_SERIAL = 1  # deterministic: routes in order in one program, read-add-store after the first visit
MERGE_ATOMIC = 2  # fp32 atomic adds into a zeroed buffer (opt-in, not deterministic)


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """(a1, b1) is the earlier segment: h ↦ a2·(a1·h + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint_combine(al, bl, gl, dl, ae, be, ge, de):
    """Reverse-scan combine, later segment (l) first, earlier segment (e) second.

    A segment [t..s] holds two affine maps of the gradient v arriving from after s:
    (a, b): v ↦ a·v + b = decay_t·g_t, the gradient carried into h_{t-1};
    (g, d): v ↦ g·v + d = g_t, the gradient of h_t (it excludes decay_t).
    """
    return ae * al, ae * bl + be, ge * al, ge * bl + de


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20); exp(x) is softplus(x) to fp32 precision below -15.
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _route_range(parallel_ok, pid_k, K, MERGE: tl.constexpr):
    """Routes [k_lo, k_hi) of this program. Serial merges run every route in the program of pid_k == 0,
    unless the route plan says that no element is written twice."""
    if MERGE == 1:
        par = tl.load(parallel_ok) != 0
        k_lo = tl.where(par, pid_k, 0)
        k_hi = tl.where(par, pid_k + 1, tl.where(pid_k == 0, K, 0))
    else:
        k_lo = pid_k
        k_hi = pid_k + 1
    return k_lo, k_hi


@triton.jit
def _positions(routes, param_routes, k, t0, rows, Lr, GATHER: tl.constexpr, EVEN_T: tl.constexpr):
    """Positions p (x, z, output) and q (delta, B, C) of steps t0 + rows of route k, and which steps are
    real. Routes are int32. With EVEN_T (no gather, Lr a multiple of the chunk) whole chunks are in or
    out, which keeps the masks uniform along t so that loads along t vectorize."""
    t = t0 + rows
    if GATHER:
        in_range = t < Lr
        p = tl.load(routes + k * Lr + t, mask=in_range, other=-1)
        q = tl.load(param_routes + k * Lr + t, mask=in_range, other=-1)
        valid = in_range & (p >= 0)
        p = tl.where(valid, p, 0)
        q = tl.where(valid, q, 0)
    else:
        if EVEN_T:
            valid = (rows >= 0) & (t0 < Lr)
        else:
            valid = t < Lr
        p = t
        q = t
    return p, q, valid


@triton.jit
def _zero_unvisited(ptr, visited, s_t, s_f, offs_f, mask_f, L, BT: tl.constexpr):
    """Store zeros at the positions pos in [0, L) whose flag visited[pos] is 0 (features offs_f)."""
    for i in range(0, tl.cdiv(L, BT)):
        pos = i * BT + tl.arange(0, BT)
        seen = tl.load(visited + pos, mask=pos < L, other=1)
        m = (seen == 0)[:, None] & mask_f[None, :]
        zeros = tl.zeros([BT, offs_f.shape[0]], dtype=ptr.dtype.element_ty)
        tl.store(ptr + pos[:, None] * s_t + offs_f[None, :] * s_f, zeros, mask=m)


@triton.jit
def _zero_unvisited_outputs(out_img, out_visited, coverage, pid_k, so_k, so_t, so_d, offs_d, mask_d, L,
                            BT: tl.constexpr, MERGE: tl.constexpr):
    """Pixels that no route writes are zero: out_visited is per route (MERGE 0) or shared (MERGE 1)."""
    if MERGE == 0:
        if tl.load(coverage + 0) == 0:
            _zero_unvisited(out_img + pid_k * so_k, out_visited + pid_k * L, so_t, so_d, offs_d, mask_d, L, BT)
    elif pid_k == 0:
        if tl.load(coverage + 1) == 0:
            _zero_unvisited(out_img, out_visited, so_t, so_d, offs_d, mask_d, L, BT)


@triton.jit
def _route_params(A, D, delta_bias, k, sA_k, sA_d, sA_n, sD_k, sD_d, offs_d, offs_n, mask_d, mask_dn,
                  HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A [BD, BN], D and delta_bias [BD] of route k, fp32 (zeros where absent)."""
    A_k = tl.load(A + k * sA_k + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn,
                  other=0.0).to(tl.float32)
    D_k, bias_k = _route_skip_and_bias(D, delta_bias, k, sD_k, sD_d, offs_d, mask_d, HAS_D, HAS_BIAS)
    return A_k, D_k, bias_k


@triton.jit
def _route_skip_and_bias(D, delta_bias, k, sD_k, sD_d, offs_d, mask_d, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """D and delta_bias of route k at channels offs_d, fp32 (zeros where absent)."""
    D_k = tl.zeros(offs_d.shape, dtype=tl.float32)
    bias_k = tl.zeros(offs_d.shape, dtype=tl.float32)
    if HAS_D:
        D_k = tl.load(D + k * sD_k + offs_d * sD_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias_k = tl.load(delta_bias + k * sD_k + offs_d * sD_d, mask=mask_d, other=0.0).to(tl.float32)
    return D_k, bias_k


@triton.jit
def _chunk_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t, sB_n, k, p, q, valid,
                 offs_d, offs_n, mask_d, mask_n):
    """Tiles of one chunk of route k, as stored: x [BT, BD] at p, delta [BT, BD] and B [BT, BN] at q."""
    m = valid[:, None] & mask_d[None, :]
    mn = valid[:, None] & mask_n[None, :]
    xv = tl.load(x_img + k * sx_k + p[:, None] * sx_t + offs_d[None, :] * sx_d, mask=m, other=0.0)
    dt = tl.load(dt_img + k * sdt_k + q[:, None] * sdt_t + offs_d[None, :] * sdt_d, mask=m, other=0.0)
    Bv = _state_tile(B_img + k * sB_k, q, sB_t, sB_n, offs_d, offs_n, m, mn)
    return m, mn, xv, dt, Bv


@triton.jit
def _state_tile(ptr, q, s_t, s_n, offs_d, offs_n, m, mn):
    """B or C of a chunk: [BT, BN], or with a single state [BT, BD] read through a pointer tile that
    repeats along channels, which gives it the layout of the x tiles (no layout conversion)."""
    BN: tl.constexpr = offs_n.shape[0]
    if BN == 1:
        v = tl.load(ptr + q[:, None] * s_t + offs_d[None, :] * 0, mask=m, other=0.0)
    else:
        v = tl.load(ptr + q[:, None] * s_t + offs_n[None, :] * s_n, mask=mn, other=0.0)
    return v


@triton.jit
def _over_states(v, BN: tl.constexpr):
    """A _state_tile as a tile that broadcasts against [BT, BD, BN]."""
    if BN == 1:
        out = v[:, :, None]
    else:
        out = v[:, None, :]
    return out


@triton.jit
def _step_dt(dt_raw, m, bias_k, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """fp32 dt before softplus (with bias), and dt (zero at padded steps, which leave the state unchanged)."""
    dt_pre = dt_raw.to(tl.float32)
    if HAS_BIAS:
        dt_pre = dt_pre + bias_k[None, :]
    if SOFTPLUS:
        dt = _softplus(dt_pre)
    else:
        dt = dt_pre
    return dt_pre, tl.where(m, dt, 0.0)


@triton.jit
def _discretize(xv, dt_raw, Bv, m, A_k, bias_k, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """fp32 x, dt before softplus (with bias), dt (``_step_dt``), B, and the recurrence coefficients
    decay = exp(dt·A), drive = dt·x·B as [BT, BD, BN] tiles."""
    xv = xv.to(tl.float32)
    Bv = Bv.to(tl.float32)
    dt_pre, dt = _step_dt(dt_raw, m, bias_k, HAS_BIAS, SOFTPLUS)
    decay = tl.exp(dt[:, :, None] * A_k[None, :, :])
    drive = (dt * xv)[:, :, None] * _over_states(Bv, A_k.shape[1])
    return xv, dt_pre, dt, Bv, decay, drive


@triton.jit
def _next_decay(routes, param_routes, dt_img, sdt_k, sdt_t, sdt_d, k, t0, rows, Lr, offs_d, mask_d, A_k, bias_k,
                GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """decay_{t+1} = exp(dt_{t+1}·A) of steps t = t0 + rows, [BT, BD, BN]: delta read again at the next step's
    position. It is 1 where step t + 1 is padded or past the route's end (dt is zero there), so that the
    adjoint passes the gradient arriving there (dlast, or 0) unchanged."""
    _, q1, v1 = _positions(routes, param_routes, k, t0 + 1, rows, Lr, GATHER, False)  # not EVEN_T: t + 1 may be Lr
    m1 = v1[:, None] & mask_d[None, :]
    dt1 = tl.load(dt_img + k * sdt_k + q1[:, None] * sdt_t + offs_d[None, :] * sdt_d, mask=m1, other=0.0)
    _, dt1 = _step_dt(dt1, m1, bias_k, HAS_BIAS, SOFTPLUS)
    return tl.exp(dt1[:, :, None] * A_k[None, :, :])


@triton.jit
def _adjoint(decay, decay_next, gout, carry, rows, ADJOINT: tl.constexpr, FLIP: tl.constexpr):
    """g_t = gout_t + decay_{t+1}·g_{t+1} over a chunk, from the carry that enters from the next chunk: g, and
    the carry into the previous chunk (decay·g at the first step with ADJOINT 4, g with ADJOINT 2, see the
    kernel). Triton lowers a reverse scan through lane shuffles of every operand, in and out; with FLIP the
    steps are flipped and scanned forward instead: register moves where a thread holds all steps of its
    elements (the d_state-16 tiles), shared memory where steps span warps (d_state 1's 64-step chunks)."""
    BT: tl.constexpr = rows.shape[0]
    if ADJOINT == 2:
        a = decay_next
    else:
        a = decay
    if FLIP:
        a = tl.flip(a, 0)
        gout = tl.flip(gout, 0)
        first = rows == BT - 1  # the chunk's first step, last once flipped
    else:
        first = rows == 0
    # Both combine (later, earlier): the later segment's map applies first.
    if ADJOINT == 2:
        if FLIP:
            g_adj, d_adj = tl.associative_scan((a, gout), 0, _affine_combine)
        else:
            g_adj, d_adj = tl.associative_scan((a, gout), 0, _affine_combine, reverse=True)
        g = g_adj * carry[None, :, :] + d_adj
        carry = tl.sum(tl.where(first[:, None, None], g, 0.0), axis=0)
    else:
        ones = tl.full(a.shape, 1.0, tl.float32)
        if FLIP:
            a_adj, b_adj, g_adj, d_adj = tl.associative_scan((a, a * gout, ones, gout), 0, _adjoint_combine)
        else:
            a_adj, b_adj, g_adj, d_adj = tl.associative_scan((a, a * gout, ones, gout), 0, _adjoint_combine,
                                                             reverse=True)
        g = g_adj * carry[None, :, :] + d_adj
        carry = tl.sum(tl.where(first[:, None, None], a_adj * carry[None, :, :] + b_adj, 0.0), axis=0)
    if FLIP:
        g = tl.flip(g, 0)
    return g, carry


@triton.jit
def _output_loads(C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d, first_visit, k, t,
                  Lr, p, q, m, mn, Bv, xv, offs_d, offs_n, OUT_MODE: tl.constexpr, HAS_Z: tl.constexpr,
                  MERGE: tl.constexpr):
    """What the output of a chunk needs besides the scan: C at q, z at p, and for read-add-store merges
    the partial sums already at p (zero where this step is the pixel's first visit). Stand-ins where
    unused keep the loop-carried types fixed."""
    Cv = Bv
    zv = xv
    old = xv
    if OUT_MODE == 1:
        Cv = _state_tile(C_img + k * sC_k, q, sC_t, sC_n, offs_d, offs_n, m, mn)
        if HAS_Z:
            zv = tl.load(z_img + k * sz_k + p[:, None] * sz_t + offs_d[None, :] * sz_d, mask=m, other=0.0)
        if MERGE == 1:
            first = tl.load(first_visit + k * Lr + t, mask=t < Lr, other=1)
            # in out's dtype, which may be wider than x's (out_dtype): rounded to x's, the sum would lose bits
            old = tl.load(out_img + k * so_k + p[:, None] * so_t + offs_d[None, :] * so_d,
                          mask=m & (first == 0)[:, None], other=0.0)
    return Cv, zv, old


@triton.jit
def _next_chunk(routes, param_routes, x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t, sB_n,
                C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d, first_visit, k, c, Lr,
                p1, q1, v1, rows, offs_d, offs_n, mask_d, mask_n, OUT_MODE: tl.constexpr, HAS_Z: tl.constexpr,
                MERGE: tl.constexpr, GATHER: tl.constexpr, EVEN_T: tl.constexpr):
    """Loads of chunk c + 1 (positions p1, q1 known) and the positions of chunk c + 2."""
    BT: tl.constexpr = rows.shape[0]
    m1, mn1, x1, d1, B1 = _chunk_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t,
                                       sB_n, k, p1, q1, v1, offs_d, offs_n, mask_d, mask_n)
    C1, z1, o1 = _output_loads(C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d,
                               first_visit, k, (c + 1) * BT + rows, Lr, p1, q1, m1, mn1, B1, x1, offs_d, offs_n,
                               OUT_MODE, HAS_Z, MERGE)
    p2, q2, v2 = _positions(routes, param_routes, k, (c + 2) * BT, rows, Lr, GATHER, EVEN_T)
    return m1, mn1, x1, d1, B1, C1, z1, o1, p2, q2, v2


@triton.jit
def _tile_offsets(pid_d, CPG, N, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, EVEN_D: tl.constexpr,
                  VEC: tl.constexpr):
    """Channels, states and steps of one program's tile, with their masks: (offs_d, offs_n, mask_d, mask_n,
    mask_dn, rows)."""
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    if EVEN_D and VEC:  # a constant mask along channels lets loads and stores vectorize
        mask_d = tl.full([BD], 1, tl.int1)
    else:  # (VEC=False keeps one channel per thread, so that the scan along steps stays in-thread)
        mask_d = offs_d < CPG
    mask_n = offs_n < N
    return offs_d, offs_n, mask_d, mask_n, mask_d[:, None] & mask_n[None, :], tl.arange(0, BT)


@triton.jit
def _image_inputs(x, delta, B, C, b64, sx_b, sdt_b, sB_b, sC_b):
    """x, delta, B and C of image ``b64``: what every scan kernel reads."""
    return x + b64 * sx_b, delta + b64 * sdt_b, B + b64 * sB_b, C + b64 * sC_b


@triton.jit
def _partial_slots(dB_part, dC_part, pid_d, b64, sP_j, sP_b):
    """This program's (channel block, image) slots of the dB / dC partials that the caller reduces."""
    return dB_part + pid_d * sP_j + b64 * sP_b, dC_part + pid_d * sP_j + b64 * sP_b


@triton.jit(do_not_specialize=["Lr", "L"])
def selective_scan_fwd_kernel(
    x, delta, A, B, C, D, delta_bias, z,
    routes, param_routes, first_visit, parallel_ok, coverage, out_visited,
    out, last_state, chunk_states,
    Lr, L, K, CPG, N,
    sx_b, sx_k, sx_t, sx_d,
    sdt_b, sdt_k, sdt_t, sdt_d,
    sB_b, sB_k, sB_t, sB_n,
    sC_b, sC_k, sC_t, sC_n,
    sz_b, sz_k, sz_t, sz_d,
    sA_k, sA_d, sA_n,
    sD_k, sD_d,
    so_b, so_k, so_t, so_d, so_n,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATHER: tl.constexpr, OUT_MODE: tl.constexpr, MERGE: tl.constexpr, ZERO_UNVISITED: tl.constexpr,
    STORE_LAST: tl.constexpr, SAVE_CHUNKS: tl.constexpr, SAVE_T: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_T: tl.constexpr,
    PREFETCH: tl.constexpr, VEC: tl.constexpr,
):
    pid_d, pid_b, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    offs_d, offs_n, mask_d, mask_n, mask_dn, rows = _tile_offsets(pid_d, CPG, N, BD, BN, BT, EVEN_D, VEC)

    x_img, dt_img, B_img, C_img = _image_inputs(x, delta, B, C, b64, sx_b, sdt_b, sB_b, sC_b)
    z_img = z + b64 * sz_b
    out_img = out + b64 * so_b
    n_saved = tl.cdiv(Lr, SAVE_T)

    k_lo, k_hi = _route_range(parallel_ok, pid_k, K, MERGE)
    if ZERO_UNVISITED:
        _zero_unvisited_outputs(out_img, out_visited, coverage, pid_k, so_k, so_t, so_d, offs_d, mask_d, L, BT, MERGE)
    for k in range(k_lo, k_hi):
        A_k, D_k, bias_k = _route_params(A, D, delta_bias, k, sA_k, sA_d, sA_n, sD_k, sD_d, offs_d, offs_n,
                                         mask_d, mask_dn, HAS_D, HAS_BIAS)
        h = tl.zeros([BD, BN], dtype=tl.float32)
        # Software pipelining: the tiles of chunk c + 1 and the route positions of chunk c + 2 are
        # requested before chunk c is computed, so that memory latency overlaps the scan.
        p0, q0, v0 = _positions(routes, param_routes, k, 0, rows, Lr, GATHER, EVEN_T)
        m0, mn0, x0, d0, B0 = _chunk_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k,
                                           sB_t, sB_n, k, p0, q0, v0, offs_d, offs_n, mask_d, mask_n)
        C0, z0, o0 = _output_loads(C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d,
                                   first_visit, k, rows, Lr, p0, q0, m0, mn0, B0, x0, offs_d, offs_n,
                                   OUT_MODE, HAS_Z, MERGE)
        p1, q1, v1 = _positions(routes, param_routes, k, BT, rows, Lr, GATHER, EVEN_T)
        for c in range(0, tl.cdiv(Lr, BT)):
            if PREFETCH:
                m1, mn1, x1, d1, B1, C1, z1, o1, p2, q2, v2 = _next_chunk(
                    routes, param_routes, x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t,
                    sB_n, C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d, first_visit,
                    k, c, Lr, p1, q1, v1, rows, offs_d, offs_n, mask_d, mask_n, OUT_MODE, HAS_Z, MERGE, GATHER,
                    EVEN_T)

            xv, dt_pre, dt, Bv, decay, drive = _discretize(x0, d0, B0, m0, A_k, bias_k, HAS_BIAS, SOFTPLUS)
            if SAVE_CHUNKS:
                if (c * BT) % SAVE_T == 0:
                    ptr = chunk_states + (((b64 * K + k) * n_saved + (c * BT) // SAVE_T) * CPG) * BN
                    tl.store(ptr + offs_d[:, None] * BN + offs_n[None, :], h, mask=mask_d[:, None])
            a_run, b_run = tl.associative_scan((decay, drive), 0, _affine_combine)
            hs = a_run * h[None, :, :] + b_run
            h = tl.sum(tl.where((rows == BT - 1)[:, None, None], hs, 0.0), axis=0)
            if OUT_MODE == 1:
                y = tl.sum(hs * _over_states(C0.to(tl.float32), BN), axis=2)
                if HAS_D:
                    y += D_k[None, :] * xv
                if HAS_Z:
                    zv = z0.to(tl.float32)
                    y = y * zv * tl.sigmoid(zv)
                o_ptr = out_img + k * so_k + p0[:, None] * so_t + offs_d[None, :] * so_d
                if MERGE == 2:
                    tl.atomic_add(o_ptr, y, mask=m0)
                else:
                    if MERGE == 1:
                        y += o0.to(tl.float32)
                    tl.store(o_ptr, y.to(out.dtype.element_ty), mask=m0)
            elif OUT_MODE == 2:
                o_ptr = (out_img + k * so_k + p0[:, None, None] * so_t + offs_d[None, :, None] * so_d
                         + offs_n[None, None, :] * so_n)
                tl.store(o_ptr, hs, mask=m0[:, :, None] & mask_n[None, None, :])
            if not PREFETCH:  # the same loads, issued after the compute (for comparison)
                m1, mn1, x1, d1, B1, C1, z1, o1, p2, q2, v2 = _next_chunk(
                    routes, param_routes, x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k, sB_t,
                    sB_n, C_img, sC_k, sC_t, sC_n, z_img, sz_k, sz_t, sz_d, out_img, so_k, so_t, so_d, first_visit,
                    k, c, Lr, p1, q1, v1, rows, offs_d, offs_n, mask_d, mask_n, OUT_MODE, HAS_Z, MERGE, GATHER,
                    EVEN_T)
            p0, q0, v0, m0, mn0, x0, d0, B0, C0, z0, o0 = p1, q1, v1, m1, mn1, x1, d1, B1, C1, z1, o1
            p1, q1, v1 = p2, q2, v2
        if STORE_LAST:
            ptr = last_state + ((b64 * K + k) * CPG) * N
            tl.store(ptr + offs_d[:, None] * N + offs_n[None, :], h, mask=mask_dn)
        if MERGE == 1:
            tl.debug_barrier()  # the next route reads what this one wrote


@triton.jit(do_not_specialize=["Lr", "L"])
def selective_scan_bwd_kernel(
    x, delta, A, B, C, D, delta_bias, z,
    routes, param_routes, first_visit, parallel_ok, coverage, x_visited, param_visited,
    dout, dlast_state, chunk_states,
    dx, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
    Lr, L, K, CPG, N,
    sx_b, sx_k, sx_t, sx_d,
    sdt_b, sdt_k, sdt_t, sdt_d,
    sB_b, sB_k, sB_t, sB_n,
    sC_b, sC_k, sC_t, sC_n,
    sz_b, sz_k, sz_t, sz_d,
    sA_k, sA_d, sA_n,
    sD_k, sD_d,
    sg_b, sg_k, sg_t, sg_d, sg_n,
    sdx_b, sdx_k, sdx_t, sdx_d,
    sdd_b, sdd_k, sdd_t, sdd_d,
    sdz_b, sdz_k, sdz_t, sdz_d,
    sP_j, sP_b, sP_k, sP_t, sP_n,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATHER: tl.constexpr, IN_MODE: tl.constexpr, DX_MERGE: tl.constexpr, ZERO_UNVISITED: tl.constexpr,
    HAS_DLAST: tl.constexpr, ADJOINT: tl.constexpr, FLIP: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, EVEN_D: tl.constexpr, EVEN_T: tl.constexpr,
):
    """Gradients of one (image, channel block) over routes [k_lo, k_hi), chunks from last to first.

    Each chunk's states are recomputed from the state saved at its start (chunk size BT == SAVE_T), then
    the adjoint recurrence g_t = gout_t + decay_{t+1}·g_{t+1} runs as a reverse associative scan
    (``_adjoint``; FLIP: as a forward scan between flips). ADJOINT 4 scans 4-tuples (decay_t·g_t and g_t as
    maps of the gradient arriving after the chunk) from the chunk's own decays, and carries decay·g into the
    previous chunk; ADJOINT 2 scans (decay_{t+1}, gout_t) pairs, reading delta again one step later
    (``_next_decay``), and carries g: half the scan's operands, for one more delta load and exp. IN_MODE 1:
    the incoming gradient is dout on y (gout = dy·C); IN_MODE 2: it is the gradient of every state.
    dB/dC are summed over this program's channels into dB_part/dC_part[pid_d]; dA, dD, delta_bias over
    its steps into per-image partials. The caller reduces the partials in a fixed order.
    """
    pid_d, pid_b, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    offs_d, offs_n, mask_d, mask_n, mask_dn, rows = _tile_offsets(pid_d, CPG, N, BD, BN, BT, EVEN_D, True)
    n_chunks = tl.cdiv(Lr, BT)

    x_img, dt_img, B_img, C_img = _image_inputs(x, delta, B, C, b64, sx_b, sdt_b, sB_b, sC_b)
    z_img = z + b64 * sz_b
    g_img = dout + b64 * sg_b
    dx_img = dx + b64 * sdx_b
    dd_img = ddelta + b64 * sdd_b
    dz_img = dz + b64 * sdz_b
    dBp_img, dCp_img = _partial_slots(dB_part, dC_part, pid_d, b64, sP_j, sP_b)

    k_lo, k_hi = _route_range(parallel_ok, pid_k, K, DX_MERGE)
    if ZERO_UNVISITED and DX_MERGE != 2:  # not the atomic merge (2), whose dx starts zeroed
        _zero_unvisited_outputs(dx_img, x_visited, coverage, pid_k, sdx_k, sdx_t, sdx_d, offs_d, mask_d, L, BT,
                                DX_MERGE)
    for k in range(k_lo, k_hi):
        if ZERO_UNVISITED:
            if tl.load(coverage + 2) == 0:
                _zero_unvisited(dd_img + k * sdd_k, param_visited + k * L, sdd_t, sdd_d, offs_d, mask_d, L, BT)
        A_k, D_k, bias_k = _route_params(A, D, delta_bias, k, sA_k, sA_d, sA_n, sD_k, sD_d, offs_d, offs_n,
                                         mask_d, mask_dn, HAS_D, HAS_BIAS)
        if HAS_DLAST:
            carry = tl.load(dlast_state + ((b64 * K + k) * CPG) * N + offs_d[:, None] * N + offs_n[None, :],
                            mask=mask_dn, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BD, BN], dtype=tl.float32)
        # Per-step accumulators, reduced over steps once per route (not once per chunk).
        acc_dA = tl.zeros([BT, BD, BN], dtype=tl.float32)
        acc_dD = tl.zeros([BT, BD], dtype=tl.float32)
        acc_dbias = tl.zeros([BT, BD], dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            t = c * BT + rows
            p, q, valid = _positions(routes, param_routes, k, c * BT, rows, Lr, GATHER, EVEN_T)
            m, mn, xv, dt, Bv = _chunk_loads(x_img, sx_k, sx_t, sx_d, dt_img, sdt_k, sdt_t, sdt_d, B_img, sB_k,
                                             sB_t, sB_n, k, p, q, valid, offs_d, offs_n, mask_d, mask_n)
            xv, dt_pre, dt, Bv, decay, drive = _discretize(xv, dt, Bv, m, A_k, bias_k, HAS_BIAS, SOFTPLUS)
            h0 = tl.load(chunk_states + (((b64 * K + k) * n_chunks + c) * CPG) * BN
                         + offs_d[:, None] * BN + offs_n[None, :], mask=mask_d[:, None], other=0.0)
            a_run, b_run = tl.associative_scan((decay, drive), 0, _affine_combine)
            hs = a_run * h0[None, :, :] + b_run

            if IN_MODE == 1:
                Cv = _state_tile(C_img + k * sC_k, q, sC_t, sC_n, offs_d, offs_n, m, mn).to(tl.float32)
                dy = tl.load(g_img + k * sg_k + p[:, None] * sg_t + offs_d[None, :] * sg_d, mask=m,
                             other=0.0).to(tl.float32)
                if HAS_Z:
                    zv = tl.load(z_img + k * sz_k + p[:, None] * sz_t + offs_d[None, :] * sz_d, mask=m,
                                 other=0.0).to(tl.float32)
                    y = tl.sum(hs * _over_states(Cv, BN), axis=2)
                    if HAS_D:
                        y += D_k[None, :] * xv
                    sig = tl.sigmoid(zv)
                    dzv = dy * y * sig * (1.0 + zv * (1.0 - sig))
                    tl.store(dz_img + k * sdz_k + p[:, None] * sdz_t + offs_d[None, :] * sdz_d,
                             dzv.to(dz.dtype.element_ty), mask=m)
                    dy = dy * zv * sig
                gout = dy[:, :, None] * _over_states(Cv, BN)
            else:
                gout = tl.load(g_img + k * sg_k + p[:, None, None] * sg_t + offs_d[None, :, None] * sg_d
                               + offs_n[None, None, :] * sg_n, mask=m[:, :, None] & mask_n[None, None, :],
                               other=0.0).to(tl.float32)
            decay_next = decay  # unused by ADJOINT 4
            if ADJOINT == 2:
                decay_next = _next_decay(routes, param_routes, dt_img, sdt_k, sdt_t, sdt_d, k, c * BT, rows, Lr,
                                         offs_d, mask_d, A_k, bias_k, GATHER, HAS_BIAS, SOFTPLUS)
            g, carry = _adjoint(decay, decay_next, gout, carry, rows, ADJOINT, FLIP)

            gB = tl.sum(g * _over_states(Bv, BN), axis=2)
            d_arg = g * (hs - drive)  # gradient of dt·A inside exp: g_t·decay_t·h_{t-1}
            ddt = gB * xv + tl.sum(d_arg * A_k[None, :, :], axis=2)
            acc_dA += d_arg * dt[:, :, None]
            dxv = gB * dt
            if IN_MODE == 1:
                if HAS_D:
                    dxv += dy * D_k[None, :]
                    acc_dD += dy * xv
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_pre)
            ddt = tl.where(m, ddt, 0.0)
            acc_dbias += ddt
            tl.store(dd_img + k * sdd_k + q[:, None] * sdd_t + offs_d[None, :] * sdd_d,
                     ddt.to(ddelta.dtype.element_ty), mask=m)
            dx_ptr = dx_img + k * sdx_k + p[:, None] * sdx_t + offs_d[None, :] * sdx_d
            if DX_MERGE == 2:
                tl.atomic_add(dx_ptr, dxv, mask=m)
            else:
                if DX_MERGE == 1:
                    first = tl.load(first_visit + k * Lr + t, mask=t < Lr, other=1)
                    dxv += tl.load(dx_ptr, mask=m & (first == 0)[:, None], other=0.0).to(tl.float32)
                tl.store(dx_ptr, dxv.to(dx.dtype.element_ty), mask=m)
            # B/C gradients per step (route order); the caller sums the channel blocks and places them.
            # Padded steps store their zeros (dt and dy are zero there), so the caller need not mask them.
            m_steps = (t < Lr)[:, None] & mask_n[None, :]
            dBv = tl.sum(g * (dt * xv)[:, :, None], axis=1)
            tl.store(dBp_img + k * sP_k + t[:, None] * sP_t + offs_n[None, :] * sP_n, dBv, mask=m_steps)
            if IN_MODE == 1:
                dCv = tl.sum(hs * dy[:, :, None], axis=1)
                tl.store(dCp_img + k * sP_k + t[:, None] * sP_t + offs_n[None, :] * sP_n, dCv, mask=m_steps)
        part = (b64 * K + k) * CPG
        tl.store(dA_part + (part + offs_d[:, None]) * BN + offs_n[None, :], tl.sum(acc_dA, axis=0),
                 mask=mask_d[:, None])
        if HAS_D:
            tl.store(dD_part + part + offs_d, tl.sum(acc_dD, axis=0), mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_part + part + offs_d, tl.sum(acc_dbias, axis=0), mask=mask_d)
        if DX_MERGE == 1:
            tl.debug_barrier()
