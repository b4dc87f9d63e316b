"""Independent oracles for the kernel tests: a plain per-step loop, written from the recurrence, and the
scan of a widened copy of x (what a wider out_dtype must equal); with the relative error the tests compare by
and the 2D problem that the eager scans' tests share."""
import torch
import torch.nn.functional as F

from vmamba_kernels import scan_routes, selective_scan_2d


def per_step_scan(u, delta, A, B, C=None, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Returns (out, last_state, states) in fp64; B, C (Bt, N, L) or (Bt, G, N, L)."""
    u, delta, A = u.double(), delta.double(), A.double()
    Bt, Dm, L = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_channel(M):  # → (Bt, Dm, N, L)
        M = M.double()
        if M.dim() == 3:
            return M[:, None].expand(Bt, Dm, N, L)
        G = M.shape[1]
        return torch.stack([M[:, d // (Dm // G)] for d in range(Dm)], dim=1)

    Bf = per_channel(B)
    h = torch.zeros(Bt, Dm, N, dtype=torch.float64)
    states, ys = [], []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bf[..., t] * u[:, :, t, None]
        states.append(h)
        if C is not None:
            ys.append((h * per_channel(C)[..., t]).sum(-1))
    states = torch.stack(states, dim=-1)
    if C is None:
        return None, h, states
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h, states


def gather_scan_scatter(x, delta, A, B, C, D, delta_bias, routes, param_routes, merge, delta_softplus=False):
    """selective_scan_2d written route by route, pixel by pixel, in fp64."""
    Bt, H, W, K, Dm = delta.shape
    out = torch.zeros(Bt, H * W, K, Dm, dtype=torch.float64)
    for k in range(K):
        steps = [(int(p), int(q)) for p, q in zip(routes[k], param_routes[k]) if p >= 0]
        at = [p for p, _ in steps]
        param_at = [q for _, q in steps]
        xk = x.reshape(Bt, H * W, Dm) if x.dim() == 4 else x.reshape(Bt, H * W, K, Dm)[:, :, k]
        u = xk[:, at].transpose(1, 2)
        dk = delta.reshape(Bt, H * W, K, Dm)[:, param_at, k].transpose(1, 2)
        Bk = B.reshape(Bt, H * W, K, -1)[:, param_at, k].transpose(1, 2)
        Ck = C.reshape(Bt, H * W, K, -1)[:, param_at, k].transpose(1, 2)
        y, _, _ = per_step_scan(u, dk, A[k], Bk, Ck, None if D is None else D[k], None,
                                None if delta_bias is None else delta_bias[k], delta_softplus)
        for t, p in enumerate(at):
            out[:, p, k] += y[:, :, t]
    out = out.reshape(Bt, H, W, K, Dm)
    return out.sum(3) if merge == "sum" else out


def _scan_and_grads(x, others, routes, merge, dout=None, **options):
    """out and the gradients of x and the other inputs (dout: fresh random unless given); x's gradient is in
    x's dtype either way."""
    leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for t in others]
    scanned = leaves[0].to(options.pop("copy_to")) if "copy_to" in options else leaves[0]
    out = selective_scan_2d(scanned, *leaves[1:], delta_softplus=True, routes=routes, merge=merge, **options)
    dout = torch.randn_like(out) if dout is None else dout
    return out, torch.autograd.grad(out, leaves, dout), dout


def wider_out_and_copy_forms(x, others, routes, merge, out_dtype, backend="auto"):
    """(out, grads) of x scanned with ``out_dtype``, and of a copy of x in out_dtype scanned (same dout)."""
    out, grads, dout = _scan_and_grads(x, others, routes, merge, out_dtype=out_dtype, backend=backend)
    copy_out, copy_grads, _ = _scan_and_grads(x, others, routes, merge, dout, copy_to=out_dtype, backend=backend)
    return (out, grads), (copy_out, copy_grads)



def relative_error(a, b):
    """||a - b|| / ||b|| in fp64; a NaN or inf in a fails."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/inf in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def atrous_2d_problem(Dm, seed=5):
    """A 2D scan on the atrous routes of an 11x9 map (30 steps, routes of different lengths, -1 padded), batch 2,
    d_state 3: the arguments of ``selective_scan_2d`` but merge and softplus."""
    g = torch.Generator().manual_seed(seed)
    H, W = 11, 9
    routes = scan_routes("atrous", H, W)
    K, Bt, N = routes.shape[0], 2, 3
    return dict(x=torch.randn(Bt, H, W, Dm, generator=g), delta=torch.randn(Bt, H, W, K, Dm, generator=g) * 0.5,
                A=-torch.rand(K, Dm, N, generator=g) - 0.1, B=torch.randn(Bt, H, W, K, N, generator=g),
                C=torch.randn(Bt, H, W, K, N, generator=g), D=torch.randn(K, Dm, generator=g),
                delta_bias=torch.randn(K, Dm, generator=g), routes=routes)
