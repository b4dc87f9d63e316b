# ViM2-T Mask R-CNN 1x on COCO.
# Source: MzeroMiko/VMamba detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py (ViM2 has no official code)
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/vim2.py']
model = dict(backbone=_base_.backbone_tiny, neck=dict(in_channels=_base_.channels_tiny))
