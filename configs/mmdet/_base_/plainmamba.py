# PlainMamba. Source: ChenhongyiYang/PlainMamba downstream/mmdetection/plain_mamba_det_configs/
# template/{maskrcnn,retinanet}_1x.py and maskrcnn/l{1,2,3}_maskrcnn_1x.py (AdamW lr 1e-4, weight
# decay 0.05 without decay on norms, biases, pos_embed, A_log, D, direction_Bs; drop_path
# 0.1 / 0.2 / 0.3; RetinaNet clips gradients at 35).
# The official PlainMamba-Adapter (ViT-Adapter with deformable attention) is NOT reproduced: the
# stride-16 map of the last layer feeds FPN through a ViTDet-style simple feature pyramid.
_base_ = ['./timm_vmamba.py']
backbone = dict(_base_.backbone, out_indices=(-1, ), pyramid_scales=(4, 2, 1, 0.5))
backbone_l1 = dict(backbone, model_name='plainmamba_l1', drop_path_rate=0.1)
backbone_l2 = dict(backbone, model_name='plainmamba_l2', drop_path_rate=0.2)
backbone_l3 = dict(backbone, model_name='plainmamba_l3', drop_path_rate=0.3)
# Pyramid levels at strides 4, 8, 16, 32 carry dim/4, dim/2, dim, dim channels.
channels_l1 = [48, 96, 192, 192]
channels_l2 = [96, 192, 384, 384]
channels_l3 = [112, 224, 448, 448]
paramwise_cfg = dict(custom_keys={
    'pos_embed': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.),
    'bias': dict(decay_mult=0.),
    '.A_log': dict(decay_mult=0.),
    '.D': dict(decay_mult=0.),
    '.direction_Bs': dict(decay_mult=0.)})
