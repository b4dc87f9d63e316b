"""The dilated depthwise-conv sum: the fused Triton kernels (on CPU under TRITON_INTERPRET=1, in a child process
as tests/kernels/test_triton.py does) against a plain per-tap loop, and the PyTorch form against the same loop.

Fresh random inputs; outputs and both gradients compared by norm-relative error (fp32 1e-3 against an fp64
oracle, bf16 outputs 5e-2); NaN never passes."""
import json

import pytest
import torch

from vmamba_kernels import dilated_dwconv_sum


def loop_oracle(x, weight, dilations):
    """out[b, c, y, x] = Σ_i Σ_{a, e} w[i, c, a, e] · x[b, c, clamp(y + (a - r) d_i), clamp(x + (e - r) d_i)],
    one tap at a time with explicit clamped indices (fp64)."""
    x, weight = x.double(), weight.double()
    B, C, H, W = x.shape
    k = weight.shape[-1]
    r = k // 2
    ys, xs = torch.arange(H), torch.arange(W)
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for i, d in enumerate(dilations):
        for a in range(k):
            rows = (ys + (a - r) * d).clamp(0, H - 1)
            for e in range(k):
                cols = (xs + (e - r) * d).clamp(0, W - 1)
                out += weight[i, :, a, e].view(1, C, 1, 1) * x[:, :, rows][:, :, :, cols]
    return out


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = [  # (B, C, H, W, k, dilations)
    (2, 5, 9, 7, 3, (1, 3, 5)),  # Spatial-Mamba's kernel; more channels than one block below
    (1, 40, 6, 11, 3, (1, 3, 5)),  # channel blocks with a partial last one, maps smaller than the pad
    (2, 3, 1, 5, 3, (1, 2)),  # one row: every vertical tap clamps to it
    (1, 2, 4, 4, 5, (1,)),  # a 5x5 kernel
]


def _check(case, backend, out_dtype, channels_last, strided):
    B, C, H, W, k, dilations = case
    g = torch.Generator().manual_seed(hash((case, out_dtype, channels_last, strided)) % 2 ** 31)
    x = torch.randn(B, C, H, W, generator=g)
    if strided:  # a channels-last view, as the model hands over
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    weight = torch.randn(len(dilations), C, k, k, generator=g)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = dilated_dwconv_sum(x, weight, dilations, out_dtype=out_dtype, channels_last=channels_last,
                             backend=backend)
    dout = torch.randn(out.shape, generator=g).to(out_dtype)
    out.backward(dout)

    xr = x.detach().double().requires_grad_(True)
    wr = weight.detach().double().requires_grad_(True)
    ref = loop_oracle(xr, wr, dilations)
    ref.backward(dout.double())
    records = []
    for name, got, want, tol in (("out", out, ref, 5e-2 if out_dtype == torch.bfloat16 else 1e-3),
                                 ("dx", x.grad, xr.grad, 1e-3), ("dweight", weight.grad, wr.grad, 1e-3)):
        records.append(dict(case=list(case[:4]), what=name, out_dtype=str(out_dtype), channels_last=channels_last,
                            rel_err=_rel(got.detach(), want), finite=bool(torch.isfinite(got).all()), tol=tol))
    records.append(dict(what="layout", ok=out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format) and out.dtype == out_dtype))
    return records


VARIANTS = ((torch.float32, False, False), (torch.bfloat16, True, True))  # (out_dtype, channels_last, strided)


def _all_checks(backend):
    return [record for case in CASES for variant in VARIANTS for record in _check(case, backend, *variant)]


@pytest.mark.parametrize("form", ["reference", "triton"])
def test_pytorch_form_and_fused_kernels_match_the_loop(form):
    from .interpreted import assert_within_tolerance, records_of_form  # (the child runs this file as a script)
    assert_within_tolerance(records_of_form(form, __file__, _all_checks), 3 * len(VARIANTS) * len(CASES))


def test_bad_inputs_name_the_expected_and_actual_shapes():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"\(2, 4, k, k\).*got \(2, 3, 3, 3\)"):
        dilated_dwconv_sum(x, torch.randn(2, 3, 3, 3), (1, 3))
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\), got \(4, 5, 5\)"):
        dilated_dwconv_sum(x[0], torch.randn(2, 4, 3, 3), (1, 3))
    with pytest.raises(ValueError, match="dilations must be ints >= 1"):
        dilated_dwconv_sum(x, torch.randn(1, 4, 3, 3), (0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device")
def test_fused_kernels_on_cuda_match_the_loop():
    """On the device: Spatial-Mamba-like maps (odd size, bf16 out, channels-last)."""

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 70, 15, 13, generator=g).cuda().requires_grad_(True)
    weight = torch.randn(3, 70, 3, 3, generator=g).cuda().requires_grad_(True)
    out = dilated_dwconv_sum(x, weight, (1, 3, 5), out_dtype=torch.bfloat16, channels_last=True)
    dout = torch.randn(out.shape, generator=g).cuda().to(out.dtype)
    out.backward(dout)
    xr, wr = (t.detach().cpu().double().requires_grad_(True) for t in (x, weight))
    ref = loop_oracle(xr, wr, (1, 3, 5))
    ref.backward(dout.cpu().double())
    assert _rel(out.cpu(), ref) < 5e-2 and _rel(x.grad.cpu(), xr.grad) < 1e-3 and _rel(weight.grad.cpu(), wr.grad) < 1e-3


if __name__ == "__main__":
    for record in _all_checks("triton"):
        print(json.dumps(record), flush=True)


def test_export_keeps_the_standard_operator_form(monkeypatch):
    """Where the fused kernels run (CUDA, here stood in for by a backend choice that answers "triton"), an exported
    program still holds standard convolutions, never the custom op that exporters cannot translate; and its output
    is the loop's."""
    import vmamba_kernels.ops as ops

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")

    class Fusion(torch.nn.Module):
        def forward(self, x, weight):
            return dilated_dwconv_sum(x, weight, (1, 3, 5))

    x, weight = torch.randn(2, 4, 9, 7), torch.randn(3, 4, 3, 3)
    program = torch.export.export(Fusion(), (x, weight))
    targets = {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"}  # autocast regions are subgraphs
    assert not any("vmamba" in t for t in targets), targets
    assert any("conv" in t for t in targets), targets
    assert _rel(program.module()(x, weight), loop_oracle(x, weight, (1, 3, 5))) < 1e-5
