"""The backbone families, one module each; importing registers them with timm."""
