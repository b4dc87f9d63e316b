# Spatial-Mamba semantic segmentation. Source: EdwardChasel/Spatial-Mamba segmentation/configs/
# spatialmamba/upernet_spatialmamba_4xb4-160k_ade20k-512x512_{tiny,small,base}.py (mmseg's Swin-T
# UperNet 160k recipe; drop_path 0.2 / 0.3 / 0.5).
_base_ = ['../../mmdet/_base_/spatialmamba.py']
