"""Triton kernels of the dilated depthwise-conv sum (``vmamba_kernels.dilated_dwconv_sum``).

    out[b, c, y, x] = Σ_i Σ_{a, e} w[i, a, e, c] · x[b, c, clamp(y + (a - r)·d_i), clamp(x + (e - r)·d_i)]

with r = k // 2: k×k depthwise kernels at dilations d_i, borders replicated (clamped indices), summed. One
program reads a [BP pixels, BC channels] tile of every tap (the maps stay in L1/L2) and writes the sum once,
in any memory layout: no padded copy and no per-dilation output, which PyTorch's dilated depthwise convs need.

Backward: the input gradient is the same kernel run on the output gradient with the taps mirrored, zero
filling instead of clamping, onto the grid padded by R = r·max(d) on every side (the gradient of the padded
input); the caller folds the padding onto the border rows and columns. The weight gradient sums
g · x[clamped tap] over pixels, one partial [taps, BC] per (image, channel block), which the caller adds up:
no atomics, so every result is deterministic.
"""
import triton
import triton.language as tl


@triton.jit
def _tap(dil_index, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr):
    if dil_index == 0:
        d = D0
    elif dil_index == 1:
        d = D1
    elif dil_index == 2:
        d = D2
    else:
        d = D3
    return d


@triton.jit
def _tap_coord(o, offset, size, ok, MIRROR: tl.constexpr, CLAMP: tl.constexpr):
    """The coordinate a tap reads along one axis (o - offset if MIRROR, else o + offset), clamped into
    [0, size) (CLAMP) or masked out of ``ok`` where it falls outside."""
    if MIRROR:
        c = o - offset
    else:
        c = o + offset
    if CLAMP:
        c = tl.minimum(tl.maximum(c, 0), size - 1)
    else:
        ok = ok & (c >= 0) & (c < size)
    return c, ok


@triton.jit
def dwconv_sum_kernel(
    x, w, out,
    C, H, W, OH, OW, origin,
    sx_b, sx_c, sx_h, sx_w,
    so_b, so_c, so_h, so_w,
    NDIL: tl.constexpr, KS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    MIRROR: tl.constexpr, CLAMP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    """out (OH, OW) at pixel (y, x) = Σ_taps w[tap, c] · x[y + origin + s·dy, x + origin + s·dx], s = -1 if
    MIRROR else 1; out-of-range reads clamp to the border (CLAMP) or are zero. w is (taps, C) fp32."""
    pid_p, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_p * BP + tl.arange(0, BP)
    c = pid_c * BC + tl.arange(0, BC)
    p_ok = p < OH * OW
    c_ok = c < C
    oy = p // OW + origin
    ox = p % OW + origin
    x_img = x + pid_b.to(tl.int64) * sx_b + c[None, :].to(tl.int64) * sx_c
    acc = tl.zeros([BP, BC], dtype=tl.float32)
    R: tl.constexpr = KS // 2
    for i in tl.static_range(NDIL):
        d = _tap(i, D0, D1, D2, D3)
        for a in tl.static_range(KS):
            yy, y_ok = _tap_coord(oy, (a - R) * d, H, p_ok, MIRROR, CLAMP)
            for e in tl.static_range(KS):
                xx, ok = _tap_coord(ox, (e - R) * d, W, y_ok, MIRROR, CLAMP)
                v = tl.load(x_img + yy[:, None] * sx_h + xx[:, None] * sx_w, mask=ok[:, None] & c_ok[None, :],
                            other=0.0)
                wt = tl.load(w + ((i * KS + a) * KS + e) * C + c, mask=c_ok, other=0.0)
                acc += v.to(tl.float32) * wt[None, :]
    o_ptr = (out + pid_b.to(tl.int64) * so_b + c[None, :].to(tl.int64) * so_c
             + (p // OW)[:, None] * so_h + (p % OW)[:, None] * so_w)
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def dwconv_sum_wgrad_kernel(
    x, g, partial,
    C, H, W,
    sx_b, sx_c, sx_h, sx_w,
    sg_b, sg_c, sg_h, sg_w,
    NDIL: tl.constexpr, KS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    TP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
):
    """partial[b, tap, c] = Σ_{y, x} g[b, c, y, x] · x[b, c, clamp(y + dy), clamp(x + dx)] (fp32, TP ≥ taps)."""
    pid_c, pid_b = tl.program_id(0), tl.program_id(1)
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    b64 = pid_b.to(tl.int64)
    x_img = x + b64 * sx_b + c[None, :].to(tl.int64) * sx_c
    g_img = g + b64 * sg_b + c[None, :].to(tl.int64) * sg_c
    taps = tl.arange(0, TP)
    acc = tl.zeros([TP, BC], dtype=tl.float32)
    R: tl.constexpr = KS // 2
    for p0 in range(0, H * W, BP):
        p = p0 + tl.arange(0, BP)
        p_ok = p < H * W
        y = p // W
        x0 = p % W
        m = p_ok[:, None] & c_ok[None, :]
        gv = tl.load(g_img + y[:, None] * sg_h + x0[:, None] * sg_w, mask=m, other=0.0).to(tl.float32)
        for i in tl.static_range(NDIL):
            d = _tap(i, D0, D1, D2, D3)
            for a in tl.static_range(KS):
                yy = tl.minimum(tl.maximum(y + (a - R) * d, 0), H - 1)
                for e in tl.static_range(KS):
                    xx = tl.minimum(tl.maximum(x0 + (e - R) * d, 0), W - 1)
                    v = tl.load(x_img + yy[:, None] * sx_h + xx[:, None] * sx_w, mask=m, other=0.0)
                    part = tl.sum(gv * v.to(tl.float32), axis=0)
                    acc += tl.where(taps[:, None] == (i * KS + a) * KS + e, part[None, :], 0.0)
    ptr = partial + (b64 * TP + taps[:, None]) * C + c[None, :]
    tl.store(ptr, acc, mask=c_ok[None, :])


# --------------------------------------------------------------------------------------------------
# Launches

import torch  # noqa: E402  (the kernels above need only triton)

_BP, _BC = 64, 32  # pixels x channels per program (fp32 accumulators: 16 per thread at 4 warps)


def _dilation_args(dilations):
    if not 1 <= len(dilations) <= 4:
        raise ValueError(f"the fused kernels take 1 to 4 dilations, got {tuple(dilations)}")
    padded = tuple(int(d) for d in dilations) + (1,) * (4 - len(dilations))
    return dict(NDIL=len(dilations), D0=padded[0], D1=padded[1], D2=padded[2], D3=padded[3])


def _run(src, w_taps, out, H, W, origin, ks, dilations, mirror, clamp):
    B, C, OH, OW = out.shape
    if B == 0 or C == 0 or OH * OW == 0:
        return out
    grid = (triton.cdiv(OH * OW, _BP), triton.cdiv(C, _BC), B)
    dwconv_sum_kernel[grid](
        src, w_taps, out, C, H, W, OH, OW, origin, *src.stride(), *out.stride(),
        KS=ks, MIRROR=mirror, CLAMP=clamp, BP=_BP, BC=_BC, num_warps=4, **_dilation_args(dilations))
    return out


def dwconv_sum_fwd(x, w_taps, dilations, ks, out_dtype, channels_last):
    """x (B, C, H, W), any strides; w_taps (taps, C) fp32 → the sum, in out_dtype and the asked layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=fmt)
    H, W = x.shape[-2:]
    return _run(x, w_taps, out, H, W, 0, ks, dilations, mirror=False, clamp=True)


def dwconv_sum_bwd(g, x, w_taps, dilations, ks):
    """Gradients of the input (x's dtype, contiguous) and of w_taps (taps, C) fp32."""
    B, C, H, W = x.shape
    R = (ks // 2) * max(dilations)
    # the gradient of the replicate-padded input, then its padding folded onto the border rows and columns
    gp = torch.empty(B, C, H + 2 * R, W + 2 * R, dtype=torch.float32, device=x.device)
    _run(g, w_taps, gp, H, W, -R, ks, dilations, mirror=True, clamp=False)
    if R:
        gp[:, :, R] += gp[:, :, :R].sum(2)
        gp[:, :, R + H - 1] += gp[:, :, R + H:].sum(2)
        rows = gp[:, :, R:R + H]
        rows[..., R] += rows[..., :R].sum(3)
        rows[..., R + W - 1] += rows[..., R + W:].sum(3)
    dx = gp[:, :, R:R + H, R:R + W].to(dtype=x.dtype, memory_format=torch.contiguous_format)

    taps = w_taps.shape[0]
    TP = triton.next_power_of_2(taps)
    partial = torch.empty(B, TP, C, dtype=torch.float32, device=x.device)
    if B and C and H * W:
        dwconv_sum_wgrad_kernel[(triton.cdiv(C, _BC), B)](
            x, g, partial, C, H, W, *x.stride(), *g.stride(), KS=ks, TP=TP, BP=_BP, BC=_BC, num_warps=4,
            **_dilation_args(dilations))
        dw = partial[:, :taps].sum(0)
    else:
        dw = torch.zeros(taps, C, dtype=torch.float32, device=x.device)
    return dx, dw
