# PlainMamba-L3 UperNet 160k on ADE20K, 512x512 crops: the L1 config with the L3 backbone.
# Source: ChenhongyiYang/PlainMamba downstream/mmsegmentation/plain_mamba_seg_configs/l3_upernet.py
_base_ = ['./upernet_plainmamba-l1_8xb2-160k_ade20k-512x512.py']
model = dict(
    backbone=_base_.backbone_l3,
    decode_head=dict(in_channels=_base_.channels_l3),
    auxiliary_head=dict(in_channels=_base_.channels_l3[2]))
