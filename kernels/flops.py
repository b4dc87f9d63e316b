"""FLOP counts of the scan ops, in the convention the vision-Mamba papers use with fvcore.

One selective scan over L steps of Dm channels with state size N counts 9·Bt·L·Dm·N, plus Bt·Dm·L for
the D skip and Bt·Dm·L for the z gate (mamba_ssm's ``flops_selective_scan_ref``). A 2D scan counts every
step of every route (K·Lr; -1 padding included). The same numbers are registered with
``torch.utils.flop_counter`` (so FlopCounterMode reports them as they are, while it counts a matmul's
multiply-add as 2) and returned by ``fvcore_handles()`` for fvcore's ``FlopCountAnalysis``. Backward
ops are not counted.
"""
from typing import Callable, Dict, Optional, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["scan_flops", "fvcore_handles"]


def scan_flops(batch: int, length: int, channels: int, state: int, with_D: bool, with_z: bool = False) -> int:
    flops = 9 * batch * length * channels * state
    if with_D:
        flops += batch * channels * length
    if with_z:
        flops += batch * channels * length
    return flops


def _scan_1d(u_shape, A_shape, D_shape, z_shape) -> int:
    Bt, Dm, L = u_shape
    return scan_flops(Bt, L, Dm, A_shape[1], D_shape is not None, z_shape is not None)


def _states(u_shape, A_shape) -> int:
    Bt, Dm, L = u_shape
    return scan_flops(Bt, L, Dm, A_shape[1], with_D=False)


def _scan_2d(delta_shape, A_shape, D_shape, routes_shape) -> int:
    Bt, _, _, K, Dm = delta_shape
    return scan_flops(Bt, K * routes_shape[1], Dm, A_shape[2], D_shape is not None)


@register_flop_formula(torch.ops.vmamba.selective_scan_fwd)
def _selective_scan_formula(u, delta, A, B, C, D=None, z=None, delta_bias=None, *args, out_shape=None, **kwargs):
    return _scan_1d(u, A, D, z)


@register_flop_formula(torch.ops.vmamba.selective_scan_states_fwd)
def _states_formula(u, delta, A, B, *args, out_shape=None, **kwargs):
    return _states(u, A)


@register_flop_formula(torch.ops.vmamba.selective_scan_2d_fwd)
def _scan_2d_formula(x, delta, A, B, C, D=None, delta_bias=None, routes=None, *args, out_shape=None, **kwargs):
    return _scan_2d(delta, A, D, routes)


def _jit_shape(value) -> Optional[Sequence[int]]:
    """Shape of a TorchScript value, or None for a None constant."""
    if value.type().kind() == "NoneType" or (value.node().kind() == "prim::Constant"
                                              and value.type().kind() != "TensorType"):
        return None
    return value.type().sizes()


def fvcore_handles() -> Dict[str, Callable]:
    """``{op name: handle}`` for ``FlopCountAnalysis(model, x).set_op_handle(**fvcore_handles())``."""

    def scan_1d(inputs, outputs):
        s = [_jit_shape(v) for v in inputs]
        return _scan_1d(s[0], s[2], s[5], s[6])

    def states(inputs, outputs):
        s = [_jit_shape(v) for v in inputs]
        return _states(s[0], s[2])

    def scan_2d(inputs, outputs):
        s = [_jit_shape(v) for v in inputs]
        return _scan_2d(s[1], s[2], s[5], s[7])

    return {
        "vmamba::selective_scan_fwd": scan_1d,
        "vmamba::selective_scan_states_fwd": states,
        "vmamba::selective_scan_2d_fwd": scan_2d,
    }
