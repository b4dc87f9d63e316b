# VMamba v2 (and the MHS-VM multi-head scan on VMamba-T).
# Source: MzeroMiko/VMamba detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny{,_ms_3x}.py
# (mmdet Swin-T Mask R-CNN recipes; drop_path 0.2; per-stage `outnorm{i}` as in detection/model.py).
# The README's S/B detection results are for the s2l15 variants, which the zoo does not register.
_base_ = ['./timm_vmamba.py']
backbone_tiny = dict(_base_.backbone, model_name='vmamba_tiny_s1l8', drop_path_rate=0.2)
backbone_tiny_mhs = dict(_base_.backbone, model_name='vmamba_tiny_mhs', drop_path_rate=0.2,
                         init_cfg=None)  # MHS-VM publishes no ImageNet weights
channels_tiny = [96, 192, 384, 768]
