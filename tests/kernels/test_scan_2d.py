"""selective_scan_2d against a route-by-route gather → per-step scan → scatter oracle."""
import pytest
import torch

import vmamba_kernels as vk
from tests.kernels.oracle import gather_scan_scatter, wider_out_and_copy_forms


def _rel(a, b):
    assert torch.isfinite(a).all(), "NaN/inf in result"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(routes, H, W, Dm=3, N=2, Bt=2, per_route_x=False, with_D=True, with_bias=True, dtype=torch.float64):
    K = routes.shape[0]
    x = torch.randn(Bt, H, W, K, Dm, dtype=dtype) if per_route_x else torch.randn(Bt, H, W, Dm, dtype=dtype)
    return dict(
        x=x,
        delta=torch.randn(Bt, H, W, K, Dm, dtype=dtype) * 0.5,
        A=-torch.rand(K, Dm, N, dtype=dtype) - 0.1,
        B=torch.randn(Bt, H, W, K, N, dtype=dtype),
        C=torch.randn(Bt, H, W, K, N, dtype=dtype),
        D=torch.randn(K, Dm, dtype=dtype) if with_D else None,
        delta_bias=torch.randn(K, Dm, dtype=dtype) if with_bias else None,
    )


ROUTE_CASES = [
    ("raster", 3, 4, {}),
    ("cross", 3, 4, {}),
    ("continuous", 4, 3, {}),
    ("atrous", 5, 3, {}),       # odd sizes: routes of different lengths, -1 padded
    ("multihead", 4, 4, dict(patterns=("X", "S"))),
]


@pytest.mark.parametrize("merge", ["sum", "none"])
@pytest.mark.parametrize("per_route_x", [False, True], ids=["shared_x", "per_route_x"])
@pytest.mark.parametrize("name,H,W,options", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_matches_gather_scan_scatter(name, H, W, options, per_route_x, merge):
    routes = vk.scan_routes(name, H, W, **options)
    x = _inputs(routes, H, W, per_route_x=per_route_x)
    out = vk.selective_scan_2d(**x, delta_softplus=True, routes=routes, merge=merge)
    want = gather_scan_scatter(**x, routes=routes, param_routes=routes, merge=merge, delta_softplus=True)
    assert out.shape == want.shape and out.dtype == torch.float64
    assert _rel(out, want) < 1e-6


def test_param_routes_read_parameters_elsewhere():
    """PlainMamba's quirk: x follows the snake, delta/B/C are read in raster order."""
    routes = vk.scan_routes("continuous", 3, 5)
    raster = vk.scan_routes("raster", 3, 5).expand(4, -1).contiguous()
    x = _inputs(routes, 3, 5)
    out = vk.selective_scan_2d(**x, delta_softplus=True, routes=routes, param_routes=raster)
    want = gather_scan_scatter(**x, routes=routes, param_routes=raster, merge="sum", delta_softplus=True)
    assert _rel(out, want) < 1e-6
    assert _rel(out, vk.selective_scan_2d(**x, delta_softplus=True, routes=routes)) > 1e-3  # the choice matters


def test_softplus_off_and_no_optional_inputs():
    routes = vk.scan_routes("cross", 3, 3)
    x = _inputs(routes, 3, 3, with_D=False, with_bias=False)
    x["delta"] = x["delta"].abs()
    out = vk.selective_scan_2d(**x, delta_softplus=False, routes=routes)
    want = gather_scan_scatter(**x, routes=routes, param_routes=routes, merge="sum", delta_softplus=False)
    assert _rel(out, want) < 1e-6


@pytest.mark.parametrize("merge", ["sum", "none"])
def test_gradients_match_autograd_through_the_oracle(merge):
    routes = vk.scan_routes("atrous", 3, 5)
    x = {k: v.requires_grad_() for k, v in _inputs(routes, 3, 5, per_route_x=True).items()}
    out = vk.selective_scan_2d(**x, delta_softplus=True, routes=routes, merge=merge)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, list(x.values()), grad)
    want_out = gather_scan_scatter(**x, routes=routes, param_routes=routes, merge=merge, delta_softplus=True)
    want = torch.autograd.grad(want_out, list(x.values()), grad)
    for name, a, b in zip(x, got, want):
        assert _rel(a, b) < 1e-9, name


def test_gradcheck_shared_x_with_param_routes():
    routes = vk.scan_routes("continuous", 2, 3)
    raster = vk.scan_routes("raster", 2, 3).expand(4, -1).contiguous()
    x = {k: v.requires_grad_() for k, v in _inputs(routes, 2, 3, Dm=2, Bt=1).items()}
    f = lambda *a: vk.selective_scan_2d(*a, delta_softplus=True, routes=routes, param_routes=raster)
    assert torch.autograd.gradcheck(f, tuple(x.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    routes = vk.scan_routes("cross", 4, 4)
    x = _inputs(routes, 4, 4, dtype=dtype)
    out = vk.selective_scan_2d(**x, delta_softplus=True, routes=routes)
    want = gather_scan_scatter(**x, routes=routes, param_routes=routes, merge="sum", delta_softplus=True)
    assert out.dtype == dtype
    assert _rel(out, want) < (1e-5 if dtype == torch.float32 else 1e-2)



GRAD_NAMES = ("x", "delta", "A", "B", "C", "D", "delta_bias")


@pytest.mark.parametrize("route_set", ["cross", "atrous"])  # every route at every pixel; padded routes
@pytest.mark.parametrize("N", [1, 2], ids=["d_state1", "d_state2"])
@pytest.mark.parametrize("merge", ["sum", "none"])
@pytest.mark.parametrize("per_route_x", [False, True], ids=["shared_x", "per_route_x"])
@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.float32, torch.float64)],
                         ids=["bf16_x_fp32_out", "fp16_x_fp32_out", "fp32_x_fp64_out"])
def test_wider_out_dtype_is_the_scan_of_a_widened_copy_of_x(x_dtype, out_dtype, per_route_x, merge, N, route_set):
    """GroupMamba's call: a bf16 x (dt, B, C in bf16 too, A, D and the bias in fp32) with an fp32 output gives,
    bit for bit, the output and every gradient of the scan of an fp32 copy of x, whose gradient the copy's
    backward rounds to bf16; an fp64 output computes in fp64, as an fp64 copy would."""
    routes = vk.scan_routes(route_set, 3, 5)
    inputs = _inputs(routes, 3, 5, N=N, per_route_x=per_route_x, dtype=torch.float32)
    low = {name: inputs[name].to(x_dtype) for name in ("x", "delta", "B", "C")}
    others = [low.get(name, inputs[name]) for name in GRAD_NAMES[1:]]
    (out, grads), (copy_out, copy_grads) = wider_out_and_copy_forms(low["x"], others, routes, merge, out_dtype)
    assert out.dtype == out_dtype and grads[0].dtype == x_dtype
    assert torch.isfinite(out).all() and torch.equal(out, copy_out)
    for name, g, want in zip(GRAD_NAMES, grads, copy_grads):
        assert g.dtype == want.dtype and torch.equal(g, want), name
    narrow = vk.selective_scan_2d(low["x"], *others, delta_softplus=True, routes=routes, merge=merge)
    assert narrow.dtype == x_dtype  # out_dtype None keeps x's dtype
