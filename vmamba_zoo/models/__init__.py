"""The backbone families, one module each; importing registers them with timm."""
from . import efficientvmamba, groupmamba, plainmamba, spatialmamba, vmamba  # noqa: F401
