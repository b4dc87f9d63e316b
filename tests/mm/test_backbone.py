"""TimmVMamba: the zoo's timm models as mmdet/mmseg backbones."""
import pytest
import timm
import torch
import torch.nn.functional as F

from vmamba_zoo.mm import TimmVMamba


def _timm_features(name, backbone, **kwargs):
    """The plain timm features model with the backbone's weights: the oracle for its maps."""
    ref = timm.create_model(name, features_only=True, out_indices=backbone.out_indices, feature_cls='getter', **kwargs)
    ref.load_state_dict(backbone.body.state_dict())
    return ref.eval()


def _layer_norm_2d(x, norm):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, 1e-5).permute(0, 3, 1, 2)


@pytest.mark.parametrize('size', [(64, 96), (96, 64)])
def test_stage_maps_are_the_timm_features_with_output_norms(size):
    backbone = TimmVMamba('vmamba_tiny_s1l8').eval()
    for i in backbone.out_indices:  # non-trivial affine parameters
        norm = getattr(backbone, f'outnorm{i}')
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    ref = _timm_features('vmamba_tiny_s1l8', backbone)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        outs, expected = backbone(x), ref(x)
    assert backbone.out_strides == (4, 8, 16, 32)
    assert len(outs) == 4
    for i, out, raw, stride, chs in zip(backbone.out_indices, outs, expected, backbone.out_strides, backbone.out_channels):
        assert out.shape == (2, chs, size[0] // stride, size[1] // stride)
        torch.testing.assert_close(out, _layer_norm_2d(raw, getattr(backbone, f'outnorm{i}')), rtol=1e-5, atol=1e-5)


def test_out_indices_subset_and_no_norms():
    backbone = TimmVMamba('groupmamba_tiny', out_indices=(1, 3), out_norms=False).eval()
    assert backbone.out_channels == (128, 448) and backbone.out_strides == (8, 32)
    assert not any(n.startswith('outnorm') for n, _ in backbone.named_parameters())
    ref = _timm_features('groupmamba_tiny', backbone)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for out, raw in zip(backbone(x), ref(x)):
            torch.testing.assert_close(out, raw)


def test_simple_pyramid_from_the_stride16_map():
    backbone = TimmVMamba('plainmamba_l1', out_indices=(-1,), pyramid_scales=(4, 2, 1, 0.5)).eval()
    assert backbone.out_indices == (23,)
    assert backbone.out_channels == (48, 96, 192, 192) and backbone.out_strides == (4, 8, 16, 32)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = backbone(x)
        (raw,) = _timm_features('plainmamba_l1', backbone)(x)
    base = _layer_norm_2d(raw, backbone.outnorm23)
    for out, chs, stride in zip(outs, backbone.out_channels, backbone.out_strides):
        assert out.shape == (1, chs, 64 // stride, 96 // stride)
    torch.testing.assert_close(outs[2], base)
    torch.testing.assert_close(outs[3], F.max_pool2d(base, 2))
    up2 = backbone.pyramid[1][0]
    torch.testing.assert_close(outs[1], F.conv_transpose2d(base, up2.weight, up2.bias, stride=2))
    first, norm, _, second = backbone.pyramid[0]
    mid = F.conv_transpose2d(base, first.weight, first.bias, stride=2)
    mid = F.gelu(_layer_norm_2d_eps(mid, norm))
    torch.testing.assert_close(outs[0], F.conv_transpose2d(mid, second.weight, second.bias, stride=2), rtol=1e-4, atol=1e-5)


def _layer_norm_2d_eps(x, norm):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


def test_frozen_stages_stop_gradients_and_stay_in_eval():
    backbone = TimmVMamba('vmamba_tiny_s1l8', frozen_stages=2).train()
    names = dict(backbone.named_parameters())
    frozen = {n for n, p in names.items() if not p.requires_grad}
    for n in names:
        inner = n[len('body.model.'):] if n.startswith('body.model.') else None
        should_freeze = inner is not None and inner.startswith(('stem.', 'stages.0.', 'stages.1.'))
        should_freeze |= n.startswith(('outnorm0.', 'outnorm1.'))
        assert (n in frozen) == should_freeze, n
    assert not backbone.body.model.stages[1].training and backbone.body.model.stages[2].training
    sum(o.square().mean() for o in backbone(torch.randn(1, 3, 64, 64))).backward()
    for n, p in names.items():
        assert (p.grad is None) == (n in frozen), n


def test_norm_eval_keeps_batchnorm_statistics():
    backbone = TimmVMamba('spatialmamba_tiny', norm_eval=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    backbone(torch.randn(2, 3, 64, 64))
    for m, b in zip(bns, before):
        torch.testing.assert_close(m.running_mean, b, rtol=0, atol=0)
    assert backbone.body.model.stages[0].training  # only the norms are held in eval mode


def test_grad_checkpointing_matches_plain_backward():
    plain = TimmVMamba('groupmamba_tiny', out_indices=(0, 1)).train()
    ckpt = TimmVMamba('groupmamba_tiny', out_indices=(0, 1), with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    losses = [sum(o.square().mean() for o in m(x)) for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_drop_path_rate_reaches_the_timm_model():
    backbone = TimmVMamba('vmamba_tiny_s1l8', drop_path_rate=0.3)
    rates = [m.drop_prob for m in backbone.modules() if hasattr(m, 'drop_prob')]
    assert rates and max(rates) == pytest.approx(0.3)


def test_found_from_mmdet_and_mmseg_scopes_with_family_aliases():
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS
    for registry, scope in ((DET_MODELS, 'mmdet'), (SEG_MODELS, 'mmseg')):
        with DefaultScope.overwrite_default_scope(scope):
            backbone = registry.build(dict(type='TimmVMamba', model_name='groupmamba_tiny', out_indices=(3,)))
        assert isinstance(backbone, TimmVMamba) and backbone.out_channels == (448,)
    with DefaultScope.overwrite_default_scope('mmseg'):
        alias = SEG_MODELS.build(dict(type='PlainMambaBackbone', drop_path_rate=0.1))
    assert isinstance(alias, TimmVMamba) and alias.model_name == 'plainmamba_l1'
    assert alias.out_strides == (4, 8, 16, 32) and alias.out_channels == (48, 96, 192, 192)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match='not a registered timm model'):
        TimmVMamba('no_such_mamba')
    with pytest.raises(ValueError, match='pyramid_scales'):
        TimmVMamba('plainmamba_l1', out_indices=(5, 11), pyramid_scales=(4, 2, 1))
    with pytest.raises(ValueError, match='power of 2'):
        TimmVMamba('plainmamba_l1', out_indices=(-1,), pyramid_scales=(3,))
    with pytest.raises(ValueError, match='frozen_stages'):
        TimmVMamba('groupmamba_tiny', frozen_stages=-2)
    with pytest.raises(ValueError, match='B, C, H, W'):
        TimmVMamba('groupmamba_tiny', out_indices=(0,))(torch.randn(3, 64, 64))
