"""ImageNet and dense-prediction checkpoints in official format load through init_cfg."""
import argparse
import json
import pathlib

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from vmamba_zoo.mm import TimmVMamba, convert_dense_checkpoint

KEYS = pathlib.Path(__file__).resolve().parents[1] / 'data' / 'official_keys'


def official_state_dict(name):
    """Random tensors under the official checkpoint's names and shapes."""
    spec = json.loads((KEYS / f'{name}.json').read_text())['keys']
    return {k: torch.randn(shape) for k, shape in spec.items()}


def timm_loaded(name, state_dict, **kwargs):
    """Oracle: timm's own pretrained path (family filter fn, strict load) on the same weights."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(state_dict)), **kwargs)


def assert_body_matches(backbone, reference):
    ref = reference.state_dict()
    body = backbone.body.model.state_dict()
    assert body
    for k, v in body.items():
        torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=0, atol=0, msg=k)


def _meta():
    # Official checkpoints carry such objects; torch.load(weights_only=True) rejects them.
    return dict(args=argparse.Namespace(lr=1e-3, model='x'), epoch=np.int64(299), acc=np.float64(82.6))


def _ema(sd):
    return {k: v * 0.5 + 1 for k, v in sd.items()}


@pytest.mark.parametrize('name, wrap, use_ema', [
    ('vmamba_tiny_s1l8', lambda sd: dict(model=sd, optimizer={}, config=_meta()), False),
    # Swin-style {'model', 'model_ema'}: the EMA weights on request.
    ('spatialmamba_tiny', lambda sd: dict(model=sd, model_ema=_ema(sd), max_accuracy=83.5), True),
    ('efficientvmamba_tiny', lambda sd: dict(state_dict={'module.' + k: v for k, v in sd.items()}, epoch=np.int64(3)), False),
    ('groupmamba_tiny', None, False),  # bare state dict in .safetensors
    ('plainmamba_l1', lambda sd: dict(meta=_meta(), state_dict=sd), False),
])
def test_official_imagenet_checkpoint_loads_through_init_cfg(tmp_path, name, wrap, use_ema):
    sd = official_state_dict(name)
    if wrap is None:
        path = tmp_path / 'weights.safetensors'
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / 'weights.pth'
        torch.save(wrap(sd), path)
    backbone = TimmVMamba(name, init_cfg=dict(type='Pretrained', checkpoint=str(path), use_ema=use_ema))
    backbone.init_weights()
    assert_body_matches(backbone, timm_loaded(name, _ema(sd) if use_ema else sd))
    assert backbone.is_init


def test_dense_checkpoint_backbone_and_outnorms(tmp_path):
    """An official VMamba detection checkpoint: backbone.* with outnorm{i}, no classifier."""
    sd = {k: v for k, v in official_state_dict('vmamba_tiny_s1l8').items() if not k.startswith('classifier.')}
    outnorms = {f'outnorm{i}.{p}': torch.randn(c) for i, c in enumerate((96, 192, 384, 768)) for p in ('weight', 'bias')}
    dense = {f'backbone.{k}': v for k, v in {**sd, **outnorms}.items()}
    dense['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 96, 1, 1)
    path = tmp_path / 'mask_rcnn_vssm_fpn_coco_tiny.pth'
    torch.save(dict(meta=_meta(), state_dict=dense), path)
    backbone = TimmVMamba('vmamba_tiny_s1l8', init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    backbone.init_weights()
    for k, v in outnorms.items():
        torch.testing.assert_close(backbone.state_dict()[k], v, rtol=0, atol=0)
    full_sd = dict(sd, **{k: torch.zeros(v) for k, v in (('classifier.head.weight', (1000, 768)), ('classifier.head.bias', (1000,)))})
    full_sd.update({'classifier.norm.weight': torch.ones(768), 'classifier.norm.bias': torch.zeros(768)})
    assert_body_matches(backbone, timm_loaded('vmamba_tiny_s1l8', full_sd))

    converted = convert_dense_checkpoint(dense, backbone)
    assert converted['neck.lateral_convs.0.conv.weight'] is dense['neck.lateral_convs.0.conv.weight']
    own = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    assert set(converted) - {'neck.lateral_convs.0.conv.weight'} == set(own)
    for k, v in own.items():
        torch.testing.assert_close(converted[k], v, rtol=0, atol=0)


def test_key_mismatch_names_the_keys(tmp_path):
    sd = official_state_dict('groupmamba_tiny')
    dropped = next(k for k in sd if k.startswith('block1.0.'))
    del sd[dropped]
    sd['block1.0.not_a_parameter'] = torch.zeros(3)
    path = tmp_path / 'bad.pth'
    torch.save(dict(model=sd), path)
    backbone = TimmVMamba('groupmamba_tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError) as err:
        backbone.init_weights()
    message = str(err.value)
    assert 'missing keys (1)' in message and 'unexpected keys (1)' in message
    assert 'not_a_parameter' in message and str(path) in message


def test_missing_prefix_and_file_are_reported(tmp_path):
    path = tmp_path / 'cls.pth'
    torch.save(dict(model=official_state_dict('groupmamba_tiny')), path)
    backbone = TimmVMamba('groupmamba_tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    with pytest.raises(ValueError, match="prefix 'backbone.'"):
        backbone.init_weights()
    with pytest.raises(FileNotFoundError):
        TimmVMamba('groupmamba_tiny', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'none.pth'))).init_weights()


def test_official_weights_are_located_or_explained():
    from vmamba_zoo.mm.checkpoint import official_weights_location
    assert official_weights_location('vmamba_tiny_s1l8').startswith('https://github.com/MzeroMiko/VMamba/releases/')
    with pytest.raises(ValueError, match='download the file and set init_cfg.checkpoint'):
        official_weights_location('spatialmamba_tiny')  # Google Drive
    with pytest.raises(ValueError, match='no official ImageNet weights'):
        TimmVMamba('vmamba_tiny_mhs', out_indices=(0,), init_cfg=dict(type='Pretrained', checkpoint='official')).init_weights()
