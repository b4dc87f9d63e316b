"""Triton kernels of the row LayerNorm (``vmamba_kernels.layer_norm``).

    out[r] = (x[r] - mean[r]) · rstd[r] · w[r mod G] + b[r mod G],    rstd = 1 / sqrt(var + eps)

over rows r of N features, with G affine groups (G = 1: nn.LayerNorm; G = K: one affine per route or channel
group of a (..., K, N) tensor). A program normalizes a [BM rows, BN ≥ N] tile in fp32 registers: the zoo's
rows are short (16 to 768 features), and PyTorch's kernels give each row its own block of threads, which
leaves most threads idle and made LayerNorm the largest GPU item of GroupMamba-T's inference.

Backward: dx = rstd · (w·dy - mean(w·dy) - x̂ · mean(x̂·w·dy)) per row; the weight and bias gradients are
summed over each program's rows into per-program partials [G, N], which the caller adds up in a fixed
order (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 4096  # BM·BN per program: 32 fp32 values per thread and tensor at 4 warps


@triton.jit
def _row_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr):
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows, cols, mask


@triton.jit
def _affine(ptr, rows, cols, mask, N, G: tl.constexpr):
    """w or b of each row's group as a [BM, BN] fp32 tile (rows of one group share a cached load)."""
    return tl.load(ptr + (rows % G)[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def layer_norm_fwd_kernel(x, w, b, out, mean, rstd, M, N, eps, sx_m, so_m,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, G: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
    rows, cols, mask = _row_tile(tl.program_id(0), M, N, BM, BN)
    r64 = rows.to(tl.int64)
    xv = tl.load(x + r64[:, None] * sx_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(xv, axis=1) / N
    xc = tl.where(mask, xv - mu[:, None], 0.0)  # two passes over registers: no cancellation in var
    var = tl.sum(xc * xc, axis=1) / N
    rs = 1.0 / tl.sqrt(var + eps)
    y = xc * rs[:, None]
    if HAS_W:
        y = y * _affine(w, rows, cols, mask, N, G)
    if HAS_B:
        y = y + _affine(b, rows, cols, mask, N, G)
    tl.store(out + r64[:, None] * so_m + cols[None, :], y.to(out.dtype.element_ty), mask=mask)
    tl.store(mean + rows, mu, mask=rows < M)
    tl.store(rstd + rows, rs, mask=rows < M)


@triton.jit
def layer_norm_bwd_kernel(dy, x, w, mean, rstd, dx, dw_part, db_part, M, N, sdy_m, sx_m, sdx_m,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, G: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    rows, cols, mask = _row_tile(pid, M, N, BM, BN)
    r64 = rows.to(tl.int64)
    xv = tl.load(x + r64[:, None] * sx_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy + r64[:, None] * sdy_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mean + rows, mask=rows < M, other=0.0)
    rs = tl.load(rstd + rows, mask=rows < M, other=0.0)
    xhat = tl.where(mask, (xv - mu[:, None]) * rs[:, None], 0.0)
    wg = g
    if HAS_W:
        wg = g * _affine(w, rows, cols, mask, N, G)
    c1 = tl.sum(xhat * wg, axis=1) / N
    c2 = tl.sum(wg, axis=1) / N
    dxv = (wg - (xhat * c1[:, None] + c2[:, None])) * rs[:, None]
    tl.store(dx + r64[:, None] * sdx_m + cols[None, :], dxv.to(dx.dtype.element_ty), mask=mask)
    # row i of the tile is in group i mod G (BM is a multiple of G): fold the tile to [BM / G, G, BN]
    part = pid * G * N + tl.arange(0, G)[:, None] * N + cols[None, :]
    part_mask = (cols < N)[None, :] & (tl.arange(0, G) < G)[:, None]
    if HAS_W:
        tl.store(dw_part + part, tl.sum(tl.reshape(g * xhat, (BM // G, G, BN)), axis=0), mask=part_mask)
    if HAS_B:
        tl.store(db_part + part, tl.sum(tl.reshape(g, (BM // G, G, BN)), axis=0), mask=part_mask)


def _tile(N: int, G: int):
    """(BM, BN, warps): about _TILE_ELEMENTS per program, BM a multiple of the group count G. An internal the
    offline sm_90 compile test reads, to compile the tiles the launches use."""
    BN = triton.next_power_of_2(N)
    BM = max(_TILE_ELEMENTS // BN, G, 1)
    return BM, BN, 4 if BM * BN <= _TILE_ELEMENTS else 8


def layer_norm_fwd(x2d, weight, bias, eps, out_dtype):
    """x2d (M, N) with unit feature stride; weight, bias (G, N) or None → (out (M, N), mean (M,), rstd (M,))."""
    M, N = x2d.shape
    G = weight.shape[0] if weight is not None else 1
    out = x2d.new_empty((M, N), dtype=out_dtype)
    mean = x2d.new_empty((M,), dtype=torch.float32)
    rstd = x2d.new_empty((M,), dtype=torch.float32)
    if M == 0:
        return out, mean, rstd
    BM, BN, warps = _tile(N, G)
    layer_norm_fwd_kernel[(triton.cdiv(M, BM),)](
        x2d, weight if weight is not None else x2d, bias if bias is not None else x2d, out, mean, rstd,
        M, N, float(eps), x2d.stride(0), out.stride(0),
        HAS_W=weight is not None, HAS_B=bias is not None, G=G, BM=BM, BN=BN, num_warps=warps)
    return out, mean, rstd


def layer_norm_bwd(dy2d, x2d, weight, has_bias, mean, rstd, groups):
    """Gradients (dx (M, N) in x's dtype, dw and db as (G, N) fp32 sums or None)."""
    M, N = x2d.shape
    BM, BN, warps = _tile(N, groups)
    programs = triton.cdiv(M, BM)
    dx = x2d.new_empty((M, N))
    dw_part = x2d.new_empty((programs, groups, N), dtype=torch.float32) if weight is not None else None
    db_part = x2d.new_empty((programs, groups, N), dtype=torch.float32) if has_bias else None
    if M > 0:
        layer_norm_bwd_kernel[(programs,)](
            dy2d, x2d, weight if weight is not None else x2d, mean, rstd, dx,
            dw_part if dw_part is not None else mean, db_part if db_part is not None else mean,
            M, N, dy2d.stride(0), x2d.stride(0), dx.stride(0),
            HAS_W=weight is not None, HAS_B=has_bias, G=groups, BM=BM, BN=BN, num_warps=warps)
    dw = dw_part.sum(0) if dw_part is not None else None
    db = db_part.sum(0) if db_part is not None else None
    return dx, dw, db
