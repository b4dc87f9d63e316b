"""The reference selective scan against a plain per-step loop, and its gradients."""
import pytest
import torch

import vmamba_kernels as vk
from tests.kernels.oracle import per_step_scan, relative_error


def _inputs(Bt=2, Dm=6, L=9, N=4, groups=None, dtype=torch.float64):
    shape_bc = (Bt, N, L) if groups is None else (Bt, groups, N, L)
    return dict(
        u=torch.randn(Bt, Dm, L, dtype=dtype),
        delta=torch.randn(Bt, Dm, L, dtype=dtype) * 0.5,
        A=-torch.rand(Dm, N, dtype=torch.float32 if dtype != torch.float64 else dtype) - 0.1,
        B=torch.randn(*shape_bc, dtype=dtype),
        C=torch.randn(*shape_bc, dtype=dtype),
    )


OPTIONS = [
    dict(),
    dict(delta_softplus=True),
    dict(delta_bias=True, delta_softplus=True),
    dict(D=True),
    dict(z=True),
    dict(D=True, z=True, delta_bias=True, delta_softplus=True),
]


@pytest.mark.parametrize("groups", [None, 1, 2, 3])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_matches_per_step_loop_fp64(options, groups):
    x = _inputs(groups=groups)
    Dm = x["u"].shape[1]
    kw = dict(delta_softplus=options.get("delta_softplus", False))
    if options.get("D"):
        kw["D"] = torch.randn(Dm, dtype=torch.float64)
    if options.get("z"):
        kw["z"] = torch.randn_like(x["u"])
    if options.get("delta_bias"):
        kw["delta_bias"] = torch.randn(Dm, dtype=torch.float64)
    out, last = vk.selective_scan(**x, **kw, return_last_state=True, backend="reference")
    want, want_last, _ = per_step_scan(**x, **kw)
    assert out.dtype == torch.float64 and last.shape == (2, Dm, 4)
    assert relative_error(out, want) < 1e-6
    assert relative_error(last, want_last) < 1e-6
    assert torch.equal(vk.selective_scan(**x, **kw, backend="reference"), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    x = _inputs(dtype=dtype, L=33)
    D = torch.randn(6)
    out, last = vk.selective_scan(**x, D=D, delta_softplus=True, return_last_state=True)
    want, want_last, _ = per_step_scan(**x, D=D, delta_softplus=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # only the final rounding of out is low precision
    assert relative_error(out, want) < tol
    assert relative_error(last, want_last) < 1e-5


def test_states_match_per_step_loop():
    x = _inputs(groups=2)
    bias = torch.randn(6, dtype=torch.float64)
    states = vk.selective_scan_states(x["u"], x["delta"], x["A"], x["B"], delta_bias=bias, delta_softplus=True)
    _, _, want = per_step_scan(x["u"], x["delta"], x["A"], x["B"], delta_bias=bias, delta_softplus=True)
    assert states.shape == (2, 6, 4, 9)
    assert relative_error(states, want) < 1e-6


def test_gradcheck_all_inputs_fp64():
    x = {k: v.requires_grad_() for k, v in _inputs(Bt=1, Dm=4, L=6, N=3, groups=2).items()}
    D = torch.randn(4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(u, delta, A, B, C, D, z, bias):
        return vk.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, (x["u"], x["delta"], x["A"], x["B"], x["C"], D, z, bias))


def test_gradcheck_states_fp64():
    x = {k: v.requires_grad_() for k, v in _inputs(Bt=1, Dm=4, L=6, N=2).items()}
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    f = lambda u, d, A, B, b: vk.selective_scan_states(u, d, A, B, delta_bias=b, delta_softplus=True)
    assert torch.autograd.gradcheck(f, (x["u"], x["delta"], x["A"], x["B"], bias))


def test_gradients_match_autograd_through_the_loop():
    """Analytic backward vs autograd through the independent per-step loop, at a longer length."""
    x = {k: v.requires_grad_() for k, v in _inputs(Bt=2, Dm=6, L=40, N=4, groups=3).items()}
    extra = dict(D=torch.randn(6, dtype=torch.float64, requires_grad=True),
                 z=torch.randn(2, 6, 40, dtype=torch.float64, requires_grad=True),
                 delta_bias=torch.randn(6, dtype=torch.float64, requires_grad=True))
    leaves = list(x.values()) + list(extra.values())
    out, last = vk.selective_scan(**x, **extra, delta_softplus=True, return_last_state=True)
    g_out, g_last = torch.randn_like(out), torch.randn_like(last)
    got = torch.autograd.grad([out, last], leaves, [g_out, g_last])
    want_out, want_last, _ = per_step_scan(**x, **extra, delta_softplus=True)
    want = torch.autograd.grad([want_out, want_last], leaves, [g_out, g_last])
    for name, a, b in zip(list(x) + list(extra), got, want):
        assert relative_error(a, b) < 1e-9, name


def test_last_state_only_gradient():
    x = {k: v.requires_grad_() for k, v in _inputs(Bt=1, Dm=3, L=5, N=2).items()}
    _, last = vk.selective_scan(**x, return_last_state=True)
    last.sum().backward()
    assert x["u"].grad.abs().sum() > 0 and x["C"].grad.abs().sum() == 0
