# Spatial-Mamba-B UperNet 160k on ADE20K, 512x512 crops.
# Source: EdwardChasel/Spatial-Mamba segmentation/configs/spatialmamba/upernet_spatialmamba_4xb4-160k_ade20k-512x512_base.py
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
           '../_base_/spatialmamba.py']
model = dict(
    backbone=_base_.backbone_base,
    decode_head=dict(in_channels=_base_.channels_base),
    auxiliary_head=dict(in_channels=_base_.channels_base[2]))
