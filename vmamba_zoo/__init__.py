"""vmamba_zoo: vision-Mamba backbones for timm, MMDetection and MMSegmentation.

``import vmamba_zoo`` registers every model with timm (``timm.list_models('groupmamba*')``).
"""
from . import models  # noqa: F401  (registers the models)

__version__ = "0.1.0"
