# PlainMamba-L1 RetinaNet 1x on COCO.
# Source: ChenhongyiYang/PlainMamba downstream/mmdetection/plain_mamba_det_configs/retinanet/l1_retinanet_1x.py
_base_ = ['mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/plainmamba.py']
model = dict(
    backbone=dict(_base_.backbone_l1, pyramid_scales=(2, 1, 0.5)),
    neck=dict(in_channels=_base_.channels_l1[1:]))
optim_wrapper = dict(
    optimizer=_base_.adamw, paramwise_cfg=_base_.paramwise_cfg,
    clip_grad=dict(max_norm=35, norm_type=2))
