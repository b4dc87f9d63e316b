# VMamba-T (s1l8) Mask R-CNN 3x (multi-scale crop) on COCO.
# Source: MzeroMiko/VMamba detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', '../_base_/vmamba.py']
model = dict(backbone=_base_.backbone_tiny, neck=dict(in_channels=_base_.channels_tiny))
