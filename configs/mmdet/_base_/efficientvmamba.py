# EfficientVMamba.
# Source: TerryPei/EfficientVMamba detection/configs/efficient/mask_rcnn_vssm_fpn_coco_efficient_*.py
# (mmdet Swin-T Mask R-CNN 1x recipe, trained with AMP: add --amp; MM_EfficientVSSM adds `outnorm{i}`
# LayerNorms; drop_path is the EfficientVSSM default 0.1, which those configs do not override).
_base_ = ['./timm_vmamba.py']
backbone_tiny = dict(_base_.backbone, model_name='efficientvmamba_tiny', drop_path_rate=0.1)
backbone_small = dict(_base_.backbone, model_name='efficientvmamba_small', drop_path_rate=0.1)
backbone_base = dict(_base_.backbone, model_name='efficientvmamba_base', drop_path_rate=0.1)
channels_tiny = [48, 96, 192, 384]
channels_small = [64, 128, 256, 512]
channels_base = [96, 192, 384, 768]
