# PlainMamba semantic segmentation. Source: ChenhongyiYang/PlainMamba
# downstream/mmsegmentation/plain_mamba_seg_configs/l{1,2,3}_upernet.py (UperNet 160k, AdamW
# lr 6e-5, weight decay 0.01 without decay on norms, pos_embed, A_log, D, direction_Bs; poly
# schedule with 1500 warm-up iterations; drop_path 0.1 / 0.2 / 0.3). The official backbone feeds
# UperNet four stride-16 maps; here the last map goes through the ViTDet-style simple pyramid.
_base_ = ['../../mmdet/_base_/plainmamba.py']
paramwise_cfg = dict(_delete_=True, custom_keys={
    'pos_embed': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.),
    '.A_log': dict(decay_mult=0.),
    '.D': dict(decay_mult=0.),
    '.direction_Bs': dict(decay_mult=0.)})
