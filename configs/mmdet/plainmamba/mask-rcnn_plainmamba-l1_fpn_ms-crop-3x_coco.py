# PlainMamba-L1 Mask R-CNN 3x (multi-scale crop) on COCO.
# Source: no official 3x config: mmdet's Swin-T ms-crop 3x recipe with PlainMamba's optimizer
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', '../_base_/plainmamba.py']
model = dict(backbone=_base_.backbone_l1, neck=dict(in_channels=_base_.channels_l1))
optim_wrapper = dict(paramwise_cfg=_base_.paramwise_cfg)
