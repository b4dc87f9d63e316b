# EfficientVMamba-B Mask R-CNN 1x on COCO.
# Source: TerryPei/EfficientVMamba detection/configs/efficient/mask_rcnn_vssm_fpn_coco_efficient_2292_96.py (1x schedule)
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../_base_/efficientvmamba.py']
model = dict(backbone=_base_.backbone_base, neck=dict(in_channels=_base_.channels_base))
