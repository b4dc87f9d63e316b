"""The ops' Python paths are safe to capture into CUDA graphs (CPU checks of the launch path).

Every kernel launch is stubbed out (the route-plan kernel does nothing; the tuners run Triton's real
``Autotuner.run`` with tuning runs and launches replaced by recorders), so these tests see only what the
Python code around the kernels does: which torch ops it calls (a ``TorchDispatchMode`` log), which caches it
fills, whether it tunes, and whether it reads a tensor's value on the host (``aten._local_scalar_dense``,
behind ``int()``, ``bool()`` and ``.item()``, or ``aten.equal``), which on a GPU is a sync that a capture forbids.

- A repeated call with the same shapes makes the same torch calls (allocations included) as the call before
  it and fills no cache: per-shape state is built once, at the first call.
- A call while a CUDA graph is captured (``torch.cuda.is_current_stream_capturing`` patched to True) runs no
  tuning, reads no value on the host and fills no cache, and says once that it runs an untuned tile.
"""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

import vmamba_kernels as vk
from vmamba_kernels import ops

pytest.importorskip("triton")
from vmamba_kernels.triton import backend, launches, route_plan, tiles  # noqa: E402

TUNERS = ("fwd_tuner", "bwd_tuner", "n1_tuner", "n1_bwd_tuner", "steps_tuner")
SYNCS = ("aten._local_scalar_dense", "aten.equal", "aten.item")
CASES = {
    # name: (op, d_state, route set, merge, per-route x, parameters in raster order)
    "cross_n1_sum": ("2d", 1, "cross", "sum", False, False),  # VMamba: the d_state-1 kernels
    "cross_n1_none_per_route_x": ("2d", 1, "cross", "none", True, False),  # GroupMamba
    "atrous_n4_sum": ("2d", 4, "atrous", "sum", False, False),  # EfficientVMamba: the general kernels
    "continuous_n4_param_raster": ("2d", 4, "continuous", "sum", False, True),  # PlainMamba
    "scan_1d_grouped": ("1d", 4, None, None, False, False),  # ViM2 / MambaMixer
    "states": ("states", 1, None, None, False, False),  # Spatial-Mamba
}


class _OpLog(TorchDispatchMode):
    """Records each torch op the code runs, with its output shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))
                       if isinstance(t, torch.Tensor))
        self.calls.append((str(func.overloadpacket), shapes))
        return out

    def syncs(self):
        return [c for c in self.calls if c[0] in SYNCS]


class _Recorder:
    def __init__(self):
        self.tuning_runs, self.launches = 0, 0

    def bench(self, *args, config, **kwargs):
        self.tuning_runs += 1
        return [float(self.tuning_runs)]  # Triton's _bench returns timings; the first config wins

    def run(self, *args, **kwargs):
        self.launches += 1


@pytest.fixture(params=[False, True], ids=["chunked_forward", "steps_forward"])
def stubbed(monkeypatch, request):
    """Kernel launches stubbed, every cache of the ops emptied (restored afterwards); returns the recorder. Runs
    with the d_state > 1 forward chunked and step by step (the default; ``set_steps_kernel``)."""
    monkeypatch.setitem(launches.settings, "steps_kernel", request.param)
    rec = _Recorder()
    mode = tiles.tune_mode()
    tiles.set_tune_mode("tune")  # tuning runs on: what a capture must never start
    monkeypatch.setattr(launches, "INTERPRET", False)  # the tuned launch path, as on a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend='triton' takes the CPU tensors (no kernel runs)
    monkeypatch.setattr(launches, "N1_STEP_AXIS", 0)

    class _NoKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(route_plan, "route_plan_kernel", _NoKernel())
    for name in TUNERS:
        tuner = getattr(tiles, name)
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "cache_results", False)
        monkeypatch.setattr(tuner, "_bench", rec.bench)
        monkeypatch.setattr(tuner.fn, "run", rec.run)
    monkeypatch.setattr(route_plan, "_cache", {})
    monkeypatch.setattr(launches, "placeholders", {})
    monkeypatch.setattr(launches, "warned_untuned", set())
    monkeypatch.setattr(ops, "_VALID_SIGNATURES", set())
    monkeypatch.setattr(ops, "_VALIDATED_ROUTES", WeakIdKeyDictionary())
    monkeypatch.setattr(ops, "_VALIDATED_PADDING", WeakIdKeyDictionary())
    yield rec
    tiles.set_tune_mode(mode)


def _capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _cache_sizes():
    sizes = {"route plans": len(route_plan._cache), "placeholders": len(launches.placeholders),
             "checked signatures": len(ops._VALID_SIGNATURES), "checked routes": len(ops._VALIDATED_ROUTES),
             "checked padding": len(ops._VALIDATED_PADDING)}
    sizes.update({f"{name} tiles": len(getattr(tiles, name).cache) for name in TUNERS})
    return sizes


def _inputs(case, seed=0, Dm=8):
    op, N, route_name, merge, per_route_x, param_raster = CASES[case]
    g = torch.Generator().manual_seed(seed)
    Bt, H, W = 2, 4, 6

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if op != "2d":
        L, G = H * W, 2
        A = -torch.rand(Dm, N, generator=g) - 0.5
        if op == "states":
            return dict(u=randn(Bt, Dm, L), delta=randn(Bt, Dm, L), A=A, B=randn(Bt, N, L), delta_bias=randn(Dm))
        return dict(u=randn(Bt, Dm, L), delta=randn(Bt, Dm, L), A=A, B=randn(Bt, G, N, L), C=randn(Bt, G, N, L),
                    D=randn(Dm), z=randn(Bt, Dm, L), delta_bias=randn(Dm))
    routes = vk.scan_routes(route_name, H, W)
    K = routes.shape[0]
    param_routes = vk.scan_routes("raster", H, W).expand(K, -1).contiguous() if param_raster else routes
    x = randn(Bt, H, W, K, Dm) if per_route_x else randn(Bt, H, W, Dm)
    return dict(x=x, delta=randn(Bt, H, W, K, Dm), A=-torch.rand(K, Dm, N, generator=g) - 0.5,
                B=randn(Bt, H, W, K, N), C=randn(Bt, H, W, K, N), D=randn(K, Dm), delta_bias=randn(K, Dm),
                routes=routes, param_routes=param_routes, merge=merge)


def _public_step(case, inp):
    """Forward and backward through the public op (backend="triton")."""
    op = CASES[case][0]
    leaves = [inp[k] for k in ("x", "u", "delta", "B", "C") if k in inp]
    for t in leaves:
        t.requires_grad_(True)
    if op == "2d":
        out = ops.selective_scan_2d(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"],
                                    True, routes=inp["routes"], param_routes=inp["param_routes"],
                                    merge=inp["merge"], backend="triton")
    elif op == "states":
        out = ops.selective_scan_states(inp["u"], inp["delta"], inp["A"], inp["B"], inp["delta_bias"], True,
                                        backend="triton")
    else:
        out = ops.selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                 inp["delta_bias"], True, backend="triton")
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    for t in leaves:
        t.requires_grad_(False)


def _backend_step(case, inp):
    """Forward and backward through the backend functions (the ops' implementations: the dispatch log sees
    their inner torch calls, which it cannot see through a custom op)."""
    op = CASES[case][0]
    if op == "2d":
        args = (inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"], inp["routes"],
                inp["param_routes"], True, inp["merge"])
        out, states = backend.selective_scan_2d_fwd_saving(*args)
        backend.selective_scan_2d_bwd_from_saved(torch.ones_like(out), *args, states)
    elif op == "states":
        args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["delta_bias"], True)
        out = backend.selective_scan_states_fwd(*args)
        backend.selective_scan_states_bwd(torch.ones_like(out), *args)
    else:
        args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], True)
        out, last = backend.selective_scan_fwd(*args)
        backend.selective_scan_bwd(torch.ones_like(out), None, *args)


def _logged(fn, *args):
    with _OpLog() as log:
        fn(*args)
    return log


@pytest.mark.parametrize("case", list(CASES))
def test_repeated_call_allocates_and_caches_as_the_one_before(stubbed, case):
    inp = _inputs(case)
    for step in (_public_step, _backend_step):
        step(case, inp)  # the first call builds per-shape state
        sizes = _cache_sizes()
        second, third = _logged(step, case, inp), _logged(step, case, inp)
        assert second.calls == third.calls, f"{step.__name__}: the torch calls differ between repeated calls"
        assert _cache_sizes() == sizes, f"{step.__name__}: a repeated call filled a cache"
        assert not second.syncs(), f"{step.__name__}: a repeated call reads tensor values: {second.syncs()}"
    # The same shapes with new data and new tensors (routes other than in identity) reuse the checks.
    fresh = _inputs(case, seed=1)
    fresh.pop("routes", None), fresh.pop("param_routes", None)
    fresh = {**inp, **fresh}
    log = _logged(_public_step, case, fresh)
    assert not log.syncs(), log.syncs()
    assert _cache_sizes() == sizes


@pytest.mark.parametrize("case", list(CASES))
def test_call_while_capturing_tunes_syncs_and_caches_nothing(stubbed, monkeypatch, case):
    inp = _inputs(case)
    _capture(monkeypatch)
    before = _cache_sizes()
    assert not any(before.values()), before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        public = _logged(_public_step, case, inp)
        inner = _logged(_backend_step, case, inp)
    assert not public.syncs() and not inner.syncs(), (public.syncs(), inner.syncs())
    assert stubbed.tuning_runs == 0
    assert _cache_sizes() == before, "a call while capturing filled a cache"
    untuned = [str(w.message) for w in caught if "while a CUDA graph is captured" in str(w.message)]
    assert untuned and all(msg.split(":")[0].endswith("kernel") for msg in untuned), untuned
    # Once per kernel and problem: the backend call above ran the same problems again without a warning.
    assert len(untuned) == len(set(untuned)), untuned
    assert stubbed.launches > 0  # the untuned tile was launched


@pytest.mark.parametrize("case", ["cross_n1_sum", "atrous_n4_sum"])
def test_capture_reuses_tiles_tuned_before(stubbed, monkeypatch, case):
    """Outside a capture the tuners tune (the stubs notice it); a capture after that finds the tuned tiles
    under Triton's own key and runs them without a warning."""
    inp = _inputs(case, Dm=64)  # wide enough for several tiles to fit
    _backend_step(case, inp)
    assert stubbed.tuning_runs > 0
    runs = stubbed.tuning_runs
    _capture(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _backend_step(case, inp)
    assert stubbed.tuning_runs == runs
    assert not [w for w in caught if "while a CUDA graph is captured" in str(w.message)]


def test_bad_routes_still_raise_after_checked_calls(stubbed):
    """Cached checks are per signature and per routes tensor: other values in the same shapes are checked."""
    inp = _inputs("cross_n1_sum")
    _public_step("cross_n1_sum", inp)
    bad = inp["routes"].clone()
    bad[0, 1] = bad[0, 0]  # a pixel visited twice
    with pytest.raises(ValueError, match="at most once"):
        ops.selective_scan_2d(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], routes=bad, backend="triton")
    with pytest.raises(ValueError, match="shape"):
        ops.selective_scan_2d(inp["x"][:, :, :-1], inp["delta"], inp["A"], inp["B"], inp["C"],
                              routes=inp["routes"], backend="triton")


def test_routes_are_not_built_while_capturing(monkeypatch):
    from vmamba_zoo.layers import device_routes

    _capture(monkeypatch)
    with pytest.raises(RuntimeError, match="run the model once before capturing"):
        device_routes("cross", 3, 5, torch.device("cpu"))
