"""MambaMixer ViM2 family checks against oracles written here: the token mixer's cross scan as explicit flips and
transposes, the channel mixer as a step-by-step loop over each token's channels, its bidirectionality, the
weighted averaging of earlier features as the paper's double sum, and the variants against the paper's table A."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vmamba_zoo.models.mambamixer as mm
from vmamba_zoo.layers.norm import LayerNorm
from vmamba_zoo.layers.route_scan import fused_projections

from .test_efficientvmamba import LayerNormInFp32
from .test_vmamba import _naive_scan, _randomize


def _token_mixer_oracle(m: mm.SelectiveTokenMixer, x):
    """Channels-first, as VMamba's SS2D: routes = [rows, cols, rows reversed, cols reversed], each its own S6."""
    x, z = m.in_proj(x).chunk(2, dim=-1)
    x = m.act(m.conv2d(x.permute(0, 3, 1, 2)))
    Bt, Di, H, W = x.shape
    N, R = m.d_state, m.dt_rank
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    y = 0
    for k, seq in enumerate([rows, cols, rows.flip(-1), cols.flip(-1)]):
        dts, Bs, Cs = torch.split(torch.einsum('bdl,cd->bcl', seq, m.x_proj_weight[k]), [R, N, N], dim=1)
        delta = torch.einsum('brl,dr->bdl', dts, m.dt_projs_weight[k])
        yk = _naive_scan(seq, delta, -torch.exp(m.A_logs.view(4, Di, N)[k]), Bs[:, None], Cs[:, None],
                         m.Ds.view(4, Di)[k], m.dt_projs_bias[k])
        yk = yk.flip(-1) if k >= 2 else yk
        y = y + (yk.view(Bt, Di, H, W) if k % 2 == 0 else yk.view(Bt, Di, W, H).transpose(2, 3))
    y = m.out_norm(y.permute(0, 2, 3, 1)) * F.silu(z)
    return m.out_proj(y)


def test_token_mixer_matches_flip_transpose_oracle():
    m = mm.SelectiveTokenMixer(8, d_state=3, ssm_ratio=2.0)
    _randomize(m, 1)
    x = torch.randn(2, 4, 5, 8, requires_grad=True)
    out, ref = m(x), _token_mixer_oracle(m, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    wrt = [x, m.in_proj.weight, m.x_proj_weight, m.A_logs, m.dt_projs_bias, m.Ds]
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _channel_scan_oracle(m: mm.SelectiveChannelMixer, seq):
    """Each token's channel sequence, read forward and reversed, one channel step at a time."""
    T, L = seq.shape
    N, taps = m.d_state, m.conv1d.kernel_size[0]
    out = 0
    for k, s in enumerate([seq, seq.flip(-1)]):
        w, b = m.conv1d.weight[k, 0], m.conv1d.bias[k]
        xw = m.x_proj_weight[k, :, 0]  # (1 + 2N,): dt, B, C per unit of the step's value
        A = -torch.exp(m.A_logs[k])
        h = seq.new_zeros(T, N)
        ys = []
        for t in range(L):
            conv = b + sum(w[j] * s[:, t - (taps - 1) + j] for j in range(taps) if t - (taps - 1) + j >= 0)
            u = F.silu(conv)  # (T,)
            dt = F.softplus(u * xw[0] * m.dt_projs_weight[k, 0, 0] + m.dt_projs_bias[k, 0])
            B, C = u[:, None] * xw[1:1 + N], u[:, None] * xw[1 + N:]
            h = torch.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B
            ys.append((h * C).sum(-1) + m.Ds[k] * u)
        y = torch.stack(ys, dim=-1)
        out = out + (y if k == 0 else y.flip(-1))
    return out


def test_channel_mixer_matches_per_step_loop_over_channels():
    m = mm.SelectiveChannelMixer(6, width=11, d_state=4, d_conv=4)
    _randomize(m, 2)
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    out = m(x)
    seq, gate = m.in_proj(x).reshape(-1, 22).chunk(2, dim=-1)
    ref = m.out_proj(_channel_scan_oracle(m, seq) * F.silu(gate)).view(2, 3, 4, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    wrt = [x, m.in_proj.weight, m.conv1d.weight, m.x_proj_weight, m.dt_projs_weight, m.A_logs, m.Ds]
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channel_mixer_reads_both_directions():
    m = mm.SelectiveChannelMixer(4, width=9, d_state=3)
    _randomize(m, 3)
    seq = torch.randn(5, 9)
    # every output channel depends on channels before and after it (a one-way scan would see only one side)
    jac = torch.autograd.functional.jacobian(lambda s: m.scan(s)[0], seq)[:, 0]  # (L out, L in)
    later = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (jac[later] != 0).all() and (jac[later.T] != 0).all()
    # the two directions are mirror images: swapping their parameters and reversing the channels reverses the output
    mirrored = copy.deepcopy(m)
    with torch.no_grad():
        for name, p in mirrored.named_parameters():
            if not name.startswith(('in_proj', 'out_proj')):
                p.copy_(p.flip(0))
    torch.testing.assert_close(mirrored.scan(seq.flip(-1)), m.scan(seq).flip(-1), rtol=1e-5, atol=1e-6)


def _small_stage(depth=3, token_depth=2):
    return mm.MambaMixerStage(6, 8, depth, token_depth, channel_width=10, drop_path=[0.] * (depth * (token_depth + 1)),
                              downsample=True, d_state=2, channel_d_state=2)


def test_weighted_averaging_matches_the_papers_double_sum():
    stage = _small_stage()
    with torch.no_grad():
        for b in stage.blocks:
            for w in (b.alpha, b.beta, b.theta, b.gamma):
                w.copy_(torch.randn(w.shape))
    x = torch.randn(2, 6, 5, 6)
    out = stage(x)

    y0 = stage.downsample(x)
    y_tok, y_ch = [y0], [y0]  # y_tok^(0) = y_ch^(0) = the stage input
    for l, b in enumerate(stage.blocks, start=1):
        x_tok = sum(b.alpha[i] * y_tok[i] for i in range(l)) + sum(b.beta[i] * y_ch[i] for i in range(l))
        y_tok.append(b.token_mixer(x_tok))
        x_ch = sum(b.theta[i] * y_tok[i] for i in range(l + 1)) + sum(b.gamma[i] * y_ch[i] for i in range(l))
        y_ch.append(b.channel_mixer(x_ch))
    torch.testing.assert_close(out, y_ch[-1], rtol=1e-5, atol=1e-5)
    # the weights all take part: each gets the oracle's gradient
    g = torch.randn_like(out)
    wrt = [w for b in stage.blocks for w in (b.alpha, b.beta, b.theta, b.gamma)]
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(y_ch[-1], wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_weighted_averaging_starts_as_the_plain_chain():
    stage = _small_stage()
    x = torch.randn(1, 4, 6, 6)
    y = stage.downsample(x)
    for b in stage.blocks:
        for layer in [*b.token_mixer, b.channel_mixer]:
            y = layer(y)
    torch.testing.assert_close(stage(x), y)


@pytest.mark.parametrize('depth', [1, 4])
def test_weighted_averaging_has_the_papers_weight_count(depth):
    # Section 3: the weighted averaging of L blocks holds L(2L + 3) scalars
    stage = _small_stage(depth=depth, token_depth=1)
    count = sum(w.numel() for b in stage.blocks for w in (b.alpha, b.beta, b.theta, b.gamma))
    assert count == depth * (2 * depth + 3)


# Table A of the paper: stem channels; per stage token mixers, channel mixers, channel-mixer width.
PAPER_TABLE = {
    'vim2_tiny': (96, [(96, 2, 1, 192), (192, 2, 1, 384), (384, 6, 3, 768), (768, 2, 1, 768)]),
    'vim2_small': (96, [(96, 2, 1, 192), (192, 2, 1, 384), (384, 18, 9, 768), (768, 2, 1, 768)]),
    'vim2_base': (128, [(128, 2, 1, 256), (256, 2, 1, 512), (512, 18, 9, 1024), (1024, 2, 1, 1024)]),
}


@pytest.mark.parametrize('name', sorted(PAPER_TABLE))
def test_variants_follow_the_papers_architecture_table(name):
    stem_dim, stages = PAPER_TABLE[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    assert model.stem.conv.out_channels == stem_dim
    assert model.stem.conv.kernel_size == (4, 4) and model.stem.conv.stride == (4, 4)
    assert len(model.stages) == len(stages)
    for stage, (dim, n_token, n_channel, width) in zip(model.stages, stages):
        token = [m for m in stage.modules() if isinstance(m, mm.SelectiveTokenMixer)]
        channel = [m for m in stage.modules() if isinstance(m, mm.SelectiveChannelMixer)]
        assert (len(token), len(channel)) == (n_token, n_channel)
        for t in token:  # Linear C → 2·2C (x and gate), DWConv 3x3 on 2C, S6 with 16 states over 4 routes
            assert (t.in_proj.in_features, t.in_proj.out_features) == (dim, 4 * dim)
            assert t.conv2d.kernel_size == (3, 3) and t.conv2d.groups == 2 * dim
            assert (t.d_state, t.num_routes) == (16, 4)
        for c in channel:
            assert (c.in_proj.in_features, c.width, c.out_proj.out_features) == (dim, width, dim)


def test_checkpoint_filter_fn_unwraps_and_strips_prefixes():
    model = mm.MambaMixer(dims=(8, 16), depths=(1, 1), num_classes=3, d_state=2, channel_d_state=2)
    source = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    for wrapped in ({'model': {'module.' + k: v for k, v in source.items()}},
                    {'state_dict': {'backbone.' + k: v for k, v in source.items()} | {'decode_head.w': torch.ones(1)}}):
        model.load_state_dict(mm.checkpoint_filter_fn(wrapped, model), strict=True)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, source[k])


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_channel_mixer_saves_no_per_token_state_sized_tensors():
    # delta, B and C of a channel step are rank one in the step's value: the scan gets B and C as broadcasts, so
    # what is saved per token is a few (K, L) sequences, independent of d_state (per-token (K, N, L) B and C were
    # 70% of ViM2-T's activation memory)
    T, L, dim = 64, 24, 6
    saved = {}
    for N in (4, 32):
        m = mm.SelectiveChannelMixer(dim, width=L, d_state=N)
        x = torch.randn(T, dim, requires_grad=True)
        saved[N] = _saved_bytes(lambda: m(x), list(m.parameters()))
    assert abs(saved[32] - saved[4]) <= 4 * 2 * (32 - 4) * 4  # only (K, N)-sized tensors (A) may differ
    assert saved[32] <= T * 4 * (16 * 2 * L + 2 * dim)  # ~16 (K, L) fp32 sequences per token; B and C were 2·K·N·L


def test_channel_mixer_runs_of_tokens_match_one_run():
    m = mm.SelectiveChannelMixer(6, width=10, d_state=5)
    _randomize(m, 4)
    x = torch.randn(3, 7, 6, requires_grad=True)
    wrt = [x, m.in_proj.weight, m.conv1d.weight, m.x_proj_weight, m.dt_projs_weight, m.dt_projs_bias, m.A_logs, m.Ds]
    g = torch.randn(3, 7, 6)
    results = []
    for chunk in (2 ** 30, 4 * 2 * 5 * 10 * 4):  # one run; runs of 4 tokens (the last one shorter)
        m.grad_chunk_bytes = chunk
        out = m(x)
        results.append((out, torch.autograd.grad(out, wrt, g)))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vim2_saved_activations_do_not_grow_with_the_channel_d_state():
    # whole-model guard: with per-token (K, N, L) channel-scan B and C saved, going from 4 to 32 channel states
    # added 2·K·(32 - 4)·width·4 bytes per token of every stage (about 7x this model's other activations);
    # now only (K, N) tensors may differ
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for N in (4, 32):
        torch.manual_seed(0)
        model = mm.MambaMixer(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_classes=10, channel_d_state=N)
        saved[N] = _saved_bytes(lambda: model(x).sum(), list(model.parameters()))
    per_token_bc = 2 * 2 * (32 - 4) * 4 * (32 * 16 * 16 + 64 * 8 * 8 + 2 * 96 * 4 * 4 + 64 * 2 * 2) * 2
    assert abs(saved[32] - saved[4]) < 0.01 * per_token_bc, (saved, per_token_bc)


# ------------------------------------------------------------------------------------------------
# What the training forward keeps for backward, in the form CUDA runs (fused projections, bf16 autocast; CUDA's
# autocast runs LayerNorm in fp32, which CPU autocast does not: the tests force it)

def _saved_bytes_per_image(module, make_input) -> float:
    """Bytes kept per image, each storage once: the difference of batches 3 and 1 (weight casts, routes and
    parameters do not grow with the batch)."""
    sizes = []
    for batch in (1, 3):
        x = make_input(batch)
        with fused_projections(True), torch.autocast('cpu', dtype=torch.bfloat16):
            sizes.append(_saved_bytes(lambda: module(x), list(module.parameters())))
    return (sizes[1] - sizes[0]) / 2


def test_token_mixer_keeps_what_its_backward_reads(monkeypatch):
    """Per pixel (bf16): in_proj's input (C) and output (2·Di: conv input and gate), the conv output and its SiLU
    (2·Di), x_proj's output (K·(R + 2N)) with B and C made contiguous (2·K·N), the K routes' deltas (K·Di), the
    scan output and out_proj's input (2·Di). The LayerNorm's fp32 copy of the scan output and the product's fp32
    normalized output (8·Di bytes) exceed it."""
    for cls in (torch.nn.LayerNorm, LayerNorm):
        monkeypatch.setattr(cls, 'forward', LayerNormInFp32.forward)
    C, H, W = 16, 6, 5
    m = mm.SelectiveTokenMixer(C, d_state=4).train()
    _randomize(m, 5)
    Di, K, R, N = m.channels, m.num_routes, m.dt_rank, m.d_state
    needed_per_pixel = 2 * (C + 6 * Di + K * Di + K * (R + 4 * N))
    per_image = _saved_bytes_per_image(m, lambda b: torch.randn(b, H, W, C, requires_grad=True))
    assert 0 < per_image <= H * W * needed_per_pixel, (per_image, H * W * needed_per_pixel)


def test_channel_mixer_keeps_what_its_backward_reads():
    """Per token (bf16): in_proj's input (C) and output (2·L: sequence and gate), per direction the SiLU output u,
    the scan's u² and delta and the output's y + D (4·K·L), the directions' sum, SiLU(gate) and out_proj's input
    (3·L). The stacked directions and the conv output (2·K·L + K·(d_conv - 1) more) exceed it."""
    C, L, tokens = 6, 24, 10
    m = mm.SelectiveChannelMixer(C, width=L, d_state=4).train()
    _randomize(m, 6)
    K = m.num_directions
    needed_per_token = 2 * (C + 5 * L + 4 * K * L)
    per_image = _saved_bytes_per_image(m, lambda b: torch.randn(b, tokens, C, requires_grad=True))
    assert 0 < per_image <= tokens * needed_per_token, (per_image, tokens * needed_per_token)


def _recorded_inputs(model, kinds):
    """Forward pre-hooks that record the input shape of every module of the given kinds."""
    shapes = []
    for module in model.modules():
        if isinstance(module, kinds):
            module.register_forward_pre_hook(lambda mod, args: shapes.append((mod, args[0].shape)))
    return shapes


@pytest.mark.parametrize('form', ['cuda', 'cpu'])
def test_training_step_is_bitwise_the_form_that_keeps_every_intermediate(monkeypatch, form):
    """Outputs and every gradient equal those of the form that keeps the recomputed steps' tensors (odd map
    sizes included), and in the CUDA form at least those tensors are no longer kept: per token-mixer pixel the
    LayerNorm's fp32 copy of the scan output, its fp32 output and its mean and rstd, per channel-mixer token the
    stacked directions and the conv output."""
    if form == 'cuda':  # PyTorch's LayerNorm under CUDA autocast (the fused one keeps less: the bf16 input)
        for cls in (torch.nn.LayerNorm, LayerNorm):
            monkeypatch.setattr(cls, 'forward', LayerNormInFp32.forward)
    model = mm.MambaMixer(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_classes=10, d_state=4,
                          channel_d_state=4).train()
    _randomize(model, 7)
    shapes = _recorded_inputs(model, (mm.SelectiveTokenMixer, mm.SelectiveChannelMixer))
    x, g = torch.randn(2, 3, 44, 36), torch.randn(2, 10)  # stage maps 11x9, 6x5, 3x3, 2x2

    def step():
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        shapes.clear()
        with fused_projections(True if form == 'cuda' else None), torch.autocast('cpu', dtype=torch.bfloat16):
            saved = _saved_bytes(lambda: outs.append(model(xr)), list(model.parameters()))
        (outs[-1].float() * g).sum().backward()
        return [outs[-1], xr.grad] + [p.grad for p in model.parameters()], saved

    outs = []
    ours, saved = step()
    with monkeypatch.context() as mp:
        mp.setattr(mm, 'recomputed_in_backward', lambda fn, *args: fn(*args))
        kept, saved_kept = step()
    names = ['out', 'x'] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, ours, kept):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    if form == 'cuda':
        dropped = 0
        for module, shape in shapes:
            if isinstance(module, mm.SelectiveTokenMixer):
                dropped += shape[:-1].numel() * (8 * module.channels + 8)
            else:
                K, L, taps = module.num_directions, module.width, module.conv1d.kernel_size[0]
                dropped += shape[:-1].numel() * 2 * K * (2 * L + taps - 1)
        assert saved_kept - saved >= dropped, (saved_kept, saved, dropped)
