"""The selective scan's own parameters as every family initializes and feeds them (Mamba's recipe).

- ``init_dt_projection_``: dt_proj's weight uniform in ±rank^-0.5 and its bias the inverse softplus of a
  log-uniform dt in [dt_min, dt_max], so that the scan's step sizes start spread over two decades;
- ``init_A_log_and_D_``: S4D-real A = -(1..N) per channel (stored as log), D = 1;
- ``at_least_fp32`` (and its ``at_least_fp32_dtype``): a scan parameter as the scan reads it (fp32, fp64 kept for
  gradcheck);
- ``resolve_dt_rank``: the rank of the dt projection, ``'auto'`` being Mamba's ceil(width / 16).

The init functions fill the given tensors in place and draw their random numbers in one fixed order
(weight, then dt), on the tensors' device, so that a seeded model is the same wherever it calls them.
"""
import math
from typing import Union

import torch

__all__ = ["at_least_fp32", "at_least_fp32_dtype", "init_A_log_and_D_", "init_dt_projection_",
           "resolve_dt_rank"]


def resolve_dt_rank(width: int, dt_rank: Union[int, str] = 'auto') -> int:
    """The dt projection's rank for a mixer of ``width`` channels: ``'auto'`` is Mamba's ceil(width / 16)."""
    return math.ceil(width / 16) if dt_rank == 'auto' else int(dt_rank)


def at_least_fp32_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half and bfloat16, the dtype itself otherwise (fp32, fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 where it is half or bfloat16: the official codes keep A, D and the dt bias in fp32 under
    autocast. fp32 and fp64 tensors pass unchanged."""
    return t.to(at_least_fp32_dtype(t.dtype))


@torch.no_grad()
def init_dt_projection_(weight: torch.Tensor, bias: torch.Tensor, dt_min: float = 0.001, dt_max: float = 0.1,
                        dt_init_floor: float = 1e-4) -> None:
    """weight (..., dt_rank): uniform in ±dt_rank^-0.5; bias (any shape): softplus^-1 of log-uniform dt."""
    std = weight.shape[-1] ** -0.5
    weight.uniform_(-std, std)
    dt = torch.exp(
        torch.rand(bias.shape, device=bias.device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus


@torch.no_grad()
def init_A_log_and_D_(A_log: torch.Tensor, D: torch.Tensor) -> None:
    """A_log (..., N): log(1..N) along the last axis; D: ones."""
    N = A_log.shape[-1]
    A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32, device=A_log.device)).expand_as(A_log))
    D.fill_(1.)
