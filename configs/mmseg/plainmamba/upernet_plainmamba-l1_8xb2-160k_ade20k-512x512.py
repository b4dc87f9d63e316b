# PlainMamba-L1 UperNet 160k on ADE20K, 512x512 crops.
# Source: ChenhongyiYang/PlainMamba downstream/mmsegmentation/plain_mamba_seg_configs/l1_upernet.py
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
           '../_base_/plainmamba.py']
model = dict(
    backbone=_base_.backbone_l1,
    decode_head=dict(in_channels=_base_.channels_l1),
    auxiliary_head=dict(in_channels=_base_.channels_l1[2]))
optim_wrapper = dict(paramwise_cfg=_base_.paramwise_cfg)
