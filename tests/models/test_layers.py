"""Shared layers of vmamba_zoo.layers against plain formulations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vmamba_zoo.layers import RouteScanParams, per_route_linear
from vmamba_zoo.layers.route_scan import LowPrecisionLayerNorm, route_projections


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
