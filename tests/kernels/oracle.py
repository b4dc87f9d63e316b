"""Independent oracles for the kernel tests: a plain per-step loop, written from the recurrence, and the
scan of a widened copy of x (what a wider out_dtype must equal)."""
import torch
import torch.nn.functional as F

from vmamba_kernels import selective_scan_2d


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

