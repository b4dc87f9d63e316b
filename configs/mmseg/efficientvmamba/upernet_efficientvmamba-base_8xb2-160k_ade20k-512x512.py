# EfficientVMamba-B UperNet 160k on ADE20K, 512x512 crops.
# Source: MzeroMiko/VMamba segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py (EfficientVMamba publishes no segmentation config)
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
           '../_base_/efficientvmamba.py']
model = dict(
    backbone=_base_.backbone_base,
    decode_head=dict(in_channels=_base_.channels_base),
    auxiliary_head=dict(in_channels=_base_.channels_base[2]))
