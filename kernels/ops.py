"""Public selective-scan ops: validation, backend choice, and the torch.library custom ops behind them.

Each op is a forward custom op plus a backward custom op tied together with ``register_autograd``, each
with a fake implementation, so that ``torch.compile(fullgraph=True)`` traces through them and
``torch.library.opcheck`` holds. A backend implements ``vmamba_kernels.backend.ScanBackend``: "reference" is
``reference.ReferenceBackend`` (pure PyTorch), "triton" the module ``vmamba_kernels.triton`` (fused GPU kernels).
"""
import functools
import importlib
import os
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import reference
from .graphs import capturing

__all__ = [
    "BACKENDS",
    "selective_scan",
    "selective_scan_states",
    "selective_scan_2d",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "reference", "triton")
MERGES = ("sum", "none")
# The caches below (and the per-device ones of triton.launches and triton.route_plan) are internals that
# tests/kernels/test_graph_safety.py empties and counts, to hold that a CUDA-graph capture fills none of them.
_VALIDATED_ROUTES = WeakIdKeyDictionary()
_VALIDATED_PADDING = WeakIdKeyDictionary()
# Signatures (op, options, and each tensor's shape, dtype and device) whose checks passed: a repeated call
# skips them. Bounded; cleared when full.
_VALID_SIGNATURES = set()
_MAX_SIGNATURES = 4096
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# Backends


@functools.lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # compiled graphs read the answer instead of tracing the import
def triton_available() -> bool:
    """True when the fused Triton kernels can run (triton importable and the backend present)."""
    try:
        importlib.import_module("triton")
        _triton_backend()
    except (ImportError, AttributeError):
        return False
    return True


def _triton_backend():
    module = importlib.import_module("vmamba_kernels.triton")
    if not hasattr(module, "selective_scan_fwd"):
        raise ImportError("vmamba_kernels.triton provides no selective_scan_fwd")
    return module


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``: "auto" is triton on CUDA when available."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package and vmamba_kernels.triton; "
                         "use backend='reference' or 'auto'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        # Triton itself would only say "0 active drivers"
        raise ValueError(f"backend='triton' runs on CUDA tensors (or any device under TRITON_INTERPRET=1), "
                         f"got tensors on {device}; use backend='reference' or 'auto' there")
    return backend


def uses_fused_kernels(x: Tensor, backend: str) -> bool:
    """Whether an op runs its fused kernels on ``x``: ``resolve_backend``'s choice (with its errors), except that
    "auto" keeps fp64, traced and exported calls on the PyTorch form (exporters cannot translate custom ops, and
    FLOP counters read the standard ones)."""
    if resolve_backend(backend, x.device) != "triton":
        return False
    return backend != "auto" or (x.dtype != torch.float64 and not torch.jit.is_tracing() and not reference.exporting())


def _backend(name: str):
    return _triton_backend() if name == "triton" else reference.ReferenceBackend


# --------------------------------------------------------------------------------------------------
# Input validation


def _signature(op, options, tensors):
    """What the shape, dtype and device checks of a call depend on; None where an argument is not a tensor or
    an option cannot be a key (a wrong type, which the checks then report)."""
    try:
        hash(options)
    except TypeError:
        return None
    sig = [op, options]
    for t in tensors:
        if t is None:
            sig.append(None)
        elif isinstance(t, Tensor):
            sig.append((t.shape, t.dtype, t.device))
        else:
            return None
    return tuple(sig)


def _check_once(op, options, tensors, check) -> None:
    """Run ``check()`` unless a call with the same signature passed it; remember a pass (never while capturing
    a CUDA graph, when nothing may be cached). While compiling, the check runs once at trace time on the traced
    shapes and the cache is not read: a read would make the graph guard on the whole set, which every new eager
    signature then fails (a recompilation)."""
    if torch.compiler.is_compiling():
        check()
        return
    sig = _signature(op, options, tensors)
    if sig is not None and sig in _VALID_SIGNATURES:
        return
    check()
    if sig is None or capturing():
        return
    if len(_VALID_SIGNATURES) >= _MAX_SIGNATURES:
        _VALID_SIGNATURES.clear()
    _VALID_SIGNATURES.add(sig)


def _check_tensor(name, t, dims, shape=None, device=None, optional=False, dtypes=_FLOAT_DTYPES):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        want = f"shape {_fmt(shape)}" if shape is not None else f"{dims} dims"
        raise ValueError(f"{name} must have {want}, got shape {tuple(t.shape)}")
    if shape is not None:
        for i in range(dims):  # indexing, not enumerate(zip(...)): cheaper for torch.compile to trace
            if shape[i] is not None and shape[i] != t.shape[i]:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(t.shape)} (dim {i})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the input, got {t.device}")


def _fmt(shape):
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _check_1d_inputs(u, delta, A, B, C=None, D=None, z=None, delta_bias=None, with_C=True):
    _check_tensor("u", u, 3)
    Bt, Dm, L = u.shape
    dev = u.device
    _check_tensor("delta", delta, 3, (Bt, Dm, L), dev)
    _check_tensor("A", A, 2, (Dm, None), dev)
    if A.is_complex():
        raise TypeError("A must be real")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)) if with_C else (("B", B),):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            got = tuple(t.shape)
            raise ValueError(f"{name} must be (Bt, N, L) = ({Bt}, {N}, {L}) or grouped (Bt, G, N, L), got {got}")
        if t.dim() == 3:
            _check_tensor(name, t, 3, (Bt, N, L), dev)
        else:
            _check_tensor(name, t, 4, (Bt, None, N, L), dev)
            G = t.shape[1]
            if G < 1 or Dm % G != 0:
                raise ValueError(f"{name} has G={G} groups, which must divide Dm={Dm}")
    if with_C and B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    _check_tensor("D", D, 1, (Dm,), dev, optional=True)
    _check_tensor("z", z, 3, (Bt, Dm, L), dev, optional=True)
    _check_tensor("delta_bias", delta_bias, 1, (Dm,), dev, optional=True)


def _check_routes(name, routes, K, device):
    """Type, dtype, shape and device of a routes tensor (values: ``_check_route_values``)."""
    if not isinstance(routes, Tensor):
        raise TypeError(f"{name} must be a LongTensor (K, Lr), got {type(routes).__name__}")
    if routes.dtype != torch.long:
        raise TypeError(f"{name} must have dtype torch.int64, got {routes.dtype}")
    if routes.dim() != 2 or routes.shape[0] != K:
        raise ValueError(f"{name} must have shape (K, Lr) with K={K}, got {tuple(routes.shape)}")
    if routes.device != device:
        raise ValueError(f"{name} must be on {device} like the input, got {routes.device}")


def _check_route_values(name, routes, H, W):
    if torch.compiler.is_compiling() or routes.numel() == 0:
        return  # value checks read the data; eager calls have done them
    # Reading values syncs with the device: check each routes tensor once per (version, grid).
    stamp = (_route_stamp(routes), H, W)
    if _VALIDATED_ROUTES.get(routes) == stamp or capturing():
        return
    lo, hi = int(routes.min()), int(routes.max())
    if lo < -1 or hi >= H * W:
        raise ValueError(f"{name} entries must be pixel indices in [0, {H * W}) or -1 padding, "
                         f"got values in [{lo}, {hi}]")
    padded = routes < 0
    if bool((padded[:, :-1] & ~padded[:, 1:]).any()):
        raise ValueError(f"{name} may only be padded (-1) at the end of a route")
    ordered = routes.sort(dim=1).values
    if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
        raise ValueError(f"{name}: a route must visit each pixel at most once")
    _VALIDATED_ROUTES[routes] = stamp


def _route_stamp(routes):
    return None if routes.is_inference() else routes._version  # inference tensors have no version


def _check_same_padding(routes, param_routes):
    """param_routes must pad (-1) exactly where routes do; checked once per pair of tensors (a host sync)."""
    if torch.compiler.is_compiling():
        return
    stamp = (id(routes), _route_stamp(routes), _route_stamp(param_routes))
    if _VALIDATED_PADDING.get(param_routes) == stamp or capturing():
        return
    if not torch.equal(param_routes < 0, routes < 0):
        raise ValueError("param_routes must be padded (-1) exactly where routes are")
    _VALIDATED_PADDING[param_routes] = stamp


# --------------------------------------------------------------------------------------------------
# Custom ops


def _materialize(like: Tensor, grads) -> tuple:
    """Backward ops return a fixed number of tensors: an empty one stands for an absent input."""
    return tuple(like.new_empty(0) if g is None else g.contiguous() for g in grads)


def _nothing_like(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _grads_fake(like, *inputs):
    return tuple(_nothing_like(like) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in inputs)


@torch.library.custom_op("vmamba::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                        backend: str) -> Tuple[Tensor, Tensor]:
    out, last_state = _backend(backend).selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return out.contiguous(), last_state.contiguous()


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    dtype = reference.compute_dtype(u, delta, A, B, C)
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(
        (u.shape[0], u.shape[1], A.shape[1]), dtype=dtype)


@torch.library.custom_op("vmamba::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(dout: Tensor, dlast_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                        B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                        delta_bias: Optional[Tensor], delta_softplus: bool, backend: str
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _materialize(u, _backend(backend).selective_scan_bwd(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus))


@_selective_scan_bwd.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return _grads_fake(u, u, delta, A, B, C, D, z, delta_bias)


def _selective_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _selective_scan_backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = _selective_scan_bwd(dout.contiguous(), dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                ctx.delta_softplus, ctx.backend)
    grads = [None if t is None else g for t, g in zip((u, delta, A, B, C, D, z, delta_bias), grads)]
    return (*grads, None, None)


_selective_scan_fwd.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup)


@torch.library.custom_op("vmamba::selective_scan_states_fwd", mutates_args=())
def _selective_scan_states_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Optional[Tensor],
                               delta_softplus: bool, backend: str) -> Tensor:
    return _backend(backend).selective_scan_states_fwd(u, delta, A, B, delta_bias, delta_softplus).contiguous()


@_selective_scan_states_fwd.register_fake
def _(u, delta, A, B, delta_bias, delta_softplus, backend):
    Bt, Dm, L = u.shape
    return u.new_empty((Bt, Dm, A.shape[1], L), dtype=reference.compute_dtype(u, delta, A, B))


@torch.library.custom_op("vmamba::selective_scan_states_bwd", mutates_args=())
def _selective_scan_states_bwd(dstates: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                               delta_bias: Optional[Tensor], delta_softplus: bool, backend: str
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _materialize(u, _backend(backend).selective_scan_states_bwd(
        dstates, u, delta, A, B, delta_bias, delta_softplus))


@_selective_scan_states_bwd.register_fake
def _(dstates, u, delta, A, B, delta_bias, delta_softplus, backend):
    return _grads_fake(u, u, delta, A, B, delta_bias)


def _states_setup(ctx, inputs, output):
    u, delta, A, B, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, delta_bias)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _states_backward(ctx, dstates):
    u, delta, A, B, delta_bias = ctx.saved_tensors
    grads = _selective_scan_states_bwd(dstates.contiguous(), u, delta, A, B, delta_bias,
                                       ctx.delta_softplus, ctx.backend)
    grads = [None if t is None else g for t, g in zip((u, delta, A, B, delta_bias), grads)]
    return (*grads, None, None)


_selective_scan_states_fwd.register_autograd(_states_backward, setup_context=_states_setup)


@torch.library.custom_op("vmamba::selective_scan_2d_fwd", mutates_args=())
def _selective_scan_2d_fwd(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           delta_bias: Optional[Tensor], routes: Tensor, param_routes: Tensor,
                           delta_softplus: bool, merge: str, backend: str, save_chunks: bool,
                           out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Returns out (in ``out_dtype``, default x's dtype) and, with ``save_chunks`` on a backend that has them,
    the scan's chunk-start states for the backward (empty otherwise: the backward then recomputes what it
    needs)."""
    impl = _backend(backend)
    args = (x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, out_dtype)
    if save_chunks and hasattr(impl, "selective_scan_2d_fwd_saving"):
        out, chunk_states = impl.selective_scan_2d_fwd_saving(*args)
        return out.contiguous(), chunk_states
    return impl.selective_scan_2d_fwd(*args).contiguous(), x.new_empty(0, dtype=torch.float32)


@_selective_scan_2d_fwd.register_fake
def _(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, backend, save_chunks,
      out_dtype=None):
    shape = delta.shape[:4] + delta.shape[4:] if merge == "none" else delta.shape[:3] + delta.shape[4:]
    chunk_states = x.new_empty(0, dtype=torch.float32)
    if save_chunks and backend == "triton":
        chunk_states = x.new_empty(_triton_backend().chunk_states_shape(x, delta, A, B, C, D, delta_bias, routes,
                                                                        out_dtype), dtype=torch.float32)
    return x.new_empty(shape, dtype=x.dtype if out_dtype is None else out_dtype), chunk_states


@torch.library.custom_op("vmamba::selective_scan_2d_bwd", mutates_args=())
def _selective_scan_2d_bwd(dout: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor], delta_bias: Optional[Tensor], routes: Tensor,
                           param_routes: Tensor, chunk_states: Tensor, delta_softplus: bool, merge: str,
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend(backend)
    args = (dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge)
    if chunk_states.numel() and hasattr(impl, "selective_scan_2d_bwd_from_saved"):
        return _materialize(x, impl.selective_scan_2d_bwd_from_saved(*args, chunk_states))
    return _materialize(x, impl.selective_scan_2d_bwd(*args))


@_selective_scan_2d_bwd.register_fake
def _(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, chunk_states, delta_softplus, merge, backend):
    return _grads_fake(x, x, delta, A, B, C, D, delta_bias)


def _scan_2d_setup(ctx, inputs, output):
    x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge, backend, _, _ = inputs
    ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, routes, param_routes, output[1])
    ctx.delta_softplus, ctx.merge, ctx.backend = delta_softplus, merge, backend


def _scan_2d_backward(ctx, dout, _dchunk_states):
    """dout arrives in out's dtype; the gradients are in their inputs' dtypes."""
    x, delta, A, B, C, D, delta_bias, routes, param_routes, chunk_states = ctx.saved_tensors
    grads = _selective_scan_2d_bwd(dout.contiguous(), x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                   chunk_states, ctx.delta_softplus, ctx.merge, ctx.backend)
    grads = [None if t is None else g for t, g in zip((x, delta, A, B, C, D, delta_bias), grads)]
    return (*grads, None, None, None, None, None, None, None)


_selective_scan_2d_fwd.register_autograd(_scan_2d_backward, setup_context=_scan_2d_setup)


# --------------------------------------------------------------------------------------------------
# Public API


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend="auto"):
    """Selective scan with mamba_ssm's ``selective_scan_fn`` semantics (see ``reference``).

    u, delta: (Bt, Dm, L); A: (Dm, N); B, C: (Bt, N, L) or grouped (Bt, G, N, L) with Dm % G == 0;
    D, delta_bias: (Dm,); z: (Bt, Dm, L). Computes in fp32; returns out in u's dtype and, with
    ``return_last_state``, also the final state (Bt, Dm, N) in fp32 (fp64 for fp64 inputs).
    """
    if reference.exporting():  # exporters cannot translate the custom ops: the same math in standard ops
        return reference.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                            return_last_state=return_last_state)
    if not torch.jit.is_tracing():  # fvcore traces models whose eager calls were checked
        _check_once("scan", None, (u, delta, A, B, C, D, z, delta_bias),
                    lambda: _check_1d_inputs(u, delta, A, B, C, D, z, delta_bias))
    out, last_state = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                          resolve_backend(backend, u.device))
    return (out, last_state) if return_last_state else out


def selective_scan_states(u, delta, A, B, delta_bias=None, delta_softplus=False, *, backend="auto"):
    """Every hidden state h of the scan, (Bt, Dm, N, L) in fp32, for structure-aware state fusion
    (the caller applies C and D after mixing states across space)."""
    if reference.exporting():
        return reference.selective_scan_states_ref(u, delta, A, B, delta_bias, bool(delta_softplus))
    if not torch.jit.is_tracing():
        _check_once("states", None, (u, delta, A, B, delta_bias),
                    lambda: _check_1d_inputs(u, delta, A, B, delta_bias=delta_bias, with_C=False))
    return _selective_scan_states_fwd(u, delta, A, B, delta_bias, bool(delta_softplus),
                                      resolve_backend(backend, u.device))


def selective_scan_2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *, routes,
                      param_routes=None, merge="sum", out_dtype=None, backend="auto"):
    """Fused 2D selective scan along K routes, in spatial channels-last layout.

    D, delta_bias and delta_softplus mean and default as in ``selective_scan`` (mamba_ssm's
    ``selective_scan_fn``: no softplus unless asked for), so a 1D call moves to 2D unchanged.

    x: (Bt, H, W, Dm) shared by all routes, or (Bt, H, W, K, Dm); delta: (Bt, H, W, K, Dm);
    B, C: (Bt, H, W, K, N); A: (K, Dm, N); D, delta_bias: (K, Dm); routes, param_routes: (K, Lr) long.
    Step t of route k reads x at pixel routes[k, t] and delta/B/C at pixel param_routes[k, t]; its output
    goes to pixel routes[k, t]. merge="sum" → (Bt, H, W, Dm); merge="none" → (Bt, H, W, K, Dm).

    The output is in ``out_dtype`` (None: x's dtype), a floating dtype at least as wide as x's: a bf16 x with
    out_dtype=torch.float32 gives what an fp32 copy of x would, bit for bit and gradients included, without
    the copy (the scan widens x as it reads it; x's gradient is rounded back to bf16 once, as the copy's
    backward would).
    """
    if param_routes is None:
        param_routes = routes
    if reference.exporting():
        return reference.selective_scan_2d_ref(x, delta, A, B, C, D, delta_bias, bool(delta_softplus), routes,
                                               param_routes, merge, out_dtype)
    if not torch.jit.is_tracing():
        _check_once("2d", (merge, param_routes is routes, out_dtype),
                    (x, delta, A, B, C, D, delta_bias, routes, param_routes),
                    lambda: _check_2d_inputs(x, delta, A, B, C, D, delta_bias, routes, param_routes, merge,
                                             out_dtype))
        _check_2d_route_values(routes, param_routes, delta.shape[1], delta.shape[2])
    # Chunk states are worth writing only when a backward will read them.
    save_chunks = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, delta, A, B, C, D, delta_bias))
    out, _ = _selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes,
                                    bool(delta_softplus), merge, resolve_backend(backend, delta.device), save_chunks,
                                    out_dtype)
    return out


def _check_out_dtype(out_dtype, x):
    """None, or a floating dtype that holds every value of x's dtype (bf16 → fp16 would not)."""
    if out_dtype is None:
        return
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _FLOAT_DTYPES or (
            torch.promote_types(x.dtype, out_dtype) != out_dtype):
        raise TypeError(f"out_dtype must be None or a floating dtype at least as wide as x's ({x.dtype}), "
                        f"one of {[str(d) for d in _FLOAT_DTYPES if torch.promote_types(x.dtype, d) == d]}, "
                        f"got {out_dtype!r}")


def _check_2d_inputs(x, delta, A, B, C, D, delta_bias, routes, param_routes, merge, out_dtype=None):
    _check_tensor("delta", delta, 5)
    Bt, H, W, K, Dm = delta.shape
    dev = delta.device
    if not isinstance(x, Tensor) or x.dim() not in (4, 5):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be (Bt, H, W, Dm) = ({Bt}, {H}, {W}, {Dm}) or (Bt, H, W, K, Dm), got {got}")
    _check_tensor("x", x, x.dim(), (Bt, H, W, Dm) if x.dim() == 4 else (Bt, H, W, K, Dm), dev)
    _check_out_dtype(out_dtype, x)
    _check_tensor("A", A, 3, (K, Dm, None), dev)
    N = A.shape[2]
    _check_tensor("B", B, 5, (Bt, H, W, K, N), dev)
    _check_tensor("C", C, 5, (Bt, H, W, K, N), dev)
    _check_tensor("D", D, 2, (K, Dm), dev, optional=True)
    _check_tensor("delta_bias", delta_bias, 2, (K, Dm), dev, optional=True)
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    _check_routes("routes", routes, K, dev)
    if param_routes is not routes:
        _check_routes("param_routes", param_routes, K, dev)
        if param_routes.shape != routes.shape:
            raise ValueError(f"param_routes must have the shape of routes {tuple(routes.shape)}, "
                             f"got {tuple(param_routes.shape)}")


def _check_2d_route_values(routes, param_routes, H, W):
    """The routes' values (checked once per routes tensor and version: reading them syncs with the device)."""
    _check_route_values("routes", routes, H, W)
    if param_routes is not routes:
        _check_route_values("param_routes", param_routes, H, W)
        _check_same_padding(routes, param_routes)
