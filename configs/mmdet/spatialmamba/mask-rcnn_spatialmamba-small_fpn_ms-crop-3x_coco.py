# Spatial-Mamba-S Mask R-CNN 3x (multi-scale crop) on COCO.
# Source: EdwardChasel/Spatial-Mamba detection/configs/spatialmamba/mask_rcnn_spatialmamba_fpn_coco_small_3x.py
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py', '../_base_/spatialmamba.py']
model = dict(backbone=_base_.backbone_small, neck=dict(in_channels=_base_.channels_small))
