"""Triton kernels of the 2D route scan with a single state (d_state 1: VMamba v2, GroupMamba), forward and
backward.

The general kernel (``scan.py``) solves each chunk with an associative scan whose step axis runs across
lanes and warps: at d_state 1 most of its instructions go to shuffles, shared-memory exchanges, masks and
addresses, not to the recurrence. This kernel keeps the step chain inside a thread instead.

A program owns one image and a block of ``BD`` channels and walks a route in chunks of ``TT·LT`` steps, as
a [TT, LT, BD] tile (or [LT, TT, BD]: ``STEP_AXIS``, see ``_tile_ranges``): the ``TT`` consecutive steps of a
segment sit in one thread's registers, the ``LT`` segments of a chunk on neighbouring lanes (and warps),
channels on the remaining lanes, ``VEC`` per thread. Each thread scans its segment step by step, written
out (``_scan_steps``, ``_adjoint_steps``), since Triton lowers ``tl.associative_scan`` through lane shuffles
in some versions and directions even along an axis a thread holds; the segments are joined by one scan over
``LT`` segment maps, which carries both the inclusive and the exclusive prefix (``_prefix_combine``), so
that every segment gets its starting state without a shift across lanes.

Route positions come from ``route_plan``'s ``route_info``: a route that walks the image as
``p = base + (t mod n)·s_inner + (t div n)·s_outer`` (raster, column, reversed and atrous orders) has its
positions computed in registers; any other route (snakes, padded routes) is read through its index.
Sums over routes are deterministic as in ``scan.py`` (routes in order in one program, read-add-store
after the first visit); ``first_mode`` says per route whether every step is a first visit (store),
none is (read-add-store), or it varies (per-step flags).
"""
import triton
import triton.language as tl

from .scan import _image_inputs, _partial_slots, _route_range, _zero_unvisited, _zero_unvisited_outputs
from .scan import _softplus as _softplus_exact  # FAST_MATH off (the interpreter)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# route_info: one int32 row of ROUTE_INFO_COLS per route (``route_plan`` fills it).
INFO_BASE = tl.constexpr(0)
INFO_N_INNER = tl.constexpr(1)
INFO_S_INNER = tl.constexpr(2)
INFO_S_OUTER = tl.constexpr(3)
INFO_AFFINE = tl.constexpr(4)  # 1: every position is base + (t mod n)·s_inner + (t div n)·s_outer
INFO_FIRST_MODE = tl.constexpr(5)
ROUTE_INFO_COLS = tl.constexpr(8)
# first_mode: whether the route's steps are the first visits of their pixels (padded steps aside).
FIRST_NONE = tl.constexpr(0)
FIRST_ALL = tl.constexpr(1)
FIRST_MIXED = tl.constexpr(2)


@triton.jit
def _prefix_combine(pa1, pb1, qa1, qb1, pa2, pb2, qa2, qb2):
    """Scan of affine segment maps that keeps two prefixes: P (inclusive) and Q (exclusive).

    (P, Q) ⊕ (P', Q') = (P then P', P then Q'), maps h ↦ a·h + b as (a, b) pairs; a single segment S enters
    as (S, identity), so after the scan position l holds (S_0 then … S_l, S_0 then … S_{l-1}). Associative,
    as a scan requires. A reverse scan passes the later part first, so the same combine gives the maps
    applied from the chunk's end (the backward's adjoint).
    """
    return pa1 * pa2, pa2 * pb1 + pb2, pa1 * qa2, qa2 * pb1 + qb2


@triton.jit
def _log2_approx(x):
    # The MUFU approximation (absolute error ~2^-22 on [0.5, 2]); tl.log2 is a libdevice polynomial.
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _softplus(x, FAST_MATH: tl.constexpr):
    """torch's softplus (threshold 20), as ``scan.py`` computes it. FAST_MATH uses the hardware exp2/log2
    approximations, and below x = -5, where 1 + e^x would lose e^x's digits, the series e - e²/2 + e³/3 (error
    below e⁴/4)."""
    if FAST_MATH:
        e = tl.math.exp2(x * LOG2E)
        small = e * (1.0 - e * (0.5 - e * 0.3333333333333333))
        out = tl.where(x > 20.0, x, tl.where(x < -5.0, small, LN2 * _log2_approx(1.0 + e)))
    else:
        out = _softplus_exact(x)
    return out


@triton.jit
def _walk_start(t0, n_in):
    """Row and column of step t0 on an affine walk with rows of n_in steps (anything for a route that is no
    walk, whose positions are read instead)."""
    n = tl.maximum(n_in, 1)
    row = t0 // n
    return row, t0 - row * n


@triton.jit
def _walk_move(row, col, d_row, d_col, n_in):
    """Row and column d_row·n_in + d_col steps on (0 <= d_col < n_in): chunk after chunk without a division,
    which costs some thirty instructions per thread."""
    col = col + d_col
    wrap = col >= n_in
    return row + d_row + wrap.to(tl.int32), tl.where(wrap, col - n_in, col)


@triton.jit
def _segment_positions(routes, k, t0, row, col, step, Lr, walk, base, n_in, s_in, s_out, EVEN_T: tl.constexpr):
    """Pixels p [TT, LT, 1] of steps t0 + step of route k, and which steps are real. ``walk``: the route
    is the affine walk (base, n_in, s_in, s_out), on which step t0 is at (row, col), and TT <= n_in, so a
    segment wraps a row at most once."""
    t = t0 + step
    if EVEN_T:  # whole segments are in or out
        valid = (step >= 0) & (t0 < Lr)
    else:
        valid = t < Lr
    if walk:
        p = base + col * s_in + row * s_out + step * s_in + tl.where(col + step >= n_in, s_out - n_in * s_in, 0)
    else:
        p = tl.load(routes + k * Lr + t, mask=valid, other=-1)
        valid = valid & (p >= 0)
        p = tl.where(valid, p, 0)
    return p, valid


@triton.jit
def _segment_loads(x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, out_img, so_k,
                   so_t, first_visit, k, t0, step, Lr, p, valid, d3, md3, first_mode, MERGE: tl.constexpr):
    """The tiles of one chunk, as stored: delta, x [TT, LT, BD], B, C [TT, LT, 1], and for serial merges
    the partial sums already at p (zero where a step is its pixel's first visit)."""
    m = valid & md3
    dt = tl.load(dt_img + k * sdt_k + p * sdt_t + d3, mask=m, other=0.0)
    xv = tl.load(x_img + k * sx_k + p * sx_t + d3, mask=m, other=0.0)
    Bv = tl.load(B_img + k * sB_k + p * sB_t, mask=valid, other=0.0)
    Cv = tl.load(C_img + k * sC_k + p * sC_t, mask=valid, other=0.0)
    old = xv  # a stand-in of the same type where unused
    if MERGE == 1:
        if first_mode == FIRST_MIXED:
            first = tl.load(first_visit + k * Lr + t0 + step, mask=valid, other=1)
            later = valid & (first == 0)
        else:
            later = valid & (first_mode == FIRST_NONE)
        old = tl.load(out_img + k * so_k + p * so_t + d3, mask=later & md3, other=0.0)
    return dt, xv, Bv, Cv, old


@triton.jit
def _tile_ranges(TT: tl.constexpr, LT: tl.constexpr, STEP_AXIS: tl.constexpr):
    """step and seg, the chunk tile's step-in-segment and segment indices, broadcastable against channels [BD]
    in the last axis; steps on axis STEP_AXIS, segments on the other. Triton lays out the lanes by the memory
    order it infers, and breaks ties between equally strided axes differently by version (3.6 spreads axis 0
    over lanes first, 3.8 axis 1): the steps go on the axis it keeps in one thread (``launches.n1_step_axis``)."""
    if STEP_AXIS == 0:
        step = tl.arange(0, TT)[:, None, None]
        seg = tl.arange(0, LT)[None, :, None]
    else:
        step = tl.arange(0, TT)[None, :, None]
        seg = tl.arange(0, LT)[:, None, None]
    return step, seg


@triton.jit
def step_axis_probe_kernel(x, routes, out, STEP_AXIS: tl.constexpr):
    """A chunk tile read as the kernels read theirs (positions through an index, channels contiguous), scanned
    along its steps: of the two axes, the one whose scan compiles without lane shuffles keeps the steps in one
    thread (``launches.n1_step_axis``)."""
    step, seg = _tile_ranges(4, 8, STEP_AXIS)
    d = tl.max_contiguous(tl.arange(0, 32), 4)[None, None, :]
    p = tl.load(routes + seg * 4 + step)
    tile = tl.load(x + p * 768 + d).to(tl.float32)
    tl.store(out + p * 768 + d, tl.cumsum(tile, axis=STEP_AXIS).to(out.dtype.element_ty))


@triton.jit
def _channel_block(pid_d, CPG, BD: tl.constexpr, VEC: tl.constexpr, EVEN_D: tl.constexpr):
    """Channels [BD] of program pid_d and which are real, also as the last axis of a (seg, step, channel) tile.
    The contiguity hint sets the vector width, which sets how many lanes the channels take."""
    offs_d = pid_d * BD + tl.max_contiguous(tl.arange(0, BD), VEC)
    if EVEN_D:
        mask_d = tl.full([BD], 1, tl.int1)
    else:
        mask_d = offs_d < CPG
    return offs_d, mask_d, offs_d[None, None, :], mask_d[None, None, :]


@triton.jit
def _route_walk(route_info, k, TT: tl.constexpr):
    """Route k's row of route_info: its first-visit mode, its affine walk, and whether positions are computed
    from the walk (an affine route whose rows are at least a segment long)."""
    info = route_info + k * ROUTE_INFO_COLS
    n_in = tl.load(info + INFO_N_INNER)
    walk = (tl.load(info + INFO_AFFINE) != 0) & (n_in >= TT)
    return (tl.load(info + INFO_FIRST_MODE), walk, tl.load(info + INFO_BASE), n_in, tl.load(info + INFO_S_INNER),
            tl.load(info + INFO_S_OUTER))


@triton.jit
def _chunk_move(n_in, BT: tl.constexpr, BACK: tl.constexpr):
    """(d_row, d_col) of a move by BT steps (back with BACK) on a walk with rows of n_in steps."""
    d_row, d_col = _walk_start(BT, n_in)
    if BACK:
        d_row = -d_row - (d_col != 0).to(tl.int32)
        d_col = tl.where(d_col == 0, 0, tl.maximum(n_in, 1) - d_col)
    return d_row, d_col


@triton.jit
def _channel_params(A, D, delta_bias, k, sA_k, sA_d, sD_k, offs_d, mask_d, HAS_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """A, D and delta_bias of route k as fp32 [1, 1, BD] tiles (zeros where absent)."""
    BD: tl.constexpr = offs_d.shape[0]
    A_k = tl.load(A + k * sA_k + offs_d * sA_d, mask=mask_d, other=0.0).to(tl.float32)[None, None, :]
    D_k = tl.zeros([1, 1, BD], dtype=tl.float32)
    bias_k = tl.zeros([1, 1, BD], dtype=tl.float32)
    if HAS_D:
        D_k = tl.load(D + k * sD_k + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, None, :]
    if HAS_BIAS:
        bias_k = tl.load(delta_bias + k * sD_k + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, None, :]
    return A_k, D_k, bias_k


@triton.jit
def _step_row(x, step, j, STEP_AXIS: tl.constexpr):
    """Step j of every segment of a chunk tile, which a thread holds in its registers: the selects fold per
    register, and adding -0.0 is exact, so this compiles to a register name."""
    return tl.sum(tl.where(step == j, x, -0.0), axis=STEP_AXIS, keep_dims=True)


@triton.jit
def _scan_steps(decay, drive, step, STEP_AXIS: tl.constexpr):
    """The in-thread scan of each segment, h ↦ decay·h + drive step after step: the maps (a_in, b_in) from the
    segment's start through each step, and the whole segment's. Written out step by step: Triton lowers
    tl.associative_scan through lane shuffles (before 3.8) even along an axis a thread holds."""
    TT: tl.constexpr = step.numel
    seg_a = _step_row(decay, step, 0, STEP_AXIS)
    seg_b = _step_row(drive, step, 0, STEP_AXIS)
    a_in = tl.where(step == 0, seg_a, decay)
    b_in = tl.where(step == 0, seg_b, drive)
    for j in tl.static_range(1, TT):
        d_j = _step_row(decay, step, j, STEP_AXIS)
        seg_a = d_j * seg_a
        seg_b = d_j * seg_b + _step_row(drive, step, j, STEP_AXIS)
        a_in = tl.where(step == j, seg_a, a_in)
        b_in = tl.where(step == j, seg_b, b_in)
    return a_in, b_in, seg_a, seg_b


@triton.jit
def _adjoint_steps(decay, gout, step, STEP_AXIS: tl.constexpr):
    """The adjoint g_t = gout_t + decay_{t+1}·g_{t+1} over each segment from its end, as maps of v = decay·g
    entering from after the segment: g_t = g_a·v + g_d at every step, and the segment's map v ↦ seg_a·v + seg_b
    (decay·g carried into the state before it). Step by step from the last, like ``_scan_steps``."""
    TT: tl.constexpr = step.numel
    seg_a = _step_row(tl.full(decay.shape, 1.0, tl.float32), step, 0, STEP_AXIS)
    seg_b = _step_row(tl.zeros(decay.shape, tl.float32), step, 0, STEP_AXIS)
    g_a = tl.zeros(decay.shape, tl.float32)
    g_d = tl.zeros(decay.shape, tl.float32)
    for j in tl.static_range(TT - 1, -1, -1):
        gd_j = _step_row(gout, step, j, STEP_AXIS) + seg_b
        g_a = tl.where(step == j, seg_a, g_a)
        g_d = tl.where(step == j, gd_j, g_d)
        d_j = _step_row(decay, step, j, STEP_AXIS)
        seg_a = d_j * seg_a
        seg_b = d_j * gd_j
    return g_a, g_d, seg_a, seg_b


@triton.jit
def _chunk_recurrence(dt_raw, xv, Bv, m, A_log2, bias_k, step, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                      FAST_MATH: tl.constexpr, STEP_AXIS: tl.constexpr):
    """The recurrence of one chunk, relative to its starting state: dt before and after softplus (zero at
    padded steps, which leave the state unchanged), decay = 2^(dt·A·log2 e) and drive = dt·x·B, the in-thread
    scan of each segment (a_in, b_in), and the inclusive and exclusive maps over the segments."""
    dt_pre = dt_raw
    if HAS_BIAS:
        dt_pre = dt_pre + bias_k
    dt = dt_pre
    if SOFTPLUS:
        dt = _softplus(dt_pre, FAST_MATH)
    dt = tl.where(m, dt, 0.0)
    decay = tl.math.exp2(dt * A_log2)
    drive = dt * xv * Bv
    a_in, b_in, seg_a, seg_b = _scan_steps(decay, drive, step, STEP_AXIS)
    incl_a, incl_b, excl_a, excl_b = tl.associative_scan(
        (seg_a, seg_b, tl.full(seg_a.shape, 1.0, tl.float32), tl.zeros(seg_a.shape, tl.float32)), 1 - STEP_AXIS,
        _prefix_combine)
    return dt_pre, dt, decay, drive, a_in, b_in, incl_a, incl_b, excl_a, excl_b


@triton.jit(do_not_specialize=["Lr", "L"])
def route_scan_n1_fwd_kernel(
    x, delta, A, B, C, D, delta_bias,
    routes, route_info, first_visit, parallel_ok, coverage, out_visited,
    out, chunk_states,
    Lr, L, K, CPG,
    sx_b, sx_k, sx_t,
    sdt_b, sdt_k, sdt_t,
    sB_b, sB_k, sB_t,
    sC_b, sC_k, sC_t,
    sA_k, sA_d, sD_k,
    so_b, so_k, so_t,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, MERGE: tl.constexpr,
    ZERO_UNVISITED: tl.constexpr, SAVE_CHUNKS: tl.constexpr, SAVE_T: tl.constexpr, FAST_MATH: tl.constexpr,
    TT: tl.constexpr, LT: tl.constexpr, BD: tl.constexpr, VEC: tl.constexpr, PREFETCH: tl.constexpr,
    STEP_AXIS: tl.constexpr, EVEN_D: tl.constexpr, EVEN_T: tl.constexpr,
):
    """y at every step of routes [k_lo, k_hi) of one (image, channel block); channels are contiguous
    (stride 1) in x, delta and out. MERGE as in ``scan.py`` (store or serial read-add-store)."""
    BT: tl.constexpr = TT * LT
    pid_d, pid_b, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    offs_d, mask_d, d3, md3 = _channel_block(pid_d, CPG, BD, VEC, EVEN_D)
    step, seg = _tile_ranges(TT, LT, STEP_AXIS)

    x_img, dt_img, B_img, C_img = _image_inputs(x, delta, B, C, b64, sx_b, sdt_b, sB_b, sC_b)
    out_img = out + b64 * so_b
    n_saved = tl.cdiv(Lr, SAVE_T)

    k_lo, k_hi = _route_range(parallel_ok, pid_k, K, MERGE)
    if ZERO_UNVISITED:
        _zero_unvisited_outputs(out_img, out_visited, coverage, pid_k, so_k, so_t, 1, offs_d, mask_d, L, BT, MERGE)
    for k in range(k_lo, k_hi):
        first_mode, walk, base, n_in, s_in, s_out = _route_walk(route_info, k, TT)
        A_k, D_k, bias_k = _channel_params(A, D, delta_bias, k, sA_k, sA_d, sD_k, offs_d, mask_d, HAS_D, HAS_BIAS)
        A_log2 = A_k * LOG2E  # decay = 2^(dt·A·log2 e)
        h = tl.zeros([1, 1, BD], dtype=tl.float32)
        d_row, d_col = _chunk_move(n_in, BT, False)
        # Software pipelining: chunk c + 1 is requested before chunk c is computed.
        t0 = seg * TT
        row, col = _walk_start(t0, n_in)
        p, valid = _segment_positions(routes, k, t0, row, col, step, Lr, walk, base, n_in, s_in, s_out, EVEN_T)
        dt, xv, Bv, Cv, old = _segment_loads(x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k,
                                             sC_t, out_img, so_k, so_t, first_visit, k, t0, step, Lr, p, valid, d3,
                                             md3, first_mode, MERGE)
        for c in range(0, tl.cdiv(Lr, BT)):
            t1 = t0 + BT
            row, col = _walk_move(row, col, d_row, d_col, n_in)
            if PREFETCH:
                p1, valid1 = _segment_positions(routes, k, t1, row, col, step, Lr, walk, base, n_in, s_in, s_out,
                                                EVEN_T)
                dt1, xv1, Bv1, Cv1, old1 = _segment_loads(
                    x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, out_img, so_k,
                    so_t, first_visit, k, t1, step, Lr, p1, valid1, d3, md3, first_mode, MERGE)
            m = valid & md3
            xf = xv.to(tl.float32)
            _, _, _, _, a_in, b_in, incl_a, incl_b, excl_a, excl_b = _chunk_recurrence(
                dt.to(tl.float32), xf, Bv.to(tl.float32), m, A_log2, bias_k, step, HAS_BIAS, SOFTPLUS, FAST_MATH,
                STEP_AXIS)
            h_start = excl_a * h + excl_b
            if SAVE_CHUNKS:  # the state before every SAVE_T-th step, for the backward
                saved = chunk_states + ((b64 * K + k) * n_saved + t0 // SAVE_T) * CPG + d3
                tl.store(saved, h_start, mask=(t0 % SAVE_T == 0) & (t0 < Lr) & md3)
            hs = a_in * h_start + b_in
            h = tl.sum(tl.where(seg == LT - 1, incl_a * h + incl_b, 0.0), axis=1 - STEP_AXIS, keep_dims=True)
            y = hs * Cv.to(tl.float32)
            if HAS_D:
                y += D_k * xf
            if MERGE == 1:
                y += old.to(tl.float32)
            tl.store(out_img + k * so_k + p * so_t + d3, y.to(out.dtype.element_ty), mask=m)
            if not PREFETCH:  # the same loads, issued after the compute
                p1, valid1 = _segment_positions(routes, k, t1, row, col, step, Lr, walk, base, n_in, s_in, s_out,
                                                EVEN_T)
                dt1, xv1, Bv1, Cv1, old1 = _segment_loads(
                    x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, out_img, so_k,
                    so_t, first_visit, k, t1, step, Lr, p1, valid1, d3, md3, first_mode, MERGE)
            t0, p, valid, dt, xv, Bv, Cv, old = t1, p1, valid1, dt1, xv1, Bv1, Cv1, old1
        if MERGE == 1:
            tl.debug_barrier()  # the next route reads what this one wrote


@triton.jit
def _segment_maps_from_end(seg_a, seg_b, seg, FLIP: tl.constexpr, SEG_AXIS: tl.constexpr):
    """The adjoint's maps over segments, applied from the chunk's end: for each segment the maps of the later
    segments (exclusive), and the whole chunk's. Triton lowers a reverse scan through many lane shuffles; with
    FLIP the segments are flipped and scanned forward, fewer shuffles while they share a warp (across warps a
    flip goes through shared memory). The tuner picks."""
    LT: tl.constexpr = seg.numel
    one = tl.full(seg_a.shape, 1.0, tl.float32)
    zero = tl.zeros(seg_a.shape, tl.float32)
    if FLIP:
        incl_a, incl_b, excl_a, excl_b = tl.associative_scan(
            (tl.flip(seg_a, SEG_AXIS), tl.flip(seg_b, SEG_AXIS), one, zero), SEG_AXIS, _prefix_combine)
        excl_a = tl.flip(excl_a, SEG_AXIS)
        excl_b = tl.flip(excl_b, SEG_AXIS)
        whole = seg == LT - 1
    else:
        incl_a, incl_b, excl_a, excl_b = tl.associative_scan((seg_a, seg_b, one, zero), SEG_AXIS, _prefix_combine,
                                                             reverse=True)
        whole = seg == 0
    total_a = tl.sum(tl.where(whole, incl_a, 0.0), axis=SEG_AXIS, keep_dims=True)
    total_b = tl.sum(tl.where(whole, incl_b, 0.0), axis=SEG_AXIS, keep_dims=True)
    return excl_a, excl_b, total_a, total_b


@triton.jit
def _bwd_chunk_loads(x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, g_img, sg_k, sg_t,
                     dx_img, sdx_k, sdx_t, states_k, routes, first_visit, k, c, row, col, step, seg, Lr, CPG, walk,
                     base, n_in, s_in, s_out, first_mode, d3, md3, DX_MERGE: tl.constexpr, EVEN_T: tl.constexpr):
    """What the backward reads for chunk c of route k, as stored: positions p and which steps are real, delta,
    x, dout [TT, LT, BD], B, C [TT, LT, 1], the chunk's saved starting state [1, 1, BD], and for a serial dx
    merge the sums of the earlier routes at p (zero at first visits). A route visits a pixel once, so these
    may be read before the route's later chunks are stored. (row, col): where chunk c's segments start on
    the route's walk."""
    TT: tl.constexpr = step.numel
    t0 = c * (TT * seg.numel) + seg * TT
    p, valid = _segment_positions(routes, k, t0, row, col, step, Lr, walk, base, n_in, s_in, s_out, EVEN_T)
    m = valid & md3
    dt = tl.load(dt_img + k * sdt_k + p * sdt_t + d3, mask=m, other=0.0)
    xv = tl.load(x_img + k * sx_k + p * sx_t + d3, mask=m, other=0.0)
    Bv = tl.load(B_img + k * sB_k + p * sB_t, mask=valid, other=0.0)
    Cv = tl.load(C_img + k * sC_k + p * sC_t, mask=valid, other=0.0)
    dy = tl.load(g_img + k * sg_k + p * sg_t + d3, mask=m, other=0.0)
    h0 = tl.load(states_k + c * CPG + d3, mask=md3, other=0.0)
    dx_old = xv  # a stand-in of the same type where unused
    if DX_MERGE == 1:  # masks, not branches: Triton 3.6 fails to compile a branch here for some tiles
        mixed = first_mode == FIRST_MIXED
        first = tl.load(first_visit + k * Lr + t0 + step, mask=valid & mixed, other=1)
        later = (first_mode == FIRST_NONE) | (mixed & (first == 0))
        dx_old = tl.load(dx_img + k * sdx_k + p * sdx_t + d3, mask=m & later, other=0.0)
    return p, valid, dt, xv, Bv, Cv, dy, h0, dx_old


@triton.jit
def _sigmoid(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        out = tl.math.fdiv(1.0, 1.0 + tl.math.exp2(-x * LOG2E), ieee_rounding=False)
    else:
        out = tl.sigmoid(x)
    return out


@triton.jit(do_not_specialize=["Lr", "L"])
def route_scan_n1_bwd_kernel(
    x, delta, A, B, C, D, delta_bias,
    routes, route_info, first_visit, parallel_ok, coverage, x_visited, param_visited,
    dout, chunk_states,
    dx, ddelta, dB_part, dC_part, dA_part, dD_part, dbias_part,
    Lr, L, K, CPG,
    sx_b, sx_k, sx_t,
    sdt_b, sdt_k, sdt_t,
    sB_b, sB_k, sB_t,
    sC_b, sC_k, sC_t,
    sA_k, sA_d, sD_k,
    sg_b, sg_k, sg_t,
    sdx_b, sdx_k, sdx_t,
    sdd_b, sdd_k, sdd_t,
    sP_j, sP_b, sP_k,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DX_MERGE: tl.constexpr,
    ZERO_UNVISITED: tl.constexpr, FAST_MATH: tl.constexpr,
    TT: tl.constexpr, LT: tl.constexpr, BD: tl.constexpr, VEC: tl.constexpr, FLIP: tl.constexpr,
    PREFETCH: tl.constexpr, STEP_AXIS: tl.constexpr, EVEN_D: tl.constexpr, EVEN_T: tl.constexpr,
):
    """Gradients of one (image, channel block) over routes [k_lo, k_hi), chunks of TT·LT steps from last to
    first; the chunk is the saving interval of the forward's chunk states, which start each chunk's recompute.

    The adjoint g_t = dy_t·C_t + decay_{t+1}·g_{t+1} runs from the chunk's end as affine maps of what enters
    from later steps: step by step within a segment (``_adjoint_steps``), then over the segments with the
    exclusive prefix of ``_prefix_combine`` applied from the chunk's end. Outputs as in the general
    backward: ddelta, dx (read-add-store after first visits for a shared x), per-step dB/dC summed over this
    program's channels into dB_part/dC_part[pid_d], and dA, dD, delta_bias summed over steps per image.
    """
    BT: tl.constexpr = TT * LT
    pid_d, pid_b, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b64 = pid_b.to(tl.int64)
    offs_d, mask_d, d3, md3 = _channel_block(pid_d, CPG, BD, VEC, EVEN_D)
    step, seg = _tile_ranges(TT, LT, STEP_AXIS)
    n_chunks = tl.cdiv(Lr, BT)

    x_img, dt_img, B_img, C_img = _image_inputs(x, delta, B, C, b64, sx_b, sdt_b, sB_b, sC_b)
    g_img = dout + b64 * sg_b
    dx_img = dx + b64 * sdx_b
    dd_img = ddelta + b64 * sdd_b
    dBp_img, dCp_img = _partial_slots(dB_part, dC_part, pid_d, b64, sP_j, sP_b)

    k_lo, k_hi = _route_range(parallel_ok, pid_k, K, DX_MERGE)
    if ZERO_UNVISITED:
        _zero_unvisited_outputs(dx_img, x_visited, coverage, pid_k, sdx_k, sdx_t, 1, offs_d, mask_d, L, BT, DX_MERGE)
    for k in range(k_lo, k_hi):
        if ZERO_UNVISITED:
            if tl.load(coverage + 2) == 0:
                _zero_unvisited(dd_img + k * sdd_k, param_visited + k * L, sdd_t, 1, offs_d, mask_d, L, BT)
        first_mode, walk, base, n_in, s_in, s_out = _route_walk(route_info, k, TT)
        A_raw, D_k, bias_k = _channel_params(A, D, delta_bias, k, sA_k, sA_d, sD_k, offs_d, mask_d, HAS_D, HAS_BIAS)
        A_log2 = A_raw * LOG2E
        carry = tl.zeros([1, 1, BD], dtype=tl.float32)  # decay·g entering the chunk from the next one
        # Per-(segment, channel) sums over steps, reduced once per route.
        acc_dA = tl.zeros([seg.shape[0], seg.shape[1], BD], dtype=tl.float32)
        acc_dD = tl.zeros([seg.shape[0], seg.shape[1], BD], dtype=tl.float32)
        acc_dbias = tl.zeros([seg.shape[0], seg.shape[1], BD], dtype=tl.float32)
        states_k = chunk_states + (b64 * K + k) * n_chunks * CPG
        c = n_chunks - 1
        back_row, back_col = _chunk_move(n_in, BT, True)
        row, col = _walk_start(c * BT + seg * TT, n_in)
        p, valid, dt_in, x_in, B_in, C_in, dy_in, h0, dx_old = _bwd_chunk_loads(
            x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, g_img, sg_k, sg_t, dx_img,
            sdx_k, sdx_t, states_k, routes, first_visit, k, c, row, col, step, seg, Lr, CPG, walk, base, n_in, s_in,
            s_out, first_mode, d3, md3, DX_MERGE, EVEN_T)
        for i in range(0, n_chunks):
            t = c * BT + seg * TT + step
            # Software pipelining: the previous chunk (the first again at the last) is requested first.
            c1 = tl.maximum(c - 1, 0)
            row1, col1 = _walk_move(row, col, back_row, back_col, n_in)
            row1 = tl.where(c > 0, row1, row)
            col1 = tl.where(c > 0, col1, col)
            if PREFETCH:
                p1, valid1, dt_in1, x_in1, B_in1, C_in1, dy_in1, h01, dx_old1 = _bwd_chunk_loads(
                    x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, g_img, sg_k,
                    sg_t, dx_img, sdx_k, sdx_t, states_k, routes, first_visit, k, c1, row1, col1, step, seg, Lr, CPG,
                    walk, base, n_in, s_in, s_out, first_mode, d3, md3, DX_MERGE, EVEN_T)
            m = valid & md3
            dt_raw = dt_in.to(tl.float32)
            xv = x_in.to(tl.float32)
            Bv = B_in.to(tl.float32)
            Cv = C_in.to(tl.float32)
            dy = dy_in.to(tl.float32)
            # The chunk's states, recomputed from the saved one as in the forward.
            dt_pre, dt, decay, drive, a_in, b_in, _, _, excl_a, excl_b = _chunk_recurrence(
                dt_raw, xv, Bv, m, A_log2, bias_k, step, HAS_BIAS, SOFTPLUS, FAST_MATH, STEP_AXIS)
            hs = a_in * (excl_a * h0 + excl_b) + b_in
            # The adjoint, from the chunk's end: in-thread, then over segments (later segments first).
            g_a, g_d, seg_ra, seg_rb = _adjoint_steps(decay, dy * Cv, step, STEP_AXIS)
            excl_ra, excl_rb, total_ra, total_rb = _segment_maps_from_end(seg_ra, seg_rb, seg, FLIP, 1 - STEP_AXIS)
            v = excl_ra * carry + excl_rb  # decay·g entering each segment from its end
            g = g_a * v + g_d
            carry = total_ra * carry + total_rb

            gB = g * Bv
            d_arg = g * (hs - drive)  # gradient of dt·A inside exp: g_t·decay_t·h_{t-1}
            ddt = gB * xv + d_arg * A_raw
            acc_dA += tl.sum(d_arg * dt, axis=STEP_AXIS, keep_dims=True)
            dxv = gB * dt
            if HAS_D:
                dxv += dy * D_k
                acc_dD += tl.sum(dy * xv, axis=STEP_AXIS, keep_dims=True)
            if SOFTPLUS:
                ddt = ddt * _sigmoid(dt_pre, FAST_MATH)
            ddt = tl.where(m, ddt, 0.0)
            acc_dbias += tl.sum(ddt, axis=STEP_AXIS, keep_dims=True)
            tl.store(dd_img + k * sdd_k + p * sdd_t + d3, ddt.to(ddelta.dtype.element_ty), mask=m)
            if DX_MERGE == 1:
                dxv += dx_old.to(tl.float32)
            tl.store(dx_img + k * sdx_k + p * sdx_t + d3, dxv.to(dx.dtype.element_ty), mask=m)
            # B/C gradients per step (route order), summed over this program's channels; padded steps store
            # their zeros (dt and dy are zero there).
            in_range = t < Lr
            tl.store(dBp_img + k * sP_k + t, tl.sum(g * dt * xv, axis=2, keep_dims=True), mask=in_range)
            tl.store(dCp_img + k * sP_k + t, tl.sum(hs * dy, axis=2, keep_dims=True), mask=in_range)
            if not PREFETCH:  # the same loads, issued after the compute
                p1, valid1, dt_in1, x_in1, B_in1, C_in1, dy_in1, h01, dx_old1 = _bwd_chunk_loads(
                    x_img, sx_k, sx_t, dt_img, sdt_k, sdt_t, B_img, sB_k, sB_t, C_img, sC_k, sC_t, g_img, sg_k,
                    sg_t, dx_img, sdx_k, sdx_t, states_k, routes, first_visit, k, c1, row1, col1, step, seg, Lr, CPG,
                    walk, base, n_in, s_in, s_out, first_mode, d3, md3, DX_MERGE, EVEN_T)
            c, row, col, p, valid, h0, dx_old = c1, row1, col1, p1, valid1, h01, dx_old1
            dt_in, x_in, B_in, C_in, dy_in = dt_in1, x_in1, B_in1, C_in1, dy_in1
        part = (b64 * K + k) * CPG + offs_d
        tl.store(dA_part + part, tl.sum(tl.sum(acc_dA, axis=0), axis=0), mask=mask_d)
        if HAS_D:
            tl.store(dD_part + part, tl.sum(tl.sum(acc_dD, axis=0), axis=0), mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_part + part, tl.sum(tl.sum(acc_dbias, axis=0), axis=0), mask=mask_d)
        if DX_MERGE == 1:
            tl.debug_barrier()
