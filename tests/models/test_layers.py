"""Shared layers of vmamba_zoo.layers against plain formulations."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vmamba_kernels import scan_directions, scan_routes
from vmamba_zoo.layers import (RouteScanParams, at_least_fp32, device_routes, init_A_log_and_D_, init_dt_projection_,
                               per_route_linear)
from vmamba_zoo.layers.norm import LowPrecisionLayerNorm
from vmamba_zoo.layers.route_scan import route_projections


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_per_route_linear_matches_einsum_with_gradients(dtype, tol):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(4, 7, 6, generator=g, dtype=dtype).requires_grad_()
    dout = torch.randn(2, 3, 5, 4, 7, generator=g, dtype=dtype)

    out = per_route_linear(x, weight)
    want = torch.einsum('...ki,koi->...ko', x, weight)
    grads = torch.autograd.grad(out, (x, weight), dout)
    want_grads = torch.autograd.grad(want, (x, weight), dout)
    for a, b in zip((out, *grads), (want, *want_grads)):
        assert a.shape == b.shape and not torch.isnan(a).any()
        assert (a - b).norm() <= tol * b.norm()


def test_per_route_linear_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r'x \(\.\.\., K, I\) = \(2, 3, 6\) does not match weight'):
        per_route_linear(torch.zeros(2, 3, 6), torch.zeros(4, 7, 6))


def _plain_route_projections(x, x_proj_weight, dt_projs_weight):
    """Route k's x_proj, split into dt / B / C, then its dt_proj: one einsum per step, no layout tricks."""
    R = dt_projs_weight.shape[-1]
    x_dbl = torch.einsum('...c,kpc->...kp', x, x_proj_weight)
    N = (x_dbl.shape[-1] - R) // 2
    dts, B, C = x_dbl.split([R, N, N], dim=-1)
    return torch.einsum('...kr,kcr->...kc', dts, dt_projs_weight), B, C


@pytest.mark.parametrize('K, C, R, N', [(4, 12, 2, 1), (4, 10, 3, 16), (2, 6, 1, 3)])
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_route_projections_match_plain_per_route_projections(K, C, R, N, dtype, tol):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(2, 3, 5, C, generator=g, dtype=dtype).requires_grad_()
    x_proj_weight = torch.randn(K, R + 2 * N, C, generator=g, dtype=dtype).requires_grad_()
    dt_projs_weight = torch.randn(K, C, R, generator=g, dtype=dtype).requires_grad_()
    eye = torch.eye(K, dtype=dtype)
    got = route_projections(x, x_proj_weight, dt_projs_weight, eye)
    want = _plain_route_projections(x, x_proj_weight, dt_projs_weight)
    douts = [torch.randn(w.shape, generator=g, dtype=dtype) for w in want]
    leaves = (x, x_proj_weight, dt_projs_weight)
    got_grads = torch.autograd.grad(got, leaves, douts)
    want_grads = torch.autograd.grad(want, leaves, douts)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        assert a.shape == b.shape and a.dtype == b.dtype and not torch.isnan(a).any()
        assert (a - b).norm() <= tol * b.norm()


def test_route_scan_params_project_matches_scan_inputs(projection_form):
    """The grouped projections of RouteScanParams give what its per-route ``scan_inputs`` gives."""
    torch.manual_seed(0)
    params = RouteScanParams(num_routes=4, channels=16, d_state=1, dt_rank=2).double()
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    want = params.scan_inputs(F.linear(x, params.x_proj_weight.reshape(-1, 16)).unflatten(-1, (4, -1)))
    got = (*params.project(x), *params.scan_params())
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_route_projections_reject_mismatched_shapes():
    with pytest.raises(ValueError, match='do not match'):
        route_projections(torch.zeros(2, 5), torch.zeros(4, 4, 6), torch.zeros(4, 6, 2), torch.eye(4))


def test_low_precision_layer_norm_is_layer_norm():
    torch.manual_seed(0)
    ln = nn.LayerNorm(24)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    fast = LowPrecisionLayerNorm(24)
    fast.load_state_dict(ln.state_dict())
    x = torch.randn(2, 7, 24) * 3 + 1
    torch.testing.assert_close(fast(x), ln(x), rtol=0, atol=0)  # outside autocast: the same op
    with torch.autocast('cpu', dtype=torch.bfloat16):
        xb = x.bfloat16()
        got, want = fast(xb), ln(xb)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_scan_parameter_init_follows_mamba():
    """dt_proj weight in ±rank^-0.5, softplus(bias) log-uniform in [dt_min, dt_max], A = -(1..N), D = 1."""
    weight, bias = torch.empty(3, 64, 5), torch.empty(3, 64)
    init_dt_projection_(weight, bias, dt_min=0.01, dt_max=0.2)
    assert weight.abs().max() <= 5 ** -0.5 and weight.std() > 0.5 * 5 ** -0.5 / 3 ** 0.5
    dt = F.softplus(bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.2 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # spread over the decades, not one value
    A_log, D = torch.empty(6, 4), torch.empty(6)
    init_A_log_and_D_(A_log, D)
    assert torch.equal(-torch.exp(A_log), -torch.arange(1., 5.).expand(6, 4)) and torch.equal(D, torch.ones(6))


def test_scan_parameter_init_draws_one_fixed_sequence():
    """The weight, then dt: a seeded init is the same wherever a family calls it."""
    torch.manual_seed(3)
    weight, bias = torch.empty(2, 8, 4), torch.empty(2, 8)
    init_dt_projection_(weight, bias)
    torch.manual_seed(3)
    want_weight = torch.empty(2, 8, 4).uniform_(-0.5, 0.5)
    want_dt = torch.exp(torch.rand(2, 8) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
    assert torch.equal(weight, want_weight)
    torch.testing.assert_close(F.softplus(bias), want_dt, rtol=1e-5, atol=0)


@pytest.mark.parametrize('dtype, want', [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                         (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_at_least_fp32(dtype, want):
    t = torch.randn(3).to(dtype)
    assert at_least_fp32(t).dtype == want and torch.equal(at_least_fp32(t), t.to(want))


def test_device_routes_tables():
    routes = device_routes('continuous', 3, 4, torch.device('cpu'))
    assert routes is device_routes('continuous', 3, 4, torch.device('cpu'))  # cached
    assert torch.equal(routes, scan_routes('continuous', 3, 4))
    assert torch.equal(device_routes('continuous', 3, 4, torch.device('cpu'), table='directions'),
                       scan_directions('continuous', 3, 4))
    assert torch.equal(device_routes('continuous', 3, 4, torch.device('cpu'), table='raster_params'),
                       torch.arange(12).expand(4, 12))
    with pytest.raises(ValueError, match="table must be one of"):
        device_routes('cross', 3, 4, torch.device('cpu'), table='params')


@pytest.mark.parametrize('H,W', [(4, 6), (5, 3), (1, 1)])
def test_device_routes_owned_entries_of_atrous_routes(H, W):
    """Atrous route k = (h parity) + 2·(w parity) visits pixel (h, w): its entry is p·K + k."""
    owned = device_routes('atrous', H, W, torch.device('cpu'), table='owned_entries', step=2)
    h, w = torch.arange(H).view(H, 1), torch.arange(W).view(1, W)
    assert torch.equal(owned, ((h * W + w) * 4 + h % 2 + 2 * (w % 2)).flatten())


def test_layer_norm_module_is_nn_layer_norm_with_its_keys():
    """The zoo's LayerNorm loads nn.LayerNorm's state dict and computes the same (off CUDA: bitwise), with or
    without ``read_by_gemm``, which only changes the dtype under CUDA autocast; other norms pass through it."""
    from vmamba_zoo.layers.norm import LayerNorm, read_by_gemm
    torch.manual_seed(0)
    ln = nn.LayerNorm(24, eps=1e-6)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    ours = LayerNorm(24, eps=1e-6)
    ours.load_state_dict(ln.state_dict())
    x = torch.randn(2, 5, 24) * 2 + 1
    assert torch.equal(ours(x), ln(x))
    assert read_by_gemm(ours) is ours and ours.autocast_output
    assert torch.equal(ours(x), ln(x))
    plain = nn.LayerNorm(4)
    assert read_by_gemm(plain) is plain and not hasattr(plain, 'autocast_output')
    with pytest.raises(ValueError, match=r"LayerNorm\(24\) normalizes the last dim of \(\.\.\., 24\) inputs, got \(2, 5, 23\)"):
        ours(torch.randn(2, 5, 23))
