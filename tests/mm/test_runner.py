"""mmengine's Runner trains each family's Mask R-CNN and UperNet for 2 iterations and validates.

The datasets are written to a temp dir in COCO (polygon instances) and ADE20K formats.
"""
import pathlib

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from .synthetic import COCO_CLASSES as CLASSES, write_ade20k, write_coco

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'
TINY = {
    'vmamba': 'vmamba-tiny-s1l8',
    'spatialmamba': 'spatialmamba-tiny',
    'efficientvmamba': 'efficientvmamba-tiny',
    'groupmamba': 'groupmamba-tiny',
    'vim2': 'vim2-tiny',
    'plainmamba': 'plainmamba-l1',
}


def _common(cfg, work_dir):
    cfg.work_dir = str(work_dir)
    cfg.launcher = 'none'
    cfg.model.backbone.init_cfg = None  # random init: no downloads
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 1
    cfg.log_level = 'WARNING'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False


def _assert_backbone_was_trained(runner):
    optimizer = runner.optim_wrapper.optimizer
    stepped = [p for p in runner.model.backbone.parameters() if p in optimizer.state]
    assert stepped, 'no backbone parameter was updated'
    assert any(optimizer.state[p]['exp_avg'].abs().sum() > 0 for p in stepped)


@pytest.mark.parametrize('family', sorted(TINY))
def test_mask_rcnn_trains_two_iterations_and_validates(tmp_path, family):
    cfg = Config.fromfile(str(CONFIGS / 'mmdet' / family / f'mask-rcnn_{TINY[family]}_fpn_1x_coco.py'))
    _common(cfg, tmp_path / 'work')
    root = tmp_path / 'coco'
    ann_file = write_coco(str(root), num_images=2, height=64, width=96)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='Resize', scale=(96, 64), keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs')]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(96, 64), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
    for loader, pipeline in (('train_dataloader', train_pipeline), ('val_dataloader', test_pipeline),
                             ('test_dataloader', test_pipeline)):
        cfg[loader].batch_size = 1
        cfg[loader].dataset.update(data_root=str(root), ann_file='annotations/instances.json',
                                   data_prefix=dict(img='images/'), pipeline=pipeline, metainfo=dict(classes=CLASSES))
    cfg.val_evaluator = cfg.test_evaluator = dict(type='CocoMetric', ann_file=ann_file, metric=['bbox', 'segm'])
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=100)
    cfg.model.roi_head.bbox_head.num_classes = cfg.model.roi_head.mask_head.num_classes = len(CLASSES)
    cfg.model.test_cfg.rcnn.score_thr = 0.0  # an untrained head still emits boxes to evaluate

    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    _assert_backbone_was_trained(runner)
    metrics = runner.val()
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert 0.0 <= float(metrics[key]) <= 1.0, (key, metrics)


@pytest.mark.parametrize('family', sorted(TINY))
def test_upernet_trains_two_iterations_and_validates(tmp_path, family):
    cfg = Config.fromfile(str(CONFIGS / 'mmseg' / family / f'upernet_{TINY[family]}_8xb2-160k_ade20k-512x512.py'))
    _common(cfg, tmp_path / 'work')
    root = write_ade20k(str(tmp_path / 'ade'), num_images=2, height=64, width=96)
    cfg.model.data_preprocessor.size = (64, 96)
    train_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackSegInputs')]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(96, 64), keep_ratio=True),
        dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='PackSegInputs')]
    # Two images per batch: BatchNorm after UperNet's 1x1 pooling needs more than one value.
    for loader, pipeline, batch in (('train_dataloader', train_pipeline, 2), ('val_dataloader', test_pipeline, 1),
                                    ('test_dataloader', test_pipeline, 1)):
        cfg[loader].batch_size = batch
        cfg[loader].dataset.update(data_root=root, pipeline=pipeline)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)

    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2
    _assert_backbone_was_trained(runner)
    metrics = runner.val()
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert 0.0 <= float(metrics[key]) <= 100.0, (key, metrics)  # percentages
