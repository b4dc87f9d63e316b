"""The compiled eager CPU scan: ``cpu_scan.c``, built on first use with the system's C compiler, loaded by ctypes.

``reference._blocked_scan`` hands its fp32 problems here when the library is available. The C loop keeps every
state in registers from the first step to the last, where the PyTorch form streams each state through memory
several times and runs a Python loop over the steps. The source is plain C (no Python or torch headers), so
that it builds in about a second and does not depend on the torch version.

The library is cached under ``$VMAMBA_KERNELS_CACHE`` (default ``~/.cache/vmamba_kernels``, else a folder in the
temporary directory), named by a hash of the source, the compiler and its version, the flags and the CPU; it is
written atomically and reused by every later process. ``VMAMBA_CPU_SCAN=0`` turns it off. Without a C compiler,
or if the build fails, a warning says why (once per process) and the PyTorch form runs: the same recurrence,
with torch's exp2 and softplus where the C loop has polynomials within a few ulp.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["available", "selective_scan_fwd"]

_SOURCE = Path(__file__).with_name("cpu_scan.c")
# ISO C without contraction would keep every multiply-add two roundings and two instructions
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-ffp-contract=fast"]
_MAX_STATES = 256  # the states of one work item live on the stack; larger d_state stays on the PyTorch form
_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded = {}  # "fn": the C entry point, or None once it could not be had


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _flag_sets() -> List[List[str]]:
    """Flags to try in turn: code for this CPU (the library is built where it runs) with OpenMP, then plain."""
    arch = "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i686") else "-mcpu=native"
    return [_FLAGS + [arch, "-fopenmp"], _FLAGS]


def _identity(compiler: str) -> bytes:
    """What a cached build depends on besides the source and flags: the compiler's version and the CPU."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({l for l in f if l.startswith(("model name", "flags", "Features"))}))
    except OSError:
        cpu = platform.processor() + platform.machine()
    return (compiler + version + cpu).encode()


def _cache_dirs() -> List[Path]:
    configured = os.environ.get("VMAMBA_KERNELS_CACHE")
    if configured:
        return [Path(configured)]
    return [Path.home() / ".cache" / "vmamba_kernels",
            Path(tempfile.gettempdir()) / f"vmamba_kernels_{getattr(os, 'getuid', lambda: 'user')()}"]


def _build(compiler: str, flags: List[str], target: Path) -> None:
    """Compile to a temporary file beside ``target``, then rename it: no process ever loads half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _logger.info("compiling %s into %s", _SOURCE.name, target)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=600)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load():
    """The C entry point, built if needed; None, with one warning, where it cannot be had."""
    compiler = _compiler()
    if compiler is None:
        warnings.warn("vmamba_kernels: no C compiler (cc, gcc, clang or $CC) was found, so the CPU scan runs its "
                      "slower PyTorch form", RuntimeWarning, stacklevel=4)
        return None
    identity, source, errors = _identity(compiler), _SOURCE.read_bytes(), []
    for flags in _flag_sets():
        name = hashlib.sha256(source + identity + " ".join(flags).encode()).hexdigest()[:16]
        for folder in _cache_dirs():
            target = folder / f"cpu_scan_{name}.so"
            try:
                if not target.exists():
                    _build(compiler, flags, target)
                fn = ctypes.CDLL(str(target)).vmamba_selective_scan_fwd_f32
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(flags)}: {(getattr(e, 'stderr', None) or str(e)).strip()[:400]}")
                continue
            fn.restype = None
            fn.argtypes = ([ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3
                           + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 2 + [ctypes.c_int])
            return fn
    warnings.warn(f"vmamba_kernels: the CPU scan could not be built with {compiler}, so it runs its slower "
                  f"PyTorch form. {errors[0]}", RuntimeWarning, stacklevel=4)
    return None


def available() -> bool:
    """Whether the compiled scan runs (building it on the first call). ``VMAMBA_CPU_SCAN=0`` says no."""
    if os.environ.get("VMAMBA_CPU_SCAN", "1") == "0":
        return False
    if "fn" not in _loaded:
        with _lock:
            if "fn" not in _loaded:
                _loaded["fn"] = _load()
    return _loaded["fn"] is not None


def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, delta_bias: Optional[torch.Tensor],
                       delta_softplus: bool, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       y: torch.Tensor) -> Optional[torch.Tensor]:
    """``reference._blocked_scan``'s problem: y_t = <C_t, h_t> of h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t from
    h = 0, dt_t = delta_t + delta_bias (then softplus, where asked), in fp32 on CPU: u and delta (L, R, Dg),
    delta_bias (R, Dg) or None, A (R, N, Dg), B and C (L or 1, R, N, 1) with any strides (one step shared by all
    where L is 1), y (L, R, Dg) contiguous. Writes y; returns the last state (R, N, Dg), or None where the compiled
    scan does not take the problem (unavailable, not fp32 CPU tensors, or d_state over 256): the caller then runs
    the PyTorch form."""
    L, R, Dg = u.shape
    N = A.shape[1]
    tensors = [t for t in (u, delta, delta_bias, A, B, C, y) if t is not None]
    if (N > _MAX_STATES or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
            or not available()):
        return None
    if not y.is_contiguous():
        raise ValueError("cpu_scan.selective_scan_fwd: y must be contiguous, the C loop writes it in place")
    u, delta = u.contiguous(), delta.contiguous()
    A = A.contiguous()
    bias = None if delta_bias is None else delta_bias.contiguous()
    last = u.new_empty((R, N, Dg))
    strides = [s if size > 1 else 0 for t in (B, C) for s, size in zip(t.stride()[:3], t.shape[:3])]
    _loaded["fn"](L, R, N, Dg, u.data_ptr(), delta.data_ptr(), None if bias is None else bias.data_ptr(),
                  int(delta_softplus), A.data_ptr(), B.data_ptr(), C.data_ptr(), *strides, y.data_ptr(),
                  last.data_ptr(), torch.get_num_threads())
    return last
