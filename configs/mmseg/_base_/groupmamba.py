# GroupMamba semantic segmentation. No official config is published; the recipe is VMamba's:
# MzeroMiko/VMamba segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py.
_base_ = ['../../mmdet/_base_/groupmamba.py']
