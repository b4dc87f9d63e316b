# GroupMamba-T RetinaNet 1x on COCO.
# Source: no official RetinaNet config: mmdet's Swin-T RetinaNet 1x with the family's Mask R-CNN
# optimizer (AdamW lr 1e-4, weight decay 0.05) instead of SGD
_base_ = ['mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/groupmamba.py']
model = dict(
    backbone=dict(_base_.backbone_tiny, out_indices=(1, 2, 3)),
    neck=dict(in_channels=_base_.channels_tiny[1:]))
optim_wrapper = dict(optimizer=_base_.adamw, paramwise_cfg=_base_.swin_paramwise_cfg)
