"""EfficientVMamba specifics against independent oracles written here: the atrous ES2D scan (official
sub-grid split / scan / merge, with the official zero padding as a separate oracle), the shared BiAttn gate of
the EVSS block, the inverted-residual stages, patch merging, and the official checkpoint layout."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
import vmamba_kernels
from vmamba_zoo.layers.route_scan import fused_projections
from vmamba_zoo.models.efficientvmamba import (
    BiAttn, EVSSBlock, EfficientScan2d, EfficientVMambaStage, PatchMerging, checkpoint_filter_fn)

DATA = Path(__file__).resolve().parents[1] / 'data'
VARIANTS = ('efficientvmamba_tiny', 'efficientvmamba_small', 'efficientvmamba_base')


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------
# Oracle: the official ES2D written directly (channels-first sub-grid split → per-route scan → merge)

# Route k of the official EfficientScan: (h parity, w parity) of its sub-grid. Routes 0 and 2 read their
# sub-grid row-major, routes 1 and 3 (odd rows) column-major (x.transpose(2, 3) before slicing).
OFFICIAL_SUBGRIDS = ((0, 0), (1, 0), (0, 1), (1, 1))


def scan_loop(u, delta, A, B, C, D):
    """Plain recurrence: u, delta (b, d, l); A (d, n); B, C (b, n, l); D (d,)."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def es2d_oracle(m: EfficientScan2d, x, pad_to_even: bool):
    """x (b, H, W, C) → (b, H, W, C), route k on sub-grid OFFICIAL_SUBGRIDS[k] with route k's x_proj, dt_proj,
    A and D. pad_to_even=True reproduces the official zero padding of odd maps to even before the split."""
    b, H, W, _ = x.shape
    R, N, Di = m.dt_rank, m.d_state, m.d_inner
    xz = x @ m.in_proj.weight.t()
    u, z = xz[..., :Di], F.silu(xz[..., Di:])
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), m.conv2d.weight, m.conv2d.bias, padding=1, groups=Di))  # b Di H W
    if pad_to_even:
        u = F.pad(u, (0, W % 2, 0, H % 2))
    A = -torch.exp(m.A_logs).view(4, Di, N)
    Ds = m.Ds.view(4, Di)
    y = u.new_zeros(u.shape)
    for k, (ph, pw) in enumerate(OFFICIAL_SUBGRIDS):
        sub = u[:, :, ph::2, pw::2]
        column_major = ph == 1
        seq = (sub.transpose(2, 3) if column_major else sub).reshape(b, Di, -1)
        dbl = torch.einsum('bdl,cd->bcl', seq, m.x_proj_weight[k])
        dt, Bs, Cs = dbl.split([R, N, N], dim=1)
        delta = F.softplus(torch.einsum('brl,dr->bdl', dt, m.dt_projs_weight[k]) + m.dt_projs_bias[k][:, None])
        out = scan_loop(seq, delta, A[k], Bs, Cs, Ds[k])
        if column_major:
            out = out.view(b, Di, sub.shape[3], sub.shape[2]).transpose(2, 3)
        y[:, :, ph::2, pw::2] = out.reshape(sub.shape)
    y = y[:, :, :H, :W].permute(0, 2, 3, 1)
    y = F.layer_norm(y, (Di,), m.out_norm.weight, m.out_norm.bias) * z
    return y @ m.out_proj.weight.t()


def randomize_(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.1 * torch.randn_like(p) if 'A_logs' in name else 0.3 * torch.randn_like(p))
    return module


def test_atrous_routes_are_the_parity_subgrids():
    H, W = 5, 8
    routes = vmamba_kernels.scan_routes('atrous', H, W, step=2)
    seen = torch.cat([r[r >= 0] for r in routes])
    assert sorted(seen.tolist()) == list(range(H * W))  # each pixel visited exactly once
    for k, (ph, pw) in enumerate(OFFICIAL_SUBGRIDS):
        r = routes[k][routes[k] >= 0]
        assert ((r // W) % 2 == ph).all() and ((r % W) % 2 == pw).all()


@pytest.mark.parametrize('H,W', [(6, 8), (7, 5)])
def test_es2d_matches_subgrid_oracle(projection_form, H, W):
    """Even maps: the official split/merge exactly. Odd maps: our exact partition of the grid."""
    m = randomize_(EfficientScan2d(8, d_state=4).double())
    x = torch.randn(2, H, W, 8, dtype=torch.float64, requires_grad=True)
    ours = m(x)
    ref = es2d_oracle(m, x, pad_to_even=False)
    assert rel_err(ours, ref) < 1e-10
    g = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * g).sum(), [x, *m.parameters()])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, *m.parameters()])
    for (name, _), a, b in zip([('x', x), *m.named_parameters()], grads, grads_ref):
        assert rel_err(a, b) < 1e-9, name
    if H % 2 == 0 and W % 2 == 0:
        assert rel_err(ours, es2d_oracle(m, x, pad_to_even=True)) < 1e-10


def test_es2d_odd_width_differs_from_official_padding_only_on_padded_route():
    """Official code zero-pads an odd width to even: the padded column is odd, so it enters the routes of odd
    columns. Row-major route 2 meets a padded pixel at the end of every row (its state decays there), while
    column-major route 3 meets them only after its last real pixel, and routes 0/1 never do."""
    H, W = 6, 7
    m = randomize_(EfficientScan2d(8, d_state=4).double())
    x = torch.randn(1, H, W, 8, dtype=torch.float64)
    with torch.no_grad():  # after the scan every op is per pixel, so differences stay on their pixels
        ours = m(x)
        official = es2d_oracle(m, x, pad_to_even=True)
    diff = (ours - official).abs().amax(-1)[0]  # (H, W)
    for k, (ph, pw) in enumerate(OFFICIAL_SUBGRIDS):
        d = diff[ph::2, pw::2]
        if k == 2:
            assert d[0].max() < 1e-10 and d[1:].min() > 1e-8  # every row after the first padded pixel
        else:
            assert d.max() < 1e-10


def test_biattn_formula():
    gate = randomize_(BiAttn(16))
    assert gate.global_reduce.out_features == 2  # int(16 * 0.125)
    x = torch.randn(2, 5, 6, 16)
    t = F.layer_norm(x, (16,), gate.norm.weight, gate.norm.bias).mean(dim=(1, 2))
    a = torch.sigmoid(F.linear(F.gelu(F.linear(t, gate.global_reduce.weight, gate.global_reduce.bias)),
                               gate.channel_select.weight, gate.channel_select.bias))
    assert rel_err(gate(x), x * a[:, None, None, :]) < 1e-6


def test_evss_block_shares_one_gate_and_has_no_mlp():
    blk = randomize_(EVSSBlock(8, d_state=4)).eval()
    assert not any('mlp' in n or 'norm2' in n for n, _ in blk.named_parameters())
    x = torch.randn(2, 6, 4, 8)
    with torch.no_grad():
        y = F.layer_norm(x, (8,), blk.norm.weight, blk.norm.bias)
        cb = blk.conv_branch
        c = F.conv2d(y.permute(0, 3, 1, 2), cb.conv_dw.weight, cb.conv_dw.bias, padding=1, groups=8)
        c = F.batch_norm(c, cb.norm.running_mean, cb.norm.running_var, cb.norm.weight, cb.norm.bias)
        c = F.conv2d(F.gelu(c), cb.conv_pw.weight, cb.conv_pw.bias).permute(0, 2, 3, 1)
        s = es2d_oracle(blk.ssm, y, pad_to_even=False)

        def gate(t):  # the same BiAttn parameters for both branches
            a = F.layer_norm(t, (8,), blk.channel_gate.norm.weight, blk.channel_gate.norm.bias).mean(dim=(1, 2))
            a = F.linear(F.gelu(F.linear(a, blk.channel_gate.global_reduce.weight, blk.channel_gate.global_reduce.bias)),
                         blk.channel_gate.channel_select.weight, blk.channel_gate.channel_select.bias)
            return t * torch.sigmoid(a)[:, None, None, :]

        assert rel_err(blk(x), x + gate(s) + gate(c)) < 1e-5


def test_inverted_residual_stage():
    """MobileNetV2 block of stages 2-3: 1x1 (x4) BN ReLU, dw3x3 BN ReLU, SE (mid/8, ReLU, sigmoid), 1x1 BN, +x."""
    dim = 8
    stage = EfficientVMambaStage(dim, dim, 1, 'ir', drop_path=[0.], downsample=False)
    blk = stage.blocks[0]
    with torch.no_grad():
        for bn in (blk.bn1, blk.bn2, blk.bn3):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.)
            bn.weight.normal_()
            bn.bias.normal_()
    stage.eval()
    assert blk.conv_pw.weight.shape == (4 * dim, dim, 1, 1)
    assert blk.conv_dw.weight.shape == (4 * dim, 1, 3, 3)
    assert blk.se.conv_reduce.weight.shape == (4 * dim // 8, 4 * dim, 1, 1)
    assert blk.conv_pwl.weight.shape == (dim, 4 * dim, 1, 1)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, eps=m.eps)

    x = torch.randn(2, 5, 7, dim)  # channels-last stream
    with torch.no_grad():
        t = x.permute(0, 3, 1, 2)
        h = F.relu(bn(F.conv2d(t, blk.conv_pw.weight), blk.bn1))
        h = F.relu(bn(F.conv2d(h, blk.conv_dw.weight, padding=1, groups=4 * dim), blk.bn2))
        s = F.relu(F.conv2d(h.mean((2, 3), keepdim=True), blk.se.conv_reduce.weight, blk.se.conv_reduce.bias))
        h = h * torch.sigmoid(F.conv2d(s, blk.se.conv_expand.weight, blk.se.conv_expand.bias))
        ref = (bn(F.conv2d(h, blk.conv_pwl.weight), blk.bn3) + t).permute(0, 2, 3, 1)
        assert rel_err(stage(x), ref) < 1e-5


@pytest.mark.parametrize('H,W', [(4, 6), (5, 7)])
def test_patch_merging_neighbour_order_and_odd_padding(H, W):
    pm = randomize_(PatchMerging(3, 6))
    x = torch.randn(1, H, W, 3)
    Ho, Wo = (H + 1) // 2, (W + 1) // 2
    cat = torch.zeros(1, Ho, Wo, 12)
    for i in range(Ho):
        for j in range(Wo):
            for n, (dh, dw) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
                if 2 * i + dh < H and 2 * j + dw < W:
                    cat[0, i, j, 3 * n:3 * n + 3] = x[0, 2 * i + dh, 2 * j + dw]
    ref = F.linear(F.layer_norm(cat, (12,), pm.norm.weight, pm.norm.bias), pm.reduction.weight)
    assert rel_err(pm(x), ref) < 1e-6


def test_variant_widths():
    for name, dims, depths in (('efficientvmamba_tiny', 48, (2, 2, 4, 2)),
                               ('efficientvmamba_small', 64, (2, 2, 4, 2)),  # 64 as trained, not the yaml's 96
                               ('efficientvmamba_base', 96, (2, 2, 9, 2))):
        m = timm.create_model(name, pretrained=False)
        assert [f['num_chs'] for f in m.feature_info] == [dims, 2 * dims, 4 * dims, 8 * dims]
        assert [f['reduction'] for f in m.feature_info] == [4, 8, 16, 32]
        assert [len(s.blocks) for s in m.stages] == list(depths)


def test_odd_input_runs():
    m = timm.create_model('efficientvmamba_tiny', num_classes=10).eval()
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 3, 36, 52), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(9, 13), (5, 7), (3, 4), (2, 2)]
    assert all(torch.isfinite(f).all() for f in feats)


# ------------------------------------------------------------------------------------------------
# Official checkpoint layout


def official_state_dict(name):
    keys = json.loads((DATA / 'official_keys' / f'{name}.json').read_text())['keys']
    return {k: torch.randn(shape) if shape else torch.tensor(7) for k, shape in keys.items()}


@pytest.mark.parametrize('name', VARIANTS)
def test_official_checkpoint_converts_and_loads_strictly(name):
    sd = official_state_dict(name)
    model = timm.create_model(name)
    wrapped = {'state_dict': {'module.module.' + k: v for k, v in sd.items()}, 'epoch': 300}
    out = checkpoint_filter_fn(wrapped, model)
    model.load_state_dict(out, strict=True)
    assert len(out) == len(sd)
    d = len(model.stages[2].blocks)
    mapping = {  # official → ours, one of each kind
        'patch_embed.0.weight': 'stem.conv.weight',
        'patch_embed.2.bias': 'stem.norm.bias',
        'layers.0.blocks.1.op.x_proj_weight': 'stages.0.blocks.1.ssm.x_proj_weight',
        'layers.1.blocks.0.op.A_logs': 'stages.1.blocks.0.ssm.A_logs',
        'layers.0.blocks.0.conv_branch.0.weight': 'stages.0.blocks.0.conv_branch.conv_dw.weight',
        'layers.0.blocks.0.conv_branch.1.running_var': 'stages.0.blocks.0.conv_branch.norm.running_var',
        'layers.0.blocks.0.conv_branch.3.weight': 'stages.0.blocks.0.conv_branch.conv_pw.weight',
        'layers.1.blocks.1.se.channel_select.weight': 'stages.1.blocks.1.channel_gate.channel_select.weight',
        'layers.0.downsample.reduction.weight': 'stages.1.downsample.reduction.weight',
        'layers.1.downsample.norm.weight': 'stages.2.downsample.norm.weight',
        'layers.2.1.conv_pw.0.weight': 'stages.2.blocks.0.conv_pw.weight',
        'layers.2.1.conv_pw.1.running_mean': 'stages.2.blocks.0.bn1.running_mean',
        'layers.2.2.conv_dw.1.weight': 'stages.2.blocks.1.bn2.weight',
        f'layers.2.{d}.se.conv_expand.bias': f'stages.2.blocks.{d - 1}.se.conv_expand.bias',
        'layers.3.2.conv_pw2.0.weight': 'stages.3.blocks.1.conv_pwl.weight',
        'layers.3.1.conv_pw2.1.bias': 'stages.3.blocks.0.bn3.bias',
        f'layers.2.{d + 2}.reduction.weight': 'stages.3.downsample.reduction.weight',
        'classifier.norm.weight': 'norm.weight',
        'classifier.head.bias': 'head.fc.bias',
    }
    for src, dst in mapping.items():
        assert torch.equal(out[dst], sd[src]), (src, dst)


def test_checkpoint_wrappers_backbone_prefix_and_idempotence():
    name = 'efficientvmamba_tiny'
    sd = official_state_dict(name)
    model = timm.create_model(name)
    ref = checkpoint_filter_fn(sd, model)
    for wrapped in ({'model': sd}, {'model_ema': sd}, {'state_dict': {'module.' + k: v for k, v in sd.items()}}):
        out = checkpoint_filter_fn(wrapped, model)
        assert out.keys() == ref.keys() and all(out[k] is ref[k] for k in ref)
    # detection checkpoint: backbone.* plus per-stage out norms and a neck that are not ours
    det = {'backbone.' + k: v for k, v in sd.items() if not k.startswith('classifier.')}
    det.update({'backbone.outnorm0.weight': torch.ones(48), 'neck.lateral_convs.0.conv.weight': torch.ones(1)})
    out = checkpoint_filter_fn({'state_dict': det}, model)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert sorted(missing) == ['head.fc.bias', 'head.fc.weight', 'norm.bias', 'norm.weight'] and not unexpected
    # our own state dict passes through unchanged
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model).keys() == own.keys()


def test_pretrained_file_loads_through_timm(tmp_path):
    name = 'efficientvmamba_tiny'
    sd = official_state_dict(name)
    path = tmp_path / 'efficient_vmamba_tiny.ckpt'
    torch.save({'state_dict': sd}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.stages[2].blocks[0].conv_pw.weight, sd['layers.2.1.conv_pw.0.weight'])
    assert model.pretrained_cfg['hf_hub_id'] == 'TerryPei/EfficientVMamba-Tiny'


# ------------------------------------------------------------------------------------------------
# What the training forward saves for backward (CUDA's fused projections, under bf16 autocast)

def saved_tensors(fn):
    """Every tensor that autograd saves while fn() runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def saved_bytes_per_image(module, make_input):
    """Bytes saved per image, each storage once: the difference of two batch sizes (weight casts and routes do
    not scale with the batch)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    sizes = []
    for batch in (1, 3):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in saved_tensors(lambda: module(make_input(batch)))}
        sizes.append(sum(n for ptr, n in storages.items() if ptr not in params))
    return (sizes[1] - sizes[0]) / 2


def test_es2d_training_forward_saves_one_delta_per_pixel():
    """The fused form projects every route at every pixel; what the backward needs is, per pixel (bf16): the
    input (C), in_proj's output (2·Di: conv input and gate), the conv output and its SiLU (2·Di), x_proj's
    output (K·(R + 2N): dt, B, C), one delta (Di, its own route's), the scan output, the normalized output, the
    gate and their product (4·Di), and the out-norm's mean and rstd. K deltas per pixel exceed it."""
    C, H, W = 16, 8, 6
    m = randomize_(EfficientScan2d(C, d_state=4)).train()
    Di, K, R, N = m.d_inner, m.num_routes, m.dt_rank, m.d_state
    needed_per_pixel = 2 * (C + 9 * Di + K * (R + 2 * N)) + 2 * 4
    with fused_projections(True), torch.autocast('cpu', dtype=torch.bfloat16):
        per_image = saved_bytes_per_image(m, lambda b: torch.randn(b, H, W, C, requires_grad=True))
    assert 0 < per_image <= H * W * needed_per_pixel


class LayerNormInFp32(torch.nn.LayerNorm):
    """LayerNorm as CUDA autocast runs it: in fp32, whatever the input (CPU autocast keeps bf16)."""

    def forward(self, x):
        with torch.autocast('cpu', enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def small_model(norm_layer=torch.nn.LayerNorm):
    torch.manual_seed(0)
    model = timm.create_model('efficientvmamba_tiny', dims=16, depths=(1, 1, 1, 1), norm_layer=norm_layer)
    return randomize_(model).train()


@pytest.mark.parametrize('norm_layer', [torch.nn.LayerNorm, LayerNormInFp32], ids=['cpu-autocast', 'cuda-autocast'])
def test_training_step_is_bitwise_the_every_route_delta_form(monkeypatch, norm_layer):
    """Outputs and every gradient equal those of the form that hands the scan every route's delta (odd map
    sizes included)."""
    from vmamba_zoo.models import efficientvmamba
    model = small_model(norm_layer)
    x = torch.randn(2, 3, 60, 52)  # stage maps 15x13, 8x7, 4x4, 2x2

    def step():
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        with fused_projections(True), torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(xr)
        (out.float() * g).sum().backward()
        return [out, xr.grad] + [p.grad for p in model.parameters()]

    g = torch.randn(2, model.num_classes)
    ours = step()
    with monkeypatch.context() as mp:
        mp.setattr(efficientvmamba, 'owned_values', lambda per_route, owned_entries: per_route)
        every_route = step()
    names = ['out', 'x'] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, ours, every_route):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
