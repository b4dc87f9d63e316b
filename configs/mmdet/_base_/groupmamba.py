# GroupMamba. The official repository (Amshaker/GroupMamba) releases no detection code; the paper
# trains Mask R-CNN as VMamba does, so the recipe is VMamba's
# (MzeroMiko/VMamba detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py) with GroupMamba-T's
# ImageNet drop_path 0.2 and per-stage output norms.
_base_ = ['./timm_vmamba.py']
backbone_tiny = dict(_base_.backbone, model_name='groupmamba_tiny', drop_path_rate=0.2)
channels_tiny = [64, 128, 348, 448]
