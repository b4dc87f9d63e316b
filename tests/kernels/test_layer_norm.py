"""The row LayerNorm op: the fused Triton kernels (on CPU under TRITON_INTERPRET=1, in a child process as
tests/kernels/test_triton.py does) and the PyTorch form against a per-row fp64 oracle written from the definition.

Fresh random inputs (shifted and scaled, so that the mean matters); the output and every gradient compared by
norm-relative error (fp32 1e-3, bf16/fp16 5e-2); NaN never passes."""
import json

import pytest
import torch

from vmamba_kernels import layer_norm, layer_norm_ref


def row_oracle(x, weight, bias, eps):
    """Each row r of x (..., N): (x_r - mean_r) / sqrt(mean_r((x_r - mean_r)²) + eps), times weight[g], plus
    bias[g], where g is the row's group (the (..., G, N) axis G) for (G, N) parameters; fp64, one row at a time."""
    x = x.double()
    N = x.shape[-1]
    rows = x.reshape(-1, N)
    out = torch.empty_like(rows)
    G = weight.shape[0] if weight is not None and weight.dim() == 2 else 1
    for r in range(rows.shape[0]):
        mean = rows[r].sum() / N
        var = ((rows[r] - mean) ** 2).sum() / N
        y = (rows[r] - mean) / torch.sqrt(var + eps)
        if weight is not None:
            y = y * weight.double().reshape(G, N)[r % G]
        if bias is not None:
            y = y + bias.double().reshape(G, N)[r % G]
        out[r] = y
    return out.view(x.shape)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = [  # (x shape, parameter shape or None, affine: "both" | "weight" | "none")
    ((3, 5, 16), (16,), "both"),  # GroupMamba-T's narrowest channels
    ((2, 3, 24), (24,), "weight"),  # N not a power of two; no bias
    ((2, 3, 4, 6), (4, 6), "both"),  # one affine per group, as GroupMamba's scan-output norm
    ((1, 7, 2, 20), (2, 20), "both"),  # groups, rows not a multiple of the tile
    ((4, 384), (384,), "both"),  # a wide row, fewer rows per program
    ((5, 12), None, "none"),  # no affine
    ((1, 1, 16), (16,), "both"),  # one row (strided: features 2 apart in a row that reshapes without a copy)
]


def _check(case, backend, dtype, strided):
    shape, pshape, affine = case
    g = torch.Generator().manual_seed(hash((case, str(dtype), strided)) % 2 ** 31)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    if strided:  # every other element of a wider tensor: features 2 apart, which the op copies together
        x = torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    weight = torch.randn(pshape, generator=g) if pshape else None
    bias = torch.randn(pshape, generator=g) if pshape and affine == "both" else None
    leaves = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    out = layer_norm(x, weight, bias, 1e-5, backend=backend)
    dout = torch.randn(out.shape, generator=g).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout)

    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(refs)
    xr, wr, br = next(it), (next(it) if weight is not None else None), (next(it) if bias is not None else None)
    ref = row_oracle(xr, wr, br, 1e-5)
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    records = []
    for name, got, want in [("out", out, ref)] + list(zip(("dx", "dweight", "dbias"), grads, ref_grads)):
        records.append(dict(case=str(case), what=name, dtype=str(dtype), rel_err=_rel(got.detach(), want),
                            finite=bool(torch.isfinite(got).all()), tol=tol))
    records.append(dict(what="dtypes", ok=out.dtype == (torch.promote_types(dtype, weight.dtype)
                                                         if weight is not None and weight.dim() == 2 else dtype)
                        and all(gr.dtype == leaf.dtype for gr, leaf in zip(grads, leaves))))
    return records


VARIANTS = ((torch.float32, False), (torch.bfloat16, True), (torch.float16, False))  # (dtype, strided)


def _all_checks(backend):
    return [record for case in CASES for variant in VARIANTS for record in _check(case, backend, *variant)]


@pytest.mark.parametrize("form", ["reference", "triton"])
def test_pytorch_form_and_fused_kernels_match_the_row_oracle(form):
    from .interpreted import assert_within_tolerance, records_of_form  # (the child runs this file as a script)
    records = records_of_form(form, __file__, _all_checks)
    assert_within_tolerance(records, 3 * 2 * len(CASES))
    assert form == "reference" or any(r["what"] == "opcheck" for r in records)


def test_reference_form_is_nn_layer_norm():
    """Off CUDA the op is F.layer_norm itself: bitwise the same results as before it existed."""
    x, w, b = torch.randn(3, 7, 32), torch.randn(32), torch.randn(32)
    assert torch.equal(layer_norm(x, w, b, 1e-6), torch.nn.functional.layer_norm(x, (32,), w, b, 1e-6))
    assert torch.equal(layer_norm_ref(x, None, None), torch.nn.functional.layer_norm(x, (32,)))


def test_bad_inputs_name_the_expected_and_actual_shapes():
    x = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"weight must be \(N,\) = \(6,\), or \(G, N\) = \(4, 6\).*got \(5,\)"):
        layer_norm(x, torch.randn(5))
    with pytest.raises(ValueError, match=r"bias must be .*got \(3, 6\)"):
        layer_norm(x, torch.randn(4, 6), torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"one shape, got \(6,\) and \(4, 6\)"):
        layer_norm(x, torch.randn(6), torch.randn(4, 6))
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm(x, torch.randn(6), backend="cuda")


def test_export_keeps_the_standard_operator_form(monkeypatch):
    """Where the fused kernels would run (stood in for by a backend choice that answers "triton"), an exported
    program holds the standard layer_norm, never the custom op that exporters cannot translate."""
    import vmamba_kernels.ops as ops

    monkeypatch.setattr(ops, "resolve_backend", lambda backend, device: "triton")

    class Norm(torch.nn.Module):
        def forward(self, x, weight, bias):
            return layer_norm(x, weight, bias)

    args = (torch.randn(2, 3, 4, 8), torch.randn(4, 8), torch.randn(4, 8))
    program = torch.export.export(Norm(), args)
    targets = {str(node.target) for node in program.graph_module.graph.nodes if node.op == "call_function"}
    assert not any("vmamba" in t for t in targets), targets
    assert any("layer_norm" in t for t in targets), targets
    assert _rel(program.module()(*args), row_oracle(*args, 1e-5)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a CUDA device")
def test_fused_kernels_on_cuda_match_the_oracle_and_autocast():
    """On the device: GroupMamba-like grouped rows and a plain LayerNorm under bf16 autocast (fp32 out, as
    nn.LayerNorm gives there), output and every gradient against the oracle."""
    g = torch.Generator().manual_seed(3)
    for shape, pshape in (((8, 14, 14, 4, 16), (4, 16)), ((8, 196, 96), (96,)), ((3, 50, 768), (768,))):
        x = (torch.randn(shape, generator=g) * 2 + 1).cuda().bfloat16().requires_grad_(True)
        w, b = (torch.randn(pshape, generator=g).cuda().requires_grad_(True) for _ in range(2))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer_norm(x, w, b)
            want_dtype = torch.nn.LayerNorm(shape[-1]).cuda()(x).dtype
        assert out.dtype == want_dtype == torch.float32
        dout = torch.randn(out.shape, generator=g).cuda()
        grads = torch.autograd.grad(out, (x, w, b), dout)
        refs = [t.detach().cpu().double().requires_grad_(True) for t in (x, w, b)]
        ref = row_oracle(*refs, 1e-5)
        ref_grads = torch.autograd.grad(ref, refs, dout.cpu().double())
        assert _rel(out.cpu(), ref) < 1e-3
        for got, want, tol in zip(grads, ref_grads, (5e-2, 1e-3, 1e-3)):
            assert torch.isfinite(got).all() and _rel(got.cpu(), want) < tol
        # a bf16 result is the fp32 one rounded once, as a cast of it (what read_by_gemm relies on)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            low = layer_norm(x, w, b, out_dtype=torch.bfloat16)
        assert low.dtype == torch.bfloat16 and torch.equal(low, out.detach().bfloat16())


if __name__ == "__main__":
    for record in _all_checks("triton"):
        print(json.dumps(record), flush=True)
    x = torch.randn(3, 4, 8, requires_grad=True)
    w, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.vmamba.layer_norm_fwd, (x, w, b, 1e-5, torch.float32))
    print(json.dumps(dict(what="opcheck", ok=True)), flush=True)
