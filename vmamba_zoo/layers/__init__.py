"""Reusable blocks of the zoo: family-agnostic, built on vmamba_kernels."""
