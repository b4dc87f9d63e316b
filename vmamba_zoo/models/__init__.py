"""The backbone families, one module each; importing registers them with timm."""
from . import efficientvmamba, groupmamba, mambamixer, plainmamba, spatialmamba, vmamba  # noqa: F401
