"""MMDetection 3.x / MMSegmentation 1.x integration: the only part of vmamba_zoo that imports mm*.

Add ``custom_imports=dict(imports=['vmamba_zoo.mm'], allow_failed_imports=False)`` to a config and
use ``backbone=dict(type='TimmVMamba', model_name='groupmamba_tiny', ...)`` (or a family alias).
"""
from .backbone import SimplePyramidLevel, TimmVMamba
from .checkpoint import convert_dense_checkpoint, read_checkpoint, select_state_dict

__all__ = ['TimmVMamba', 'SimplePyramidLevel', 'convert_dense_checkpoint', 'read_checkpoint', 'select_state_dict']
