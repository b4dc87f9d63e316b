# PlainMamba-L2 Mask R-CNN 1x on COCO.
# Source: ChenhongyiYang/PlainMamba downstream/mmdetection/plain_mamba_det_configs/maskrcnn/l2_maskrcnn_1x.py
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/plainmamba.py']
model = dict(backbone=_base_.backbone_l2, neck=dict(in_channels=_base_.channels_l2))
optim_wrapper = dict(paramwise_cfg=_base_.paramwise_cfg)
