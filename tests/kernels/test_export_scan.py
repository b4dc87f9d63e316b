"""The reference scans against the per-step oracle: the chunked scan (the export path and the path that autograd
records) and the blocked eager scan (the CPU inference path where the compiled scan is off), in each of its
plans: outputs, last states, every state and every gradient, across chunk boundaries, time blocks and eager
blocks."""
from collections import Counter

import pytest
import torch

import vmamba_kernels as vk
from vmamba_kernels import reference
from tests.kernels.oracle import atrous_2d_problem, gather_scan_scatter, per_step_scan, relative_error


def _inputs(Bt, Dm, L, N, groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (Bt, N, L) if groups is None else (Bt, groups, N, L)
    return dict(
        u=torch.randn(Bt, Dm, L, generator=g, dtype=dtype),
        delta=torch.randn(Bt, Dm, L, generator=g, dtype=dtype),
        A=-torch.rand(Dm, N, generator=g, dtype=dtype) * 2 - 0.05,
        B=torch.randn(*shape_bc, generator=g, dtype=dtype),
        C=torch.randn(*shape_bc, generator=g, dtype=dtype),
        D=torch.randn(Dm, generator=g, dtype=dtype),
        z=torch.randn(Bt, Dm, L, generator=g, dtype=dtype),
        delta_bias=torch.randn(Dm, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("L", [1, 15, 16, 17, 70, 301])
def test_linear_scan_matches_a_loop(L):
    g = torch.Generator().manual_seed(L)
    log_decay = -torch.rand(L, 3, 5, generator=g, dtype=torch.float64) * 3
    drive = torch.randn(L, 3, 5, generator=g, dtype=torch.float64)
    h, want = torch.zeros(3, 5, dtype=torch.float64), []
    for t in range(L):
        h = log_decay[t].exp() * h + drive[t]
        want.append(h)
    assert relative_error(reference.linear_scan(log_decay, drive), torch.stack(want)) < 1e-12


def test_linear_scan_survives_vanishing_decays():
    # decays that underflow to 0 reset the state; nothing turns into inf or NaN
    log_decay = torch.full((100, 4), -200.0)
    log_decay[::3] = -1e-3
    drive = torch.randn(100, 4)
    h, want = torch.zeros(4), []
    for t in range(100):
        h = log_decay[t].exp() * h + drive[t]
        want.append(h)
    assert relative_error(reference.linear_scan(log_decay, drive), torch.stack(want)) < 1e-6


class _LinearScan(torch.nn.Module):
    def forward(self, log_decay, drive):
        return reference.linear_scan(log_decay, drive)


def _loop_scan(log_decay, drive):
    h, out = torch.zeros_like(drive[0]), []
    for t in range(drive.shape[0]):
        h = log_decay[t].exp() * h + drive[t]
        out.append(h)
    return torch.stack(out)


def test_exported_chunk_level_scan_matches_a_loop_across_groups_of_chunks():
    """An exported scan's chunk count is symbolic: its chunk-level scan advances groups of SCAN_CHUNK chunks
    together and then scans the groups. One program, traced at one length, at lengths whose chunks fill part of
    one group, exactly one, and several (with a partial last one)."""
    g = torch.Generator().manual_seed(0)
    example = (-torch.rand(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g,
                                                                               dtype=torch.float64))
    L = torch.export.Dim.DYNAMIC  # as tools/export.py asks
    program = torch.export.export(_LinearScan(), example, dynamic_shapes=({0: L}, {0: L}))
    assert all(r.upper > 10 ** 6 for r in program.range_constraints.values()), program.range_constraints
    program = program.module()
    chunk = reference.SCAN_CHUNK
    for steps in (3, chunk * chunk, chunk * chunk + 1, 5 * chunk * chunk + 37):
        log_decay = -torch.rand(steps, 3, generator=g, dtype=torch.float64) * 0.2
        drive = torch.randn(steps, 3, generator=g, dtype=torch.float64)
        assert relative_error(program(log_decay, drive), _loop_scan(log_decay, drive)) < 1e-12, steps


def test_grouped_chunk_scan_covers_max_traced_chunks_and_no_more_than_it_needs(monkeypatch):
    """The groups' fixed doublings give each group's end from MAX_TRACED_CHUNKS chunks: with a bound of 64
    chunks (4 groups of 16), 64 chunks come out right; a chunk in the sixth group, whose start would need five
    groups, does not (so the doubling count is the one the bound needs, and eager scans refuse more chunks)."""
    monkeypatch.setattr(reference, "MAX_TRACED_CHUNKS", 64)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 81, generator=g, dtype=torch.float64) * 0.1 + 0.9
    b = torch.randn(2, 81, generator=g, dtype=torch.float64)
    want = _loop_scan(a.log().t(), b.t()).t()
    assert relative_error(reference._grouped_chunk_scan(a[:, :64], b[:, :64], dim=1), want[:, :64]) < 1e-12
    assert relative_error(reference._grouped_chunk_scan(a, b, dim=1)[:, 80], want[:, 80]) > 1e-6


class _Softplus(torch.nn.Module):
    def forward(self, x):
        return reference._softplus(x)


def test_exported_softplus_is_within_6e_8_of_torchs():
    x = torch.cat([torch.linspace(-120, 120, 100001), torch.randn(10000) * 4])
    program = torch.export.export(_Softplus(), (x,)).module()
    want = torch.nn.functional.softplus(x.double())
    assert ((program(x).double() - want).abs() <= 6e-8 + 2.4e-7 * want).all()


class _Scan(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D, delta_bias):
        return reference.selective_scan_ref(u, delta, A, B, C, D=D, delta_bias=delta_bias, delta_softplus=True)


SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def test_onnx_scan_reads_each_step_out_by_one_matmul_and_matches_the_oracle_at_other_lengths(tmp_path):
    """The exported scan as onnxruntime runs it: each chunk position read out by one batched MatMul and taken by
    one Gather (no sum over the states, no Slice or Split per position: onnxruntime runs a sum over an outer
    axis several times slower, and onnxscript's optimizer, which torch.onnx.export runs, matches nodes of several
    outputs in time quadratic in the graph's size), within 1e-5 of the per-step oracle at lengths of part of one
    chunk, several chunks, and several groups of chunks."""
    onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    x = _inputs(2, 6, 40, 4, 3, torch.float32, seed=11)
    L = torch.export.Dim.DYNAMIC
    path = str(tmp_path / "scan.onnx")
    torch.onnx.export(_Scan().eval(), tuple(x[k] for k in SCAN_ARGS), path, dynamo=True,
                      dynamic_shapes=({2: L}, {2: L}, None, {3: L}, {3: L}, None, None))
    ops = Counter(node.op_type for node in onnx.load(path).graph.node)
    assert ops["MatMul"] == reference.SCAN_CHUNK, ops
    assert ops["ReduceSum"] <= 1 and ops["Split"] == 0 and ops["Slice"] < reference.SCAN_CHUNK, ops
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for steps in (5, 40, 2 * reference.SCAN_CHUNK ** 2 + 7):
        x = _inputs(2, 6, steps, 4, 3, torch.float32, seed=steps)
        got = session.run(None, dict(zip(names, (x[k].numpy() for k in SCAN_ARGS))))[0]
        want, _, _ = per_step_scan(**{k: x[k] for k in SCAN_ARGS}, delta_softplus=True)
        assert relative_error(torch.from_numpy(got), want) < 1e-5, steps


# eager blocks (Dm = 4 channels of N = 3 states): whole rows, two channels (a whole group of two),
# one channel (inside a group)
BLOCK_CHANNELS = {"rows": 4, "groups": 2, "channels": 1}


@pytest.mark.parametrize("block", sorted(BLOCK_CHANNELS))
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("L", [7, 33, 130])
def test_outputs_and_every_gradient_match_the_oracle_fp32(L, groups, block, monkeypatch):
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", BLOCK_CHANNELS[block] * 3 * L)
    x = {k: v.requires_grad_() for k, v in _inputs(5, 4, L, 3, groups, torch.float32, seed=L).items()}
    out, last = vk.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="reference")
    want, want_last, _ = per_step_scan(**x, delta_softplus=True)
    assert relative_error(out, want) < 1e-4 and relative_error(last, want_last) < 1e-4
    g = torch.Generator().manual_seed(L + 1)
    dout, dlast = torch.randn(out.shape, generator=g), torch.randn(last.shape, generator=g)
    got = torch.autograd.grad((out * dout).sum() + (last * dlast).sum(), list(x.values()))
    ref = torch.autograd.grad((want * dout).sum() + (want_last * dlast).sum(), list(x.values()))
    for name, a, b in zip(x, got, ref):
        assert relative_error(a, b) < 1e-3, name


def test_states_and_their_gradients_match_the_oracle():
    x = _inputs(2, 6, 40, 4, 3, torch.float64, seed=3)
    args = {k: x[k].requires_grad_() for k in ("u", "delta", "A", "B", "delta_bias")}
    states = vk.selective_scan_states(**args, delta_softplus=True, backend="reference")
    _, _, want = per_step_scan(**args, delta_softplus=True)
    assert relative_error(states, want) < 1e-10
    w = torch.randn(states.shape, dtype=torch.float64)
    got = torch.autograd.grad((states * w).sum(), list(args.values()))
    ref = torch.autograd.grad((want * w).sum(), list(args.values()))
    for name, a, b in zip(args, got, ref):
        assert relative_error(a, b) < 1e-10, name


def test_eager_blocks_bound_the_working_set(monkeypatch):
    x = _inputs(6, 4, 50, 3, None, torch.float32, seed=0)
    whole = vk.selective_scan(**x, delta_softplus=True, backend="reference")
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 1)  # one batch row at a time
    assert relative_error(vk.selective_scan(**x, delta_softplus=True, backend="reference"), whole) < 1e-6


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_long_sequences_and_large_decays_match_the_oracle(scale):
    # 600 steps cross many chunks and several chunk-level doublings; with |A * dt| in the hundreds every
    # decay and chunk product underflows, where forms that divide by cumulative decays overflow
    x = _inputs(2, 4, 600, 3, 2, torch.float32, seed=int(scale))
    x["A"] = (x["A"] * scale).detach()
    x = {k: v.requires_grad_() for k, v in x.items()}
    out, last = vk.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="reference")
    want, want_last, _ = per_step_scan(**x, delta_softplus=True)
    assert relative_error(out, want) < 1e-4 and relative_error(last, want_last) < 1e-4
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * dout).sum(), list(x.values()))
    ref = torch.autograd.grad((want * dout).sum(), list(x.values()))
    for name, a, b in zip(x, got, ref):
        assert relative_error(a, b) < 1e-3, name


def test_autograd_through_the_reference_when_only_C_needs_gradients():
    # the eager scan updates its buffers in place; a readout that autograd records must still see each state
    x = _inputs(2, 4, 40, 3, None, torch.float32, seed=5)
    C = x.pop("C").requires_grad_()
    out = reference.selective_scan_ref(**x, C=C, delta_softplus=True)
    want = per_step_scan(**x, C=C, delta_softplus=True)[0]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    got, ref = (torch.autograd.grad((t * w).sum(), C)[0] for t in (out, want))
    assert relative_error(got, ref) < 1e-5


def test_fast_softplus_matches_torch_within_a_few_ulps():
    x = torch.cat([torch.linspace(-80, 120, 100001), torch.randn(10000) * 4])  # no fp32 underflow
    want = torch.nn.functional.softplus(x.double())
    got = reference._softplus(x)
    assert ((got.double() - want).abs() / want).max() < 4e-7  # fp32 ulp is 1.2e-7 relative
    assert torch.equal(got[x > 20], x[x > 20])  # softplus's threshold: the identity above 20


@pytest.mark.parametrize("groups", [None, 2])
def test_B_and_C_broadcast_over_rows_and_steps_match_the_oracle(groups):
    # stride-0 B and C (one value for every row and step, as ViM2's channel scan passes them) stay broadcast
    x = _inputs(5, 4, 37, 3, groups, torch.float32, seed=7)
    for name in ("B", "C"):
        one = x[name][:1, ..., :1]
        x[name] = one.expand(x[name].shape)
    out, last = reference.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    want, want_last, _ = per_step_scan(**x, delta_softplus=True)
    assert x["B"].stride(0) == 0 and relative_error(out, want) < 1e-5 and relative_error(last, want_last) < 1e-5


class _Scan2d(torch.nn.Module):
    """GroupMamba's scan call; ``copy``: on an fp32 copy of x instead of x with an fp32 out_dtype."""

    def __init__(self, routes, copy):
        super().__init__()
        self.register_buffer("routes", routes, persistent=False)
        self.copy = copy

    def forward(self, x, delta, A, B, C, D, delta_bias):
        if self.copy:
            x, out_dtype = x.float(), None
        else:
            out_dtype = torch.float32
        return vk.selective_scan_2d(x, delta, A, B, C, D, delta_bias, True, routes=self.routes, merge="none",
                                    out_dtype=out_dtype)


def test_exported_2d_scan_with_a_wider_out_dtype_is_the_scan_of_a_widened_copy():
    """The export path (standard operators) honours out_dtype: a bf16 x with an fp32 output exports, and its
    program gives, bit for bit, what the exported scan of an fp32 copy gives."""
    Bt, H, W, K, Dm = 2, 3, 4, 4, 3
    low = lambda *shape: torch.randn(*shape).bfloat16()
    args = (low(Bt, H, W, K, Dm), low(Bt, H, W, K, Dm) * 0.5, -torch.rand(K, Dm, 1) - 0.1, low(Bt, H, W, K, 1),
            low(Bt, H, W, K, 1), torch.randn(K, Dm), torch.randn(K, Dm))
    routes = vk.scan_routes("cross", H, W)
    outs = [torch.export.export(_Scan2d(routes, copy), args).module()(*args) for copy in (False, True)]
    assert outs[0].dtype == torch.float32 and torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


# The blocked eager scan's plans: each step one multiply-add, or sub-chunks that advance together; states
# N-major (readout summed over N) or not (readout by batched products)
PLANS = {
    "steps-n-major": dict(SEQUENTIAL_STEP=1, BMM_CHANNELS=1 << 30),
    "steps-bmm": dict(SEQUENTIAL_STEP=1, BMM_CHANNELS=1),
    "sub-chunks-n-major": dict(SEQUENTIAL_STEP=1 << 30, BMM_CHANNELS=1 << 30),
    "sub-chunks-bmm": dict(SEQUENTIAL_STEP=1 << 30, BMM_CHANNELS=1),
}


def _plan(monkeypatch, plan, blocks):
    monkeypatch.setenv("VMAMBA_CPU_SCAN", "0")  # the PyTorch form (the compiled scan: tests/kernels/test_cpu_scan.py)
    for name, value in PLANS[plan].items():
        monkeypatch.setattr(reference, name, value)
    if blocks == "many":  # time blocks of 15 or 16 steps (three sub-chunks), a group of one or two rows at a time
        monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 4 * 16 * 3 * 4)
        monkeypatch.setattr(reference, "SUB_CHUNK_STATES", 3 * 12)


@pytest.mark.parametrize("broadcast", [False, True], ids=["B_C", "broadcast_B_C"])
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_eager_scan_plans_match_the_oracle(plan, groups, blocks, broadcast, monkeypatch):
    _plan(monkeypatch, plan, blocks)
    x = _inputs(3, 4, 47, 3, groups, torch.float32, seed=11)  # 47 steps: a partial block, padded sub-chunks
    if broadcast:  # one value for every row and step, as ViM2's channel scan passes them
        x["B"], x["C"] = (x[k][:1, ..., :1].expand(x[k].shape) for k in ("B", "C"))
    with torch.no_grad():
        out, last = vk.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="reference")
    want, want_last, _ = per_step_scan(**x, delta_softplus=True)
    assert relative_error(out, want) < 1e-5 and relative_error(last, want_last) < 1e-5


@pytest.mark.parametrize("merge", ["sum", "none"])
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_eager_2d_scan_plans_match_the_oracle(plan, blocks, merge, monkeypatch):
    _plan(monkeypatch, plan, blocks)
    x = atrous_2d_problem(Dm=4)
    with torch.no_grad():
        out = vk.selective_scan_2d(**x, delta_softplus=True, merge=merge, backend="reference")
    want = gather_scan_scatter(**x, param_routes=x["routes"], merge=merge, delta_softplus=True)
    assert relative_error(out, want) < 1e-5


def test_eager_scans_after_scans_in_inference_mode():
    # work buffers made in inference mode are inference tensors, which may not be updated in place outside it:
    # the scans there must not reuse them
    x = _inputs(2, 4, 40, 3, None, torch.float32, seed=4)
    states = {k: x[k] for k in ("u", "delta", "A", "B", "delta_bias")}
    with torch.inference_mode():
        first = vk.selective_scan(**x, delta_softplus=True, backend="reference")
        first_states = vk.selective_scan_states(**states, delta_softplus=True, backend="reference")
    with torch.no_grad():
        assert torch.equal(vk.selective_scan(**x, delta_softplus=True, backend="reference"), first)
        assert torch.equal(vk.selective_scan_states(**states, delta_softplus=True, backend="reference"), first_states)


@pytest.mark.parametrize("Bt,L", [(0, 10), (2, 0)], ids=["no_rows", "no_steps"])
def test_eager_scans_of_nothing(Bt, L):
    # an empty batch or sequence: empty outputs, and the last state of no step is h_{-1} = 0
    x = _inputs(Bt, 4, L, 3, 2, torch.float32, seed=1)
    routes = vk.scan_routes("cross", 3, 4)
    with torch.no_grad():
        out, last = vk.selective_scan(**x, delta_softplus=True, return_last_state=True, backend="reference")
        out_2d = vk.selective_scan_2d(torch.randn(Bt, 3, 4, 5), torch.randn(Bt, 3, 4, 4, 5), -torch.rand(4, 5, 3),
                                      torch.randn(Bt, 3, 4, 4, 3), torch.randn(Bt, 3, 4, 4, 3), routes=routes,
                                      backend="reference")
    assert out.shape == (Bt, 4, L) and last.shape == (Bt, 4, 3) and not last.any()
    assert out_2d.shape == (Bt, 3, 4, 5)


@pytest.mark.parametrize("Bt, L", [(0, 5), (2, 0), (0, 0)])
def test_scans_that_autograd_records_of_nothing(Bt, L):
    """The functional scan (autograd records it) of an empty batch or sequence: empty outputs, zero last states."""
    x = {k: v.requires_grad_() for k, v in _inputs(Bt, 4, L, 3, None, torch.float32, seed=2).items()}
    out, last = reference.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    states = reference.selective_scan_states_ref(x["u"], x["delta"], x["A"], x["B"])
    assert out.shape == (Bt, 4, L) and states.shape == (Bt, 4, 3, L) and torch.equal(last, torch.zeros(Bt, 4, 3))
