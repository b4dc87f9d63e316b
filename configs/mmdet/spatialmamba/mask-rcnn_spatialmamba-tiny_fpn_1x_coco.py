# Spatial-Mamba-T Mask R-CNN 1x on COCO.
# Source: EdwardChasel/Spatial-Mamba detection/configs/spatialmamba/mask_rcnn_spatialmamba_fpn_coco_tiny.py
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/spatialmamba.py']
model = dict(backbone=_base_.backbone_tiny, neck=dict(in_channels=_base_.channels_tiny))
