"""MMDetection 3.x / MMSegmentation 1.x integration: the only part of vmamba_zoo that imports mm*.

Add ``custom_imports=dict(imports=['vmamba_zoo.mm'], allow_failed_imports=False)`` to a config and
use ``backbone=dict(type='TimmVMamba', model_name='groupmamba_tiny', ...)`` (or a family alias).
"""
from .backbone import (EfficientVMambaBackbone, GroupMambaBackbone, PlainMambaBackbone, SimplePyramidLevel,
                       SpatialMambaBackbone, TimmVMamba, ViM2Backbone, VMambaBackbone)
from .checkpoint import convert_dense_checkpoint, read_checkpoint, select_state_dict

__all__ = [
    'TimmVMamba', 'VMambaBackbone', 'SpatialMambaBackbone', 'EfficientVMambaBackbone', 'GroupMambaBackbone',
    'ViM2Backbone', 'PlainMambaBackbone', 'SimplePyramidLevel', 'convert_dense_checkpoint', 'read_checkpoint',
    'select_state_dict',
]
