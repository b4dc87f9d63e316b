"""VMamba v2 / MHS family checks against oracles written here: the cross scan as explicit flips and transposes,
the GFU as its formula, the multi-head scan as gather → 1D scan → inverse permutation, checkpoint conversion."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vmamba_zoo.models.vmamba as vm
from vmamba_kernels import scan_routes

KEYS = Path(__file__).resolve().parents[1] / 'data' / 'official_keys'


def _naive_scan(u, delta, A, B, C, D, delta_bias):
    """Step-by-step selective scan. u, delta (Bt, Dm, L); A (Dm, N); B, C (Bt, G, N, L); D, delta_bias (Dm,)."""
    Bt, Dm, L = u.shape
    G = B.shape[1]
    dt = F.softplus(delta + delta_bias[:, None])
    Bx = B.repeat_interleave(Dm // G, dim=1)  # (Bt, Dm, N, L)
    Cx = C.repeat_interleave(Dm // G, dim=1)
    h = u.new_zeros(Bt, Dm, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'A_logs' in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            else:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


def _ss2d_oracle(m: vm.SS2D, x):
    """VMamba's v05_noz forward, channels-first as the official code: cross scan = [rows, cols, both flipped]."""
    x = m.in_proj(x).permute(0, 3, 1, 2)
    x = m.act(m.conv2d(x))
    Bt, D, H, W = x.shape
    K, N, R, L = 4, m.d_state, m.dt_rank, H * W
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)  # (Bt, K, D, L)
    x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, m.x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=2)
    dts = torch.einsum('bkrl,kdr->bkdl', dts, m.dt_projs_weight)
    ys = _naive_scan(xs.reshape(Bt, K * D, L), dts.reshape(Bt, K * D, L), -torch.exp(m.A_logs), Bs, Cs, m.Ds,
                     m.dt_projs_bias.reshape(-1)).view(Bt, K, D, L)
    y_rows = ys[:, 0] + ys[:, 2].flip(-1)
    y_cols = ys[:, 1] + ys[:, 3].flip(-1)
    y = y_rows.view(Bt, D, H, W) + y_cols.view(Bt, D, W, H).transpose(2, 3)
    return m.out_proj(m.out_norm(y.permute(0, 2, 3, 1)))


def test_ss2d_cross_scan_matches_flip_transpose_oracle(projection_form):
    torch.manual_seed(0)
    m = vm.SS2D(12, d_state=2, ssm_ratio=1.0)
    _randomize(m, 1)
    x = torch.randn(2, 5, 7, 12, requires_grad=True)
    out = m(x)
    ref = _ss2d_oracle(m, x)
    assert out.shape == (2, 5, 7, 12)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, m.x_proj_weight, m.A_logs, m.dt_projs_bias], g)
    grads_ref = torch.autograd.grad(ref, [x, m.x_proj_weight, m.A_logs, m.dt_projs_bias], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('t', [0.0, 1.0])
def test_gfu_matches_formula(t):
    torch.manual_seed(0)
    y = torch.randn(2, 3, 5, 4, 6)  # (..., K=4 routes, S)
    out = vm.ScanRouteAttention(t, dim=-2)(y)
    vals = [y[..., k, :] for k in range(4)]
    total = vals[0] + vals[1] + vals[2] + vals[3]
    mean = total / 4
    std = torch.sqrt(sum((v - mean) ** 2 for v in vals) / 3)  # unbiased, as torch.std in MHS-VM
    low = torch.minimum(torch.minimum(vals[0], vals[1]), torch.minimum(vals[2], vals[3]))
    spread = sum(v - low for v in vals) / 4
    ref = total * torch.clamp(std / (spread + 1e-5) - t, min=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if t > 0:
        assert (out == 0).any() and (out != 0).any()


def _mhs_oracle(m: vm.MultiHeadScan, x):
    """MHS-VM per head: gather each route (index_select), scan, put back by the inverse permutation, GFU."""
    x = m.act(m.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    Bt, H, W, _ = x.shape
    n, S, N, R, L = m.num_heads, m.head_dim, m.d_state, m.dt_rank, H * W
    xh = m.x_ssproj(x).reshape(Bt, L, n, S)
    routes = scan_routes('multihead', H, W, patterns=m.patterns)
    heads = []
    for h in range(n):
        ys = []
        for j in range(4):
            k = 4 * h + j
            order = routes[k]
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(L)
            u = xh[:, order, h].transpose(1, 2)  # (Bt, S, L)
            x_dbl = torch.einsum('bsl,cs->bcl', u, m.x_proj_weight[k])
            dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=1)
            dts = torch.einsum('brl,sr->bsl', dts, m.dt_projs_weight[k])
            A = -torch.exp(m.A_logs.view(4 * n, S, N)[k])
            y = _naive_scan(u, dts, A, Bs[:, None], Cs[:, None], m.Ds.view(4 * n, S)[k], m.dt_projs_bias[k])
            ys.append(y[:, :, inverse])  # back to raster order
        ys = torch.stack(ys, dim=1)  # (Bt, 4, S, L)
        cv = ys.std(1) / ((ys - ys.min(1, keepdim=True).values).mean(1) + 1e-5)
        heads.append(ys.sum(1) * torch.relu(cv - m.gfu.t))
    y = torch.cat(heads, dim=1).transpose(1, 2).reshape(Bt, H, W, n * S)
    return m.out_norm(m.y_proj(m.cat_norm(y)))


def test_multihead_scan_matches_per_head_oracle(projection_form):
    torch.manual_seed(0)
    m = vm.MultiHeadScan(16, num_heads=4, d_state=3, gfu_t=0.1)
    _randomize(m, 2)
    x = torch.randn(1, 5, 6, 16, requires_grad=True)
    out = m(x)
    ref = _mhs_oracle(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, [x, m.x_proj_weight], g)
    gx_ref, gw_ref = torch.autograd.grad(ref, [x, m.x_proj_weight], g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-3, atol=1e-5)


def test_multihead_scan_rejects_pattern_count_mismatch():
    with pytest.raises(ValueError, match='one scan pattern per head'):
        vm.MultiHeadScan(16, num_heads=3, patterns=('C', 'X', 'S', 'Z'))


def _official_state_dict(name, seed=0):
    keys = json.loads((KEYS / f'{name}.json').read_text())['keys']
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in keys.items()}


def test_checkpoint_filter_official_tiny_layout():
    model = vm.vmamba_tiny_s1l8()
    sd = _official_state_dict('vmamba_tiny_s1l8')
    ema = {k: v + 1 for k, v in sd.items()}
    converted = vm.checkpoint_filter_fn({'model': sd, 'model_ema': ema, 'optimizer': {}, 'epoch': 3}, model)
    model.load_state_dict(converted, strict=True)
    ours = model.state_dict()
    pairs = {
        'patch_embed.0.weight': 'stem.conv1.weight',
        'patch_embed.2.bias': 'stem.norm1.bias',
        'patch_embed.5.weight': 'stem.conv2.weight',
        'patch_embed.7.weight': 'stem.norm2.weight',
        'layers.0.downsample.1.weight': 'stages.1.downsample.conv.weight',
        'layers.2.downsample.3.bias': 'stages.3.downsample.norm.bias',
        'layers.2.blocks.7.op.x_proj_weight': 'stages.2.blocks.7.mixer.x_proj_weight',
        'layers.1.blocks.1.op.A_logs': 'stages.1.blocks.1.mixer.A_logs',
        'layers.3.blocks.0.norm.weight': 'stages.3.blocks.0.norm1.weight',
        'layers.3.blocks.1.op.out_norm.weight': 'stages.3.blocks.1.mixer.out_norm.weight',
        'layers.0.blocks.1.mlp.fc2.weight': 'stages.0.blocks.1.mlp.fc2.weight',
        'classifier.norm.bias': 'norm.bias',
        'classifier.head.weight': 'head.fc.weight',
    }
    for official, mine in pairs.items():
        assert torch.equal(ours[mine], sd[official]), (official, mine)  # 'model' wins over 'model_ema'
    # bare EMA-only checkpoint, DDP prefix, and Linear2d weights saved as 1x1 convs
    ema_only = {'module.' + k: (v[..., None, None] if k.endswith('in_proj.weight') else v) for k, v in ema.items()}
    model.load_state_dict(vm.checkpoint_filter_fn({'model_ema': ema_only}, model), strict=True)
    w = model.state_dict()['stages.0.blocks.0.mixer.in_proj.weight']
    assert torch.equal(w, ema['layers.0.blocks.0.op.in_proj.weight'])


def _module_layout(flat, bias_in_module):
    """The current official SS2D's keys for a released (stacked) state dict: x_proj and dt_projs are grouped
    Linear modules whose weights are the stacked ones flattened over the routes (the official
    _load_from_state_dict views one as the other); dt_projs_bias stays a parameter, or a module bias."""
    out = {}
    for k, v in flat.items():
        if k.endswith('.op.x_proj_weight'):  # (K, R + 2N, C) → (K·(R + 2N), C)
            out[k.replace('x_proj_weight', 'x_proj.weight')] = v.reshape(-1, v.shape[-1])
        elif k.endswith('.op.dt_projs_weight'):  # (K, C, R) → (K·C, R)
            out[k.replace('dt_projs_weight', 'dt_projs.weight')] = v.reshape(-1, v.shape[-1])
        elif k.endswith('.op.dt_projs_bias') and bias_in_module:  # (K, C) → (K·C,)
            out[k.replace('dt_projs_bias', 'dt_projs.bias')] = v.reshape(-1)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize('bias_in_module', [False, True])
def test_checkpoint_filter_reads_both_official_ss2d_layouts(bias_in_module):
    flat = _official_state_dict('vmamba_tiny_s1l8', 2)
    modules = _module_layout(flat, bias_in_module)
    assert 'layers.0.blocks.0.op.x_proj.weight' in modules and 'layers.0.blocks.0.op.x_proj_weight' not in modules
    x = torch.randn(2, 3, 64, 64)
    loaded = []
    for layout in (flat, modules):
        model = vm.vmamba_tiny_s1l8().eval()
        model.load_state_dict(vm.checkpoint_filter_fn({'model': layout}, model), strict=True)
        with torch.no_grad():
            loaded.append((model.state_dict(), model(x)))
    (from_flat, logits_flat), (from_modules, logits_modules) = loaded
    assert from_flat.keys() == from_modules.keys()
    for k in from_flat:
        assert torch.equal(from_flat[k], from_modules[k]), k
    assert torch.equal(from_flat['stages.2.blocks.7.mixer.dt_projs_weight'],
                       flat['layers.2.blocks.7.op.dt_projs_weight'])
    assert torch.equal(logits_flat, logits_modules)


def test_checkpoint_filter_refuses_an_x_proj_bias_it_cannot_hold():
    """The official x_proj may carry a bias; this SS2D has none, so strict loading must say so, not drop it."""
    model = vm.vmamba_tiny_s1l8()
    modules = _module_layout(_official_state_dict('vmamba_tiny_s1l8', 3), False)
    modules['layers.0.blocks.0.op.x_proj.bias'] = torch.randn(32)
    with pytest.raises(RuntimeError, match=r'Unexpected key.*stages\.0\.blocks\.0\.mixer\.x_proj\.bias'):
        model.load_state_dict(vm.checkpoint_filter_fn({'model': modules}, model), strict=True)


def test_checkpoint_filter_detection_backbone_drops_outnorms():
    model = vm.vmamba_tiny_s1l8(num_classes=0)
    sd = {k: v for k, v in _official_state_dict('vmamba_tiny_s1l8', 1).items() if not k.startswith('classifier.head')}
    mm = {'backbone.' + k: v for k, v in sd.items()}
    mm.update({f'backbone.outnorm{i}.weight': torch.ones(96 * 2 ** i) for i in range(4)})
    mm['neck.lateral_convs.0.conv.weight'] = torch.ones(1)
    model.load_state_dict(vm.checkpoint_filter_fn({'state_dict': mm}, model), strict=True)


def test_routes_cached_in_eval_serve_training():
    model = vm.VMamba(depths=(1, 1), dims=(8, 16), num_classes=3,
                      mixer_kwargs=dict(d_state=1, ssm_ratio=1.0, conv_bias=False))
    x = torch.randn(1, 3, 24, 40)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_drop_path_rates_linear_over_all_blocks():
    model = vm.VMamba(depths=(2, 2, 8, 2), dims=(8, 16, 24, 32), drop_path_rate=0.2)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for s in model.stages for b in s.blocks]
    assert len(rates) == 14
    for got, want in zip(rates, torch.linspace(0, 0.2, 14).tolist()):
        assert math.isclose(got, want, abs_tol=1e-7)
