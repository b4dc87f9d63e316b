# ViM2 (MambaMixer). No official code or weights exist (arXiv 2403.19888 reports no dense
# prediction); the recipe is VMamba's (MzeroMiko/VMamba
# detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py), training from scratch unless a zoo
# ImageNet checkpoint is given.
_base_ = ['./timm_vmamba.py']
backbone_tiny = dict(_base_.backbone, model_name='vim2_tiny', drop_path_rate=0.2, init_cfg=None)
channels_tiny = [96, 192, 384, 768]
