# VMamba v2 semantic segmentation. Source: MzeroMiko/VMamba
# segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py (mmseg's Swin-T UperNet
# 160k recipe: AdamW lr 6e-5, weight decay 0.01, poly schedule, 1500 warm-up iterations,
# 16 images per batch; drop_path 0.2). Backbone variants come from the detection family file.
_base_ = ['../../mmdet/_base_/vmamba.py']
