"""Fused Triton kernels for the selective scan (GPU; CPU under TRITON_INTERPRET=1)."""
