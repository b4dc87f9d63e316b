# EfficientVMamba semantic segmentation. The official repository publishes no segmentation config
# (the paper reports UperNet 160k T/S/B); the recipe is that of VMamba, from which it is forked:
# MzeroMiko/VMamba segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py.
_base_ = ['../../mmdet/_base_/efficientvmamba.py']
