"""Custom-op plumbing: opcheck, torch.compile, FLOP counting, backend choice, defaults and input checks."""
import inspect
import re

import pytest
import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode

import vmamba_kernels as vk


def _scan_args(Bt=2, Dm=4, L=5, N=3, dtype=torch.float32):
    return [torch.randn(Bt, Dm, L, dtype=dtype), torch.rand(Bt, Dm, L, dtype=dtype),
            -torch.rand(Dm, N, dtype=dtype), torch.randn(Bt, N, L, dtype=dtype), torch.randn(Bt, N, L, dtype=dtype)]


def _scan_2d_args(Bt=1, H=3, W=4, K=4, Dm=2, N=2):
    return dict(x=torch.randn(Bt, H, W, Dm), delta=torch.randn(Bt, H, W, K, Dm), A=-torch.rand(K, Dm, N),
                B=torch.randn(Bt, H, W, K, N), C=torch.randn(Bt, H, W, K, N),
                D=torch.randn(K, Dm), delta_bias=torch.randn(K, Dm))


def _non_contiguous(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck_selective_scan(contiguous):
    u, delta, A, B, C = [t if contiguous else _non_contiguous(t) for t in _scan_args()]
    D, z, bias = torch.randn(4), torch.randn(2, 4, 5), torch.randn(4)
    for t in (u, delta, A, B, C, D, z, bias):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.vmamba.selective_scan_fwd, (u, delta, A, B, C, D, z, bias, True, "reference"))
    torch.library.opcheck(torch.ops.vmamba.selective_scan_fwd, (u, delta, A, B, C, None, None, None, False, "reference"))


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck_states_and_2d(contiguous):
    u, delta, A, B, _ = [(t if contiguous else _non_contiguous(t)).requires_grad_() for t in _scan_args()]
    torch.library.opcheck(torch.ops.vmamba.selective_scan_states_fwd, (u, delta, A, B, None, True, "reference"))
    args = {k: (v if contiguous else _non_contiguous(v)).requires_grad_() for k, v in _scan_2d_args().items()}
    routes = vk.scan_routes("atrous", 3, 4)
    for merge, save_chunks in (("sum", True), ("none", False)):
        torch.library.opcheck(torch.ops.vmamba.selective_scan_2d_fwd,
                              (*args.values(), routes, routes, True, merge, "reference", save_chunks))
    low_x = args["x"].detach().bfloat16().requires_grad_()  # an output wider than x
    torch.library.opcheck(torch.ops.vmamba.selective_scan_2d_fwd,
                          (low_x, *list(args.values())[1:], routes, routes, True, "none", "reference", True,
                           torch.float32))


class TinyCrossMixer(nn.Module):
    """A minimal 2D mixer, as the backbones use the op."""

    def __init__(self, dim=4, state=2, K=4):
        super().__init__()
        self.K, self.state = K, state
        self.proj = nn.Linear(dim, K * (dim + 2 * state))
        self.A_log = nn.Parameter(torch.zeros(K, dim, state))
        self.D = nn.Parameter(torch.ones(K, dim))
        self.register_buffer("routes", vk.scan_routes("cross", 3, 4), persistent=False)

    def forward(self, x):  # (Bt, H, W, C)
        Bt, H, W, Cd = x.shape
        p = self.proj(x).view(Bt, H, W, self.K, Cd + 2 * self.state)
        delta, B, C = p.split([Cd, self.state, self.state], dim=-1)
        return vk.selective_scan_2d(x, delta, -torch.exp(self.A_log), B, C, self.D, delta_softplus=True,
                                    routes=self.routes)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    """Full-graph compilation through the custom ops; inductor also relies on the fake kernels' output strides
    matching the real ones."""
    torch.manual_seed(0)
    model = TinyCrossMixer()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    eager = model(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    out = torch.compile(model, fullgraph=True, backend=backend)(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)


def test_torch_compile_with_a_wider_out_dtype():
    """The fake kernel gives the compiled graph out's dtype: a bf16 x with an fp32 output, bitwise as eager."""
    args = _scan_2d_args(H=3, W=3)
    leaves = [args["x"].bfloat16()] + [args[k] for k in ("delta", "A", "B", "C", "D", "delta_bias")]
    routes = vk.scan_routes("cross", 3, 3)
    f = lambda *a: vk.selective_scan_2d(*a, delta_softplus=True, routes=routes, merge="none",
                                        out_dtype=torch.float32)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out.square().sum(), inputs))

    eager, compiled = run(f), run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    assert compiled[0].dtype == torch.float32 and compiled[1].dtype == torch.bfloat16
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_torch_compile_1d_and_states():
    u, delta, A, B, C = _scan_args()

    def f(u, delta, A, B, C):
        return vk.selective_scan(u, delta, A, B, C, delta_softplus=True) + \
            vk.selective_scan_states(u, delta, A, B, delta_softplus=True).sum(2)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(u, delta, A, B, C),
                               f(u, delta, A, B, C))


def test_flop_counter_counts_the_scan_formula():
    u, delta, A, B, C = _scan_args(Bt=2, Dm=4, L=5, N=3)
    with FlopCounterMode(display=False) as counter:
        vk.selective_scan(u, delta, A, B, C, D=torch.ones(4))
    assert counter.get_total_flops() == 9 * 2 * 5 * 4 * 3 + 2 * 4 * 5
    args = _scan_2d_args(Bt=1, H=3, W=4, K=4, Dm=2, N=2)
    with FlopCounterMode(display=False) as counter:
        vk.selective_scan_2d(**args, routes=vk.scan_routes("cross", 3, 4))
    assert counter.get_total_flops() == 9 * 1 * (4 * 12) * 2 * 2 + 1 * 2 * (4 * 12)
    with FlopCounterMode(display=False) as counter:
        vk.selective_scan_states(u, delta, A, B)
    assert counter.get_total_flops() == 9 * 2 * 5 * 4 * 3


def test_fvcore_handles_count_the_scan_formula():
    model = TinyCrossMixer().eval()
    x = torch.randn(2, 3, 4, 4)
    flops = FlopCountAnalysis(model, x).set_op_handle(**vk.fvcore_handles())
    flops.unsupported_ops_warnings(False)
    by_op = flops.by_operator()
    assert by_op["selective_scan_2d_fwd"] == 9 * 2 * (4 * 12) * 4 * 2 + 2 * 4 * (4 * 12)
    assert by_op["linear"] == 2 * 12 * 4 * (4 * (4 + 4))  # one multiply-add = 1


def test_backend_choice():
    assert vk.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert vk.resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.selective_scan(*_scan_args(), backend="cuda")


# ---------------------------------------------------------------------------------------------- bad input


def test_the_scan_ops_share_mamba_ssms_defaults():
    """An argument that two public ops both take has one default, mamba_ssm's (no softplus unless asked)."""
    ops = (vk.selective_scan, vk.selective_scan_states, vk.selective_scan_2d)
    params = [inspect.signature(op).parameters for op in ops]
    for a in range(len(ops)):
        for b in range(a + 1, len(ops)):
            for name in params[a].keys() & params[b].keys():
                assert params[a][name].default == params[b][name].default, (ops[a].__name__, ops[b].__name__, name)
    assert all(p["delta_softplus"].default is False for p in params)
    # and the default is what runs: a call without the flag is the call with delta_softplus=False
    args, routes = _scan_2d_args(), vk.scan_routes("cross", 3, 4)
    plain = vk.selective_scan_2d(**args, routes=routes)
    assert torch.equal(plain, vk.selective_scan_2d(**args, delta_softplus=False, routes=routes))
    assert not torch.equal(plain, vk.selective_scan_2d(**args, delta_softplus=True, routes=routes))


def test_bad_input_1d():
    u, delta, A, B, C = _scan_args(Bt=2, Dm=4, L=5, N=3)
    with pytest.raises(ValueError, match=r"u must have 3 dims, got shape \(4, 5\)"):
        vk.selective_scan(u[0], delta, A, B, C)
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 4, 5\), got \(2, 4, 6\)"):
        vk.selective_scan(u, torch.rand(2, 4, 6), A, B, C)
    with pytest.raises(ValueError, match=r"B must have shape \(2, 3, 5\), got \(2, 3, 4\)"):
        vk.selective_scan(u, delta, A, B[..., :4], C)  # L differs from u's
    with pytest.raises(ValueError, match=r"C must have shape \(2, 3, 5\), got \(2, 2, 5\)"):
        vk.selective_scan(u, delta, A, B, C[:, :2])  # N differs from A's
    with pytest.raises(ValueError, match=r"A must have shape \(4, \*\), got \(3, 3\)"):
        vk.selective_scan(u, delta, A[:3], B, C)
    with pytest.raises(ValueError, match="G=3 groups, which must divide Dm=4"):
        vk.selective_scan(u, delta, A, torch.randn(2, 3, 3, 5), torch.randn(2, 3, 3, 5))
    with pytest.raises(ValueError, match=r"D must have shape \(4\), got \(5,\)"):
        vk.selective_scan(u, delta, A, B, C, D=torch.ones(5))
    with pytest.raises(ValueError, match=r"z must have shape"):
        vk.selective_scan(u, delta, A, B, C, z=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"delta_bias must have shape"):
        vk.selective_scan(u, delta, A, B, C, delta_bias=torch.ones(3))
    with pytest.raises(TypeError, match="u must have a floating dtype"):
        vk.selective_scan(u.long(), delta, A, B, C)
    with pytest.raises(TypeError, match="B must be a torch.Tensor|B must be"):
        vk.selective_scan(u, delta, A, None, C)
    with pytest.raises(ValueError, match=r"must be on meta like the input, got cpu"):
        vk.selective_scan(u.to("meta"), delta.to("meta"), A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        vk.selective_scan_states(u, delta, A, B[0])


def test_bad_input_2d():
    args = _scan_2d_args()
    routes = vk.scan_routes("cross", 3, 4)
    with pytest.raises(ValueError, match="merge must be one of"):
        vk.selective_scan_2d(**args, routes=routes, merge="mean")
    with pytest.raises(ValueError, match=r"routes entries must be pixel indices in \[0, 12\) or -1 padding, got values in \[0, 12\]"):
        vk.selective_scan_2d(**args, routes=torch.cat([routes[:, :-1], torch.full((4, 1), 12)], 1))
    with pytest.raises(ValueError, match=r"routes must have shape \(K, Lr\) with K=4, got \(1, 12\)"):
        vk.selective_scan_2d(**args, routes=vk.scan_routes("raster", 3, 4))
    with pytest.raises(TypeError, match="routes must have dtype torch.int64, got torch.int32"):
        vk.selective_scan_2d(**args, routes=routes.int())
    with pytest.raises(ValueError, match="only be padded"):
        bad = routes.clone()
        bad[0, 3] = -1
        vk.selective_scan_2d(**args, routes=bad)
    with pytest.raises(ValueError, match="visit each pixel at most once"):
        twice = routes.clone()
        twice[1, 5] = twice[1, 4]
        vk.selective_scan_2d(**args, routes=twice)
    with pytest.raises(ValueError, match="param_routes must be padded"):
        pr = routes.clone()
        pr[0, -1] = -1
        vk.selective_scan_2d(**args, routes=routes, param_routes=pr)
    with pytest.raises(ValueError, match=r"param_routes must have the shape of routes"):
        vk.selective_scan_2d(**args, routes=routes, param_routes=routes[:, :6])
    with pytest.raises(ValueError, match=r"x must be \(Bt, H, W, Dm\) = \(1, 3, 4, 2\)"):
        vk.selective_scan_2d(**{**args, "x": torch.randn(1, 12, 2)}, routes=routes)
    with pytest.raises(ValueError, match=r"x must have shape \(1, 3, 4, 2\), got \(1, 3, 4, 3\)"):
        vk.selective_scan_2d(**{**args, "x": torch.randn(1, 3, 4, 3)}, routes=routes)
    with pytest.raises(ValueError, match=r"A must have shape \(4, 2, \*\), got \(2, 2, 2\)"):
        vk.selective_scan_2d(**{**args, "A": torch.randn(2, 2, 2)}, routes=routes)
    with pytest.raises(ValueError, match=r"B must have shape \(1, 3, 4, 4, 2\), got \(1, 3, 4, 4, 3\)"):
        vk.selective_scan_2d(**{**args, "B": torch.randn(1, 3, 4, 4, 3)}, routes=routes)
    with pytest.raises(ValueError, match=r"D must have shape \(4, 2\), got shape \(2,\)"):
        vk.selective_scan_2d(**{**args, "D": torch.randn(2)}, routes=routes)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                               (torch.float32, torch.int32), (torch.float32, "float32"),
                                               (torch.float32, [torch.float32])])
def test_bad_out_dtype_2d(x_dtype, out_dtype):
    """out_dtype must hold every value of x's dtype (bf16 and fp16 each hold values the other cannot)."""
    args = _scan_2d_args()
    args["x"] = args["x"].to(x_dtype)
    routes = vk.scan_routes("cross", 3, 4)
    vk.selective_scan_2d(**args, routes=routes)  # the same call without out_dtype passes (and is remembered)
    expected = rf"out_dtype must be None or a floating dtype at least as wide as x's \({x_dtype}\)"
    with pytest.raises(TypeError, match=expected + r".*got " + re.escape(repr(out_dtype))):
        vk.selective_scan_2d(**args, routes=routes, out_dtype=out_dtype)


def test_param_routes_padding_checked_once_per_version(monkeypatch):
    """The padding comparison reads device data (a host sync): once per pair of tensors, again after an
    in-place change, which must still be caught."""
    args = _scan_2d_args()
    routes = vk.scan_routes("continuous", 3, 4)
    param_routes = vk.scan_routes("cross", 3, 4)
    calls = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: calls.append(1) or real_equal(a, b))
    for _ in range(3):
        vk.selective_scan_2d(**args, routes=routes, param_routes=param_routes, backend="reference")
    assert len(calls) == 1
    param_routes[0, -1] = -1
    with pytest.raises(ValueError, match="param_routes must be padded"):
        vk.selective_scan_2d(**args, routes=routes, param_routes=param_routes, backend="reference")
