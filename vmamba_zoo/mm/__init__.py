"""MMDetection / MMSegmentation backbones (the only place that imports mmengine, mmdet, mmseg)."""
