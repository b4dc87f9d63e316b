# Spatial-Mamba.
# Source: EdwardChasel/Spatial-Mamba detection/configs/spatialmamba/mask_rcnn_spatialmamba_fpn_coco_
# {tiny,small,base}.py and {tiny,small}_3x.py (mmdet Swin-T Mask R-CNN 1x / ms-crop-3x recipes;
# drop_path 0.2 / 0.3 / 0.5; MM_SpatialMamba adds `outnorm{i}` LayerNorms).
_base_ = ['./timm_vmamba.py']
backbone_tiny = dict(_base_.backbone, model_name='spatialmamba_tiny', drop_path_rate=0.2)
backbone_small = dict(_base_.backbone, model_name='spatialmamba_small', drop_path_rate=0.3)
backbone_base = dict(_base_.backbone, model_name='spatialmamba_base', drop_path_rate=0.5)
channels_tiny = [64, 128, 256, 512]
channels_small = [64, 128, 256, 512]
channels_base = [96, 192, 384, 768]
