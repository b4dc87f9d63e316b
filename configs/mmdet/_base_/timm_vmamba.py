# Settings shared by every zoo family's detection configs (the family files inherit this one).
custom_imports = dict(imports=['vmamba_zoo.mm'], allow_failed_imports=False)
# 'official' fetches the official ImageNet weights that the model's timm pretrained_cfg names and
# converts them through the family's checkpoint_filter_fn; point `checkpoint` at a local
# .pth/.ckpt/.safetensors file (official or zoo format) instead with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH.
backbone = dict(
    _delete_=True,
    type='TimmVMamba',
    out_indices=(0, 1, 2, 3),
    out_norms=True,
    init_cfg=dict(type='Pretrained', checkpoint='official'))
# Swin's no-decay keys, which the official VMamba / Spatial-Mamba / EfficientVMamba detection
# configs inherit from mmdet's Swin Mask R-CNN config.
swin_paramwise_cfg = dict(custom_keys={
    'absolute_pos_embed': dict(decay_mult=0.),
    'relative_position_bias_table': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.)})
# The Mask R-CNN optimizer of those configs; RetinaNet configs use it instead of mmdet's SGD, as
# PlainMamba's official RetinaNet template does.
adamw = dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
