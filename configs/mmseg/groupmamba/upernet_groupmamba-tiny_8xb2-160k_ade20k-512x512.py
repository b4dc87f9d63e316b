# GroupMamba-T UperNet 160k on ADE20K, 512x512 crops.
# Source: MzeroMiko/VMamba segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py (GroupMamba publishes no segmentation config)
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
           '../_base_/groupmamba.py']
model = dict(
    backbone=_base_.backbone_tiny,
    decode_head=dict(in_channels=_base_.channels_tiny),
    auxiliary_head=dict(in_channels=_base_.channels_tiny[2]))
