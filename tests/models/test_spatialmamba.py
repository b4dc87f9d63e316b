"""Spatial-Mamba specifics against oracles written here: state fusion (dilated form, merged 11×11 kernel,
replicate borders), the structure-aware SSM against a per-step recurrence, and official checkpoint conversion."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vmamba_zoo.layers.state_fusion import FUSION_IMPLS, StateFusion, merge_dilated_kernels
from vmamba_zoo.models.spatialmamba import (
    MIXER_LAYOUTS, SpatialMambaBlock, StructureAwareSSM, checkpoint_filter_fn, spatialmamba_tiny)

KEYS_DIR = Path(__file__).resolve().parents[1] / "data" / "official_keys"
DILATIONS = (1, 3, 5)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def fusion_oracle(h, weight, alpha, dilations):
    """Σ_i α_i Σ_{a,b} w_i[a, b] · h[clamp(y + d_i (a - 1)), clamp(x + d_i (b - 1))], by gathering."""
    _, _, H, W = h.shape
    ys, xs = torch.arange(H), torch.arange(W)
    out = torch.zeros_like(h)
    for i, d in enumerate(dilations):
        for a in range(3):
            for b in range(3):
                rows = (ys + d * (a - 1)).clamp(0, H - 1)
                cols = (xs + d * (b - 1)).clamp(0, W - 1)
                tap = h[:, :, rows][:, :, :, cols]
                out = out + alpha[i] * weight[i, :, 0, a, b].view(1, -1, 1, 1) * tap
    return out


def random_fusion(dim, seed):
    g = torch.Generator().manual_seed(seed)
    f = StateFusion(dim)
    with torch.no_grad():
        f.weight.copy_(torch.randn(f.weight.shape, generator=g))
        f.alpha.copy_(torch.randn(3, generator=g))
    return f


@pytest.mark.parametrize("size", [(9, 13), (4, 3), (1, 7)])
def test_state_fusion_matches_replicate_padded_oracle(size):
    f = random_fusion(6, seed=size[0])
    h = torch.randn(2, 6, *size, dtype=torch.float64)
    f = f.double()
    expected = fusion_oracle(h, f.weight, f.alpha, DILATIONS)
    assert rel_err(f.forward_dilated(h), expected) < 1e-12
    assert rel_err(f.forward_merged(h), expected) < 1e-12


def test_state_fusion_borders_are_replicated_not_zero_padded():
    f = random_fusion(4, seed=1).double()
    h = torch.randn(1, 4, 12, 12, dtype=torch.float64) + 3.0
    zero_padded = sum(
        f.alpha[i] * F.conv2d(h, f.weight[i], padding=d, dilation=d, groups=4) for i, d in enumerate(DILATIONS))
    out = f(h)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    assert rel_err(out[inner], zero_padded[inner]) < 1e-12
    assert rel_err(out, zero_padded) > 1e-2


def test_merged_kernel_places_every_dilated_tap():
    f = random_fusion(5, seed=2)
    expected = torch.zeros(5, 1, 11, 11)
    for i, d in enumerate(DILATIONS):
        for a in range(3):
            for b in range(3):
                expected[:, 0, 5 + d * (a - 1), 5 + d * (b - 1)] += f.alpha[i] * f.weight[i, :, 0, a, b]
    torch.testing.assert_close(f.merged_kernel(), expected, rtol=0, atol=1e-6)


def test_state_fusion_train_form_equals_eval_merged_form_with_grads():
    f = random_fusion(8, seed=3)
    f.merge_at_eval = True
    h = torch.randn(2, 8, 10, 7)
    train_out = f.train()(h)
    train_grads = torch.autograd.grad(train_out.square().sum(), [f.weight, f.alpha])
    eval_out = f.eval()(h)
    eval_grads = torch.autograd.grad(eval_out.square().sum(), [f.weight, f.alpha])
    assert rel_err(eval_out, train_out) < 1e-5
    for ge, gt in zip(eval_grads, train_grads):
        assert rel_err(ge, gt) < 1e-4
    # the merged kernel follows parameter updates (no stale cache)
    with torch.no_grad():
        f.alpha.mul_(2)
    assert rel_err(f(h), 2 * eval_out) < 1e-5


def plain_fusion(h, weight, alpha, dilations):
    """The official training form: replicate pad, dilated depthwise F.conv2d, scale by α, per dilation, NCHW."""
    out = 0
    for i, d in enumerate(dilations):
        out = out + alpha[i] * F.conv2d(F.pad(h, (d,) * 4, mode="replicate"), weight[i], dilation=d, groups=h.shape[1])
    return out


@pytest.mark.parametrize("impl", FUSION_IMPLS)
@pytest.mark.parametrize("train", [True, False])
def test_state_fusion_impls_match_plain_nchw_convs_with_grads(impl, train):
    f = random_fusion(6, seed=4)
    f.impl = impl
    f.train(train)
    h = torch.randn(2, 6, 11, 8, requires_grad=True)
    out = f(h)
    expected = plain_fusion(h, f.weight, f.alpha, DILATIONS)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5
    g = torch.randn_like(expected)
    grads = torch.autograd.grad(out, [h, f.weight, f.alpha], g)
    ref_grads = torch.autograd.grad(expected, [h, f.weight, f.alpha], g)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5
    if f.resolved_impl() in ("channels_last", "fused"):  # a channels-last caller reads the result as (B, H, W, C), no copy
        assert out.permute(0, 2, 3, 1).is_contiguous()
    assert f.resolved_impl() == (("nchw" if train else "channels_last") if impl == "auto" else impl)


def test_state_fusion_channels_last_casts_once_to_the_autocast_dtype():
    f = random_fusion(4, seed=5)
    h = torch.randn(1, 4, 7, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(h)
    assert out.dtype == torch.bfloat16
    expected = plain_fusion(h.bfloat16().double(), f.weight.double(), f.alpha.double(), DILATIONS)
    assert rel_err(out.double(), expected) < 2e-2


def test_state_fusion_init_and_validation():
    f = StateFusion(4)
    assert torch.equal(f.weight, torch.ones(3, 4, 1, 3, 3)) and torch.equal(f.alpha, torch.ones(3))
    with pytest.raises(ValueError):
        f(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError):
        merge_dilated_kernels(torch.ones(2, 4, 1, 3, 3), torch.ones(3), DILATIONS)


def sassm_oracle(m, x):
    """StructureAwareSSM written out: per-step Mamba recurrence with d_state 1, then fusion, C·h + D·x."""
    Bt, H, W, _ = x.shape
    xz = x @ m.in_proj.weight.T
    u, z = xz.chunk(2, dim=-1)
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), m.conv.weight, m.conv.bias, padding=1, groups=m.d_inner))
    u = u.flatten(2)  # (Bt, Di, L), raster order
    proj = torch.einsum("rd,bdl->brl", m.x_proj.weight, u)
    dt_low, Bs, Cs = proj[:, :m.dt_rank], proj[:, m.dt_rank], proj[:, m.dt_rank + 1]
    delta = F.softplus(torch.einsum("dr,brl->bdl", m.dt_proj.weight, dt_low) + m.dt_proj.bias[:, None])
    A = -torch.exp(m.A_log[:, 0])
    h = torch.zeros(Bt, m.d_inner, dtype=x.dtype)
    states = []
    for t in range(H * W):
        h = torch.exp(delta[:, :, t] * A) * h + delta[:, :, t] * Bs[:, None, t] * u[:, :, t]
        states.append(h)
    states = torch.stack(states, -1).view(Bt, m.d_inner, H, W)
    fused = fusion_oracle(states, m.state_fusion.weight, m.state_fusion.alpha, DILATIONS).flatten(2)
    y = fused * Cs[:, None] + u * m.D[:, None]
    y = F.layer_norm(y.transpose(1, 2), (m.d_inner,), m.out_norm.weight, m.out_norm.bias).view(Bt, H, W, -1)
    return (y * F.silu(z)) @ m.out_proj.weight.T


def test_structure_aware_ssm_matches_per_step_recurrence():
    torch.manual_seed(0)
    m = StructureAwareSSM(16).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 6, 16, dtype=torch.float64)
    expected = sassm_oracle(m, x)
    assert rel_err(m.train()(x), expected) < 1e-10
    assert rel_err(m.eval()(x), expected) < 1e-10


def test_structure_aware_ssm_rejects_other_state_sizes():
    with pytest.raises(ValueError):
        StructureAwareSSM(16, d_state=4)
    with pytest.raises(ValueError):
        StructureAwareSSM(16, layout="nhwc")
    with pytest.raises(ValueError):
        StateFusion(16, impl="unfold")


@pytest.mark.parametrize("layout", MIXER_LAYOUTS)
def test_structure_aware_ssm_layouts_match_per_step_recurrence(layout):
    torch.manual_seed(1)
    m = StructureAwareSSM(16, layout=layout).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 4, 7, 16, dtype=torch.float64)
    assert rel_err(m(x), sassm_oracle(m, x)) < 1e-10


@pytest.mark.parametrize("layouts", [dict(mixer_layout="channels_last", fusion_impl="channels_last"), dict(),
                                     dict(mixer_layout="channels_last", fusion_impl="fused")],
                         ids=["channels_last", "auto", "fused"])
@pytest.mark.parametrize("train", [True, False])
def test_block_matches_nchw_baseline_outputs_and_gradients(layouts, train):
    torch.manual_seed(2)
    base = SpatialMambaBlock(16, mixer_layout="channels_first", fusion_impl="nchw").train(train)
    fast = SpatialMambaBlock(16, **layouts).train(train)
    assert fast.mixer.layout == layouts.get("mixer_layout", "auto")
    assert fast.mixer.state_fusion.impl == layouts.get("fusion_impl", "auto")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert base.state_dict().keys() == fast.state_dict().keys()
    fast.load_state_dict(base.state_dict())
    x = torch.randn(2, 6, 5, 16, requires_grad=True)
    outs, grads = [], []
    for m in (base, fast):
        out = m(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x] + list(m.parameters())))
    assert rel_err(outs[1], outs[0]) < 1e-5
    for (name, _), gb, gf in zip(base.named_parameters(), grads[0][1:], grads[1][1:]):
        assert rel_err(gf, gb) < 1e-4, name
    assert rel_err(grads[1][0], grads[0][0]) < 1e-5


@pytest.fixture(scope="module")
def tiny():
    return spatialmamba_tiny()


def _official_state_dict(seed=0):
    spec = json.loads((KEYS_DIR / "spatialmamba_tiny.json").read_text())["keys"]
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(shape, generator=g) if shape else torch.tensor(7)) for k, shape in spec.items()}


def test_checkpoint_conversion_maps_official_tensors(tiny):
    official = _official_state_dict()
    model = tiny
    converted = checkpoint_filter_fn({"model": official, "model_ema": {}}, model)
    model.load_state_dict(converted, strict=True)
    sd = model.state_dict()
    blk = "layers.2.blocks.5.self_attention."
    ours = "stages.2.blocks.5.mixer."
    fusion = torch.stack([official[blk + f"state_fusion.{n}"] for n in ("kernel_3", "kernel_3_1", "kernel_3_2")])
    assert torch.equal(sd[ours + "state_fusion.weight"], fusion)
    for theirs, mine in [("x_proj_weight", "x_proj.weight"), ("dt_projs_weight", "dt_proj.weight"),
                         ("dt_projs_bias", "dt_proj.bias"), ("A_logs", "A_log"), ("Ds", "D"),
                         ("conv2d.weight", "conv.weight"), ("state_fusion.alpha", "state_fusion.alpha")]:
        assert torch.equal(sd[ours + mine], official[blk + theirs]), theirs
    assert torch.equal(sd["stages.2.blocks.5.norm1.weight"], official["layers.2.blocks.5.ln_1.weight"])
    # the official downsample ends stage i; ours starts stage i + 1
    assert torch.equal(sd["stages.3.downsample.conv3.norm.running_var"],
                       official["layers.2.downsample.conv.2.norm.running_var"])
    assert torch.equal(sd["stem.conv3.1.conv.weight"], official["patch_embed.conv3.1.conv.weight"])
    assert torch.equal(sd["head.fc.weight"], official["head.weight"])


def test_checkpoint_conversion_unwraps_prefixes_and_drops_detection_extras(tiny):
    official = _official_state_dict()
    model = tiny
    reference = checkpoint_filter_fn({"model": official}, model)
    ddp = {"module." + k: v for k, v in official.items()}
    assert checkpoint_filter_fn({"model_ema": ddp}, model).keys() == reference.keys()
    det = {"backbone." + k: v for k, v in official.items()}
    det["backbone.outnorm0.weight"] = torch.ones(64)
    det["neck.lateral_convs.0.conv.weight"] = torch.ones(1)
    converted = checkpoint_filter_fn({"state_dict": det}, model)
    assert converted.keys() == reference.keys()
    # our own state dict passes through untouched
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model).keys() == own.keys()


def test_model_eval_merged_matches_default_and_input_sizes():
    torch.manual_seed(0)
    model = spatialmamba_tiny(depths=(1, 1, 1, 1), num_classes=10).eval()
    merged = spatialmamba_tiny(depths=(1, 1, 1, 1), num_classes=10, fusion_merge_at_eval=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        merged.load_state_dict(model.state_dict())
        x = torch.randn(1, 3, 72, 104)
        a, b = model(x), merged(x)
    assert a.shape == (1, 10)
    assert rel_err(b, a) < 1e-5
    assert not math.isnan(a.sum().item())
