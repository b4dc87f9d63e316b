"""Every config in configs/mmdet and configs/mmseg loads, builds and runs forward in both modes.

Configs that differ only in the schedule (Mask R-CNN 1x and 3x) describe the same model: one test
loads all of them, checks that their model settings are identical, and builds that model once.
"""
import collections
import copy
import pathlib
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData, PixelData

ROOT = pathlib.Path(__file__).resolve().parents[2] / 'configs'
CUSTOM_IMPORTS = dict(imports=['vmamba_zoo.mm'], allow_failed_imports=False)


def _model_groups():
    groups = collections.defaultdict(list)
    for lib in ('mmdet', 'mmseg'):
        for path in sorted((ROOT / lib).glob('*/*.py')):
            if path.parent.name == '_base_':
                continue
            key = re.sub(r'_(1x|ms-crop-3x)_coco', '_coco', path.stem)
            groups[f'{lib}/{path.parent.name}/{key}'].append(path)
    return dict(groups)


GROUPS = _model_groups()


def test_every_family_has_its_configs():
    names = {p.relative_to(ROOT).as_posix() for paths in GROUPS.values() for p in paths}
    for family, tiny in [('vmamba', 'vmamba-tiny-s1l8'), ('spatialmamba', 'spatialmamba-tiny'),
                         ('efficientvmamba', 'efficientvmamba-tiny'), ('groupmamba', 'groupmamba-tiny'),
                         ('vim2', 'vim2-tiny'), ('plainmamba', 'plainmamba-l1')]:
        for expected in (f'mmdet/{family}/mask-rcnn_{tiny}_fpn_1x_coco.py',
                         f'mmdet/{family}/mask-rcnn_{tiny}_fpn_ms-crop-3x_coco.py',
                         f'mmdet/{family}/retinanet_{tiny}_fpn_1x_coco.py',
                         f'mmseg/{family}/upernet_{tiny}_8xb2-160k_ade20k-512x512.py'):
            assert expected in names


def _load(path):
    text = path.read_text()
    assert re.search(r'^# Source: \S', text, re.M), f'{path}: no "# Source:" line citing the official recipe'
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports == CUSTOM_IMPORTS
    assert cfg.model.backbone.type == 'TimmVMamba'
    return cfg


def _det_sample(height, width, with_mask):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width), scale_factor=(1.0, 1.0)))
    gt = InstanceData()
    gt.bboxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]])
    gt.labels = torch.tensor([3, 17])
    if with_mask:
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        masks[0, 6:50, 4:40] = 1
        masks[1, 10:30, 50:90] = 1
        gt.masks = BitmapMasks(masks.numpy(), height, width)
    sample.gt_instances = gt
    return sample


def _run_detector(model, with_mask):
    size = (64, 96)
    data = dict(inputs=[torch.randint(0, 256, (3, *size), dtype=torch.uint8)],
                data_samples=[_det_sample(*size, with_mask)])
    model.train()
    losses = model(**model.data_preprocessor(copy.deepcopy(data), True), mode='loss')
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(t.sum() for t in v)
                for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total) and total > 0
    model.eval()
    with torch.no_grad():
        (pred,) = model(**model.data_preprocessor(data, False), mode='predict')
    boxes = pred.pred_instances.bboxes
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and torch.isfinite(boxes).all()
    if with_mask:
        assert pred.pred_instances.masks.shape[1:] == size


def _run_segmentor(model, num_classes):
    from mmseg.structures import SegDataSample
    size = (64, 96)
    samples = []
    for _ in range(2):  # BatchNorm after the 1x1 pooling of UperNet's PPM needs 2 images
        s = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size, pad_shape=size))
        s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, *size)))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 256, (3, *size), dtype=torch.uint8) for _ in range(2)], data_samples=samples)
    model.train()
    losses = model(**model.data_preprocessor(copy.deepcopy(data), True), mode='loss')
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total) and total > 0
    model.eval()
    data = dict(inputs=data['inputs'][:1], data_samples=data['data_samples'][:1])
    with torch.no_grad():
        (pred,) = model(**model.data_preprocessor(data, False), mode='predict')
    assert pred.pred_sem_seg.data.shape == (1, *size)
    assert pred.seg_logits.data.shape == (num_classes, *size)


@pytest.mark.parametrize('group', sorted(GROUPS))
def test_config_builds_and_runs_forward(group):
    lib = group.split('/')[0]
    cfgs = [_load(p) for p in GROUPS[group]]
    for other in cfgs[1:]:
        assert other.model.to_dict() == cfgs[0].model.to_dict()
    model_cfg = copy.deepcopy(cfgs[0].model)
    model_cfg.backbone.init_cfg = None  # no downloads in tests
    if lib == 'mmseg':
        model_cfg.data_preprocessor.size = None
        model_cfg.data_preprocessor.size_divisor = 32
    with DefaultScope.overwrite_default_scope(lib):
        registry = __import__(f'{lib}.registry', fromlist=['MODELS']).MODELS
        model = revert_sync_batchnorm(registry.build(model_cfg))
        if lib == 'mmdet':
            _run_detector(model, with_mask='roi_head' in model_cfg and 'mask_head' in model_cfg.roi_head)
        else:
            _run_segmentor(model, model_cfg.decode_head.num_classes)
