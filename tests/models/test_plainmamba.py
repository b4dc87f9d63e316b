"""PlainMamba-specific checks against oracles written here from the official forward (not from our code):
snake routes and direction ids by walking the grid, the 4-route scan with raster-order dt/B/C by an explicit
per-route recurrence, corner padding, the bicubic position-embedding resize by PyTorch's cubic-convolution
formula, and the conversion of the official checkpoint layout."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
from vmamba_zoo.models import plainmamba as pm

DATA = Path(__file__).resolve().parents[1] / 'data'


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- oracles
def snake_walk(H, W):
    """The official get_permute_order, re-derived: walk each snake pixel by pixel, record the move that led
    into every step ([start, right, left, up, down] = 0..4)."""
    def walk(n_major, n_minor, start, step, pixel, moves_ids):
        # snake along the minor axis, stepping the major axis by `step` at each end;
        # moves_ids = (minor +1, minor -1, major +1, major -1)
        i, j = start
        sign = 1 if j == 0 else -1
        order, moves = [], [0]
        while 0 <= i < n_major:
            order.append(pixel(i, j))
            if 0 <= j + sign < n_minor:
                j += sign
                moves.append(moves_ids[0] if sign > 0 else moves_ids[1])
            else:
                i += step
                sign = -sign
                moves.append(moves_ids[2] if step > 0 else moves_ids[3])
        return order, moves[:-1]

    def rows(start, step):
        return walk(H, W, start, step, lambda i, j: i * W + j, (1, 2, 4, 3))

    def cols(start, step):
        return walk(W, H, start, step, lambda j, i: i * W + j, (4, 3, 1, 2))

    walks = [rows((0, 0), 1), rows((H - 1, W - 1 if H % 2 == 1 else 0), -1),
             cols((0, 0), 1), cols((W - 1, H - 1 if W % 2 == 1 else 0), -1)]
    return torch.tensor([w[0] for w in walks]), torch.tensor([w[1] for w in walks])


def naive_scan(u, delta, A, B, C, D):
    """y_t = C_t·h_t + D·u_t, h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t. u, delta (Bt, E, L); B, C (Bt, N, L)."""
    Bt, E, L = u.shape
    h = u.new_zeros(Bt, E, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def mixer_oracle(m: pm.PlainMamba2D, x):
    """The official PlainMamba2D.forward on (Bt, L, C) tokens, one scan per route."""
    Bt, H, W, _ = x.shape
    L = H * W
    xz = F.linear(x.reshape(Bt, L, -1), m.in_proj.weight, m.in_proj.bias)
    xs, z = xz.chunk(2, dim=-1)
    x2d = xs.reshape(Bt, H, W, -1).permute(0, 3, 1, 2)
    x_conv = F.silu(F.conv2d(x2d, m.conv2d.weight, m.conv2d.bias, padding=m.conv2d.kernel_size[0] // 2,
                             groups=m.d_inner)).flatten(2).transpose(1, 2)
    dt, Bm, Cm = torch.split(x_conv @ m.x_proj.weight.t(), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = dt @ m.dt_proj.weight.t() + m.dt_proj.bias
    delta = F.softplus(dt + m.dt_proj.bias).transpose(1, 2)  # the bias a second time, as delta_bias
    A = -torch.exp(m.A_log)
    orders, moves = snake_walk(H, W)
    y = 0
    for o, d in zip(orders, moves):
        # u follows the route; dt, B, C stay in raster order; the direction bias follows the route step
        u = x_conv[:, o].transpose(1, 2)
        Bk = Bm.transpose(1, 2) + m.direction_Bs[d].t()
        yk = naive_scan(u, delta, A, Bk, Cm.transpose(1, 2), m.D)
        y = y + yk.transpose(1, 2)[:, torch.argsort(o)]
    y = y * F.silu(z)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias).reshape(Bt, H, W, -1)


def cubic_weights(src_len, dst_len):
    """(dst_len, src_len) matrix of PyTorch's bicubic (A=-0.75, align_corners=False, border-clamped)."""
    a = -0.75

    def k(s):
        s = abs(s)
        if s <= 1:
            return (a + 2) * s ** 3 - (a + 3) * s ** 2 + 1
        if s < 2:
            return a * s ** 3 - 5 * a * s ** 2 + 8 * a * s - 4 * a
        return 0.0

    M = torch.zeros(dst_len, src_len, dtype=torch.float64)
    scale = src_len / dst_len
    for i in range(dst_len):
        x = (i + 0.5) * scale - 0.5
        x0 = math.floor(x)
        t = x - x0
        for off in range(-1, 3):
            M[i, min(max(x0 + off, 0), src_len - 1)] += k(off - t)
    return M


def randomize_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith('running_var'):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.add_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize('H,W', [(1, 1), (1, 5), (4, 1), (3, 3), (4, 4), (3, 4), (4, 3), (5, 6), (14, 14), (13, 19)])
def test_routes_directions_match_official_walk(H, W):
    routes, param_routes, directions = pm.build_routes(H, W)
    orders, moves = snake_walk(H, W)
    assert torch.equal(routes, orders)
    assert torch.equal(directions, moves)
    assert torch.equal(param_routes, torch.arange(H * W).expand(4, -1))


@pytest.mark.parametrize('H,W', [(3, 5), (4, 4)])
def test_mixer_matches_per_route_official_forward(H, W):
    torch.manual_seed(H * 10 + W)
    m = pm.PlainMamba2D(16, d_state=8)
    randomize_(m)
    with torch.no_grad():
        m.direction_Bs.mul_(20)  # make the direction bias matter
    x = torch.randn(2, H, W, 16, requires_grad=True)
    routes, param_routes, directions = pm.build_routes(H, W)
    out = m(x, routes, param_routes, directions)
    ref = mixer_oracle(m, x)
    assert rel_err(out, ref) < 1e-5

    grad = torch.randn_like(out)
    g_out = torch.autograd.grad(out, [x, m.direction_Bs, m.D, m.dt_proj.bias], grad)
    g_ref = torch.autograd.grad(ref, [x, m.direction_Bs, m.D, m.dt_proj.bias], grad)
    for a, b in zip(g_out, g_ref):
        assert rel_err(a, b) < 1e-4

    # the quirk is observable: reading dt/B/C along the routes (the "clean" variant) gives another answer
    clean = m(x, routes, routes, directions)
    assert rel_err(clean, ref) > 1e-3


def test_corner_padding_and_patch_embed():
    torch.manual_seed(0)
    pe = pm.ConvPatchEmbed(3, 24, num_convs=1, patch_size=16)
    randomize_(pe)
    pe.eval()
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        out = pe(x)
        feat = pe.convs(pe.stem(x))  # (1, 64, 35, 51)
        padded = feat.new_zeros(1, 64, 40, 56)  # next multiples of 8, zeros only bottom/right
        padded[:, :, :35, :51] = feat
        ref = F.conv2d(padded, pe.projection.weight, pe.projection.bias, stride=8).permute(0, 2, 3, 1)
    assert out.shape == (1, 5, 7, 24)
    assert rel_err(out, ref) < 1e-6
    assert pm.corner_pad(torch.ones(1, 1, 16, 8), 8, 8).shape == (1, 1, 16, 8)
    p = pm.corner_pad(torch.ones(1, 1, 9, 17), 8, 8)
    assert p.shape == (1, 1, 16, 24) and p[..., :9, :17].eq(1).all() and p.sum() == 9 * 17
    # the position embedding grid is sized as the official one: from img_size // 2
    assert pe.grid_size((224, 224)) == (14, 14)
    assert pe.grid_size((200, 300)) == (13, 19)


def test_pos_embed_resize_is_bicubic():
    torch.manual_seed(0)
    src = torch.randn(1, 14 * 14, 5)
    out = pm.resize_pos_embed(src, (14, 14), (9, 17)).double()
    grid = src.double().reshape(14, 14, 5)
    ref = torch.einsum('ih,hwc,jw->ijc', cubic_weights(14, 9), grid, cubic_weights(14, 17)).reshape(1, -1, 5)
    assert rel_err(out, ref) < 1e-6
    assert pm.resize_pos_embed(src, (14, 14), (14, 14)) is src


def test_tiny_model_matches_composed_oracle():
    """Whole forward at a size that needs corner padding, pos-embed resize and fresh routes (grid 5×7 vs
    the 14×14 the model was built for), with L1's layer-0 dw-conv replacing x."""
    torch.manual_seed(0)
    model = pm.PlainMamba(embed_dim=16, depth=2, stem_num_convs=1, dwconv_layers=(0,), d_state=4, num_classes=7)
    randomize_(model, seed=1)
    model.eval()
    x = torch.randn(2, 3, 72, 104)
    with torch.no_grad():
        logits = model(x)
        t = model.patch_embed(x)
        Hg, Wg = t.shape[1:3]
        assert (Hg, Wg) == (5, 7)
        pos = torch.einsum('ih,hwc,jw->ijc', cubic_weights(14, Hg).float(),
                           model.pos_embed.reshape(14, 14, -1), cubic_weights(14, Wg).float())
        t = t + pos
        for layer in model.layers:
            t = t + mixer_oracle(layer.mamba, F.layer_norm(t, (16,), layer.norm.weight, layer.norm.bias, 1e-5))
            if layer.dw is not None:  # replaces x: no residual around the dw-conv
                bn = layer.dw[1]
                c = F.conv2d(t.permute(0, 3, 1, 2), layer.dw[0].weight, padding=1, groups=16)
                c = F.batch_norm(c, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0., bn.eps)
                t = F.gelu(c).permute(0, 2, 3, 1)
        t = F.layer_norm(t, (16,), model.norm.weight, model.norm.bias, 1e-6)
        ref = F.linear(t.mean(dim=(1, 2)), model.head.fc.weight, model.head.fc.bias)
    assert rel_err(logits, ref) < 1e-5
    assert model.layers[0].dw is not None and model.layers[1].dw is None


def _official_state_dict(name, seed=0):
    spec = json.loads((DATA / 'official_keys' / f'{name}.json').read_text())['keys']
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in spec.items():
        sd[k] = (torch.randint(0, 100, shape, generator=g) if k.endswith('num_batches_tracked')
                 else torch.randn(shape, generator=g))
    return sd


def test_checkpoint_conversion_from_official_layout(tmp_path):
    sd = _official_state_dict('plainmamba_l1')
    assert 'backbone.ln1.weight' in sd and 'head.fc.weight' in sd and 'backbone.layers.0.dw.0.weight' in sd
    ckpt = {'meta': {'epoch': 300, 'CLASSES': ['a', 'b']}, 'state_dict': dict(sd)}
    ckpt['state_dict']['ema_backbone_pos_embed'] = torch.zeros(1)  # EMA-hook buffer: dropped
    path = tmp_path / 'l1.pth'
    torch.save(ckpt, path)
    model = timm.create_model('plainmamba_l1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    ours = model.state_dict()
    assert torch.equal(ours['norm.weight'], sd['backbone.ln1.weight'])
    assert torch.equal(ours['head.fc.bias'], sd['head.fc.bias'])
    assert torch.equal(ours['layers.3.mamba.direction_Bs'], sd['backbone.layers.3.mamba.direction_Bs'])
    assert torch.equal(ours['patch_embed.convs.1.running_var'], sd['backbone.patch_embed.convs.1.running_var'])
    # every official tensor lands somewhere and nothing of ours is left unconverted
    conv = pm.checkpoint_filter_fn(ckpt, model)
    assert len(conv) == len(sd) and set(conv) == set(ours)

    # at another img_size the 14x14 position embedding is resized bicubically
    m256 = timm.create_model('plainmamba_l1', img_size=256)
    conv = pm.checkpoint_filter_fn(ckpt, m256)
    m256.load_state_dict(conv, strict=True)
    ref = torch.einsum('ih,hwc,jw->ijc', cubic_weights(14, 16), sd['backbone.pos_embed'].double().reshape(14, 14, -1),
                       cubic_weights(14, 16)).reshape(1, 256, -1)
    assert rel_err(m256.pos_embed.double(), ref) < 1e-6


def test_timm_api_bits():
    model = pm.PlainMamba(embed_dim=16, depth=4, stem_num_convs=0, d_state=4, num_classes=5)
    assert [f['reduction'] for f in model.feature_info] == [16] * 4
    nwd = model.no_weight_decay()
    assert {'pos_embed', '*.A_log', '*.D', '*.direction_Bs'} <= nwd
    x = torch.randn(1, 3, 48, 64)
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [t.shape for t in inter] == [torch.Size([1, 16, 3, 4])] * 2
    assert torch.allclose(model.forward_head(final), model(x), atol=1e-6)
    assert model.forward_head(final, pre_logits=True).shape == (1, 16)
    # torch.fx (timm's graph feature extraction): the shape-dependent steps are opaque nodes
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names
    fx = create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])
    assert torch.equal(next(iter(fx(x).values())), model(x))
    model.reset_classifier(0)
    assert model(x).shape == (1, 16)
