"""Benchmark of the fused Triton selective-scan kernels (GPU), with a correctness check at real shapes.

For each shape (batch 128 by default) it reports forward and forward+backward times, the bandwidth
achieved on the minimal byte count, that bandwidth as a fraction of the device's copy bandwidth
(measured in the same run), and the speedup over (a) the reference on the GPU and (b) the unfused path
gather → 1D Triton scan → scatter. Results go to stdout, ``<out>/bench_kernels.json`` and
``<out>/bench_kernels.md``.

Minimal bytes: every input read once and every output written once, in their dtypes:
    forward          = x + delta + B + C + out + (A + D + delta_bias + routes)
    forward+backward = forward + dout + x + delta + B + C + dx + ddelta + dB + dC + (dA + dD + ddelta_bias)
with x: Bt·H·W·Dm (·K when each route has its own x), delta: Bt·H·W·K·Dm, B, C: Bt·H·W·K·N,
out/dout: Bt·H·W·Dm for merge="sum" (·K for "none"). The states op (Spatial-Mamba) has no C, D and
writes every state: out = Bt·Dm·N·L fp32. Copy bandwidth = 2·bytes / time of a 1 GiB device copy.

The fused kernels alone (``triton_kernels*`` rows, and the bandwidth figures) are timed as CUDA graph
replays: GPU time, without the host's launch cost, which exceeds the GPU time of the small shapes. The op
paths (``triton_op``, ``unfused``, the reference) are timed as called, host included.

    python tools/bench_kernels.py --check --out results/   # check at real shapes, then benchmark
    python tools/bench_kernels.py --host-overhead           # CPU: the op's host time around its launches
    python tools/bench_kernels.py --registers               # CPU: registers, spills, loop instructions, sm_90
    python tools/bench_kernels.py --tile-sweep --out r/     # GPU: the time of every d_state-1 tile
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict

import torch

import vmamba_kernels as vk
from vmamba_kernels import reference

SHAPES: Dict[str, dict] = {
    # VMamba-T s1l8: cross routes summed, d_state 1, no expansion.
    "vmamba_t_s1": dict(op="2d", H=56, W=56, Dm=96, N=1, routes="cross", merge="sum"),
    "vmamba_t_s2": dict(op="2d", H=28, W=28, Dm=192, N=1, routes="cross", merge="sum"),
    "vmamba_t_s3": dict(op="2d", H=14, W=14, Dm=384, N=1, routes="cross", merge="sum"),
    "vmamba_t_s4": dict(op="2d", H=7, W=7, Dm=768, N=1, routes="cross", merge="sum"),
    # GroupMamba-T stage 1: 4 channel groups of 16, one cross route each, outputs kept per group.
    "groupmamba_t_s1": dict(op="2d", H=56, W=56, Dm=16, N=1, routes="cross", merge="none", per_route_x=True),
    # EfficientVMamba-T stage 1: atrous sub-grids, d_inner 96, d_state 16.
    "efficientvmamba_t_s1": dict(op="2d", H=56, W=56, Dm=96, N=16, routes="atrous", merge="sum"),
    # PlainMamba-L1: continuous snakes, parameters in raster order, d_inner 384, d_state 16.
    "plainmamba_l1": dict(op="2d", H=14, W=14, Dm=384, N=16, routes="continuous", merge="sum", param_raster=True),
    # Spatial-Mamba-T stage 1: one raster scan returning every state, d_inner 128, d_state 1.
    "spatialmamba_t_s1": dict(op="states", H=56, W=56, Dm=128, N=1),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# Inputs and byte counts


def make_inputs(spec, batch, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    H, W, Dm, N = spec["H"], spec["W"], spec["Dm"], spec["N"]
    L = H * W
    # Mamba's initialization: A = -[1..N], dt = softplus(delta + bias) log-uniform in [1e-3, 1e-1].
    dt_init = torch.exp(torch.rand(1, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    if spec["op"] == "states":
        A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(Dm, 1).to(device)
        bias = (dt_init + torch.expm1(-dt_init).neg().log()).expand(Dm).clone().to(device)
        return dict(u=randn(batch, Dm, L), delta=randn(batch, Dm, L, scale=0.1), A=A, B=randn(batch, N, L),
                    delta_bias=bias)
    routes = vk.scan_routes(spec["routes"], H, W).to(device)
    K = routes.shape[0]
    param_routes = routes
    if spec.get("param_raster"):
        param_routes = vk.scan_routes("raster", H, W).expand(K, -1).contiguous().to(device)
    x_shape = (batch, H, W, K, Dm) if spec.get("per_route_x") else (batch, H, W, Dm)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(K, Dm, 1).to(device)
    bias = (dt_init + torch.expm1(-dt_init).neg().log()).expand(K, Dm).clone().to(device)
    return dict(x=randn(*x_shape), delta=randn(batch, H, W, K, Dm, scale=0.1), A=A, B=randn(batch, H, W, K, N),
                C=randn(batch, H, W, K, N), D=torch.ones(K, Dm, device=device), delta_bias=bias, routes=routes,
                param_routes=param_routes, merge=spec["merge"])


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def minimal_bytes(spec, inputs):
    """(forward, forward+backward) minimal bytes, the formula of the module docstring."""
    if spec["op"] == "states":
        u, delta, A, B = inputs["u"], inputs["delta"], inputs["A"], inputs["B"]
        Bt, Dm, L = u.shape
        states = Bt * Dm * spec["N"] * L * 4
        fwd = _nbytes(u, delta, A, B, inputs["delta_bias"]) + states
        bwd = states + _nbytes(u, delta, B) + _nbytes(u, delta, B, A, inputs["delta_bias"])
        return fwd, fwd + bwd
    x, delta, B, C = inputs["x"], inputs["delta"], inputs["B"], inputs["C"]
    out_elems = delta.numel() if spec["merge"] == "none" else delta.numel() // delta.shape[3]
    out = out_elems * x.element_size()
    params = _nbytes(inputs["A"], inputs["D"], inputs["delta_bias"])
    fwd = _nbytes(x, delta, B, C) + out + params + _nbytes(inputs["routes"])
    bwd = out + 2 * _nbytes(x, delta, B, C) + params
    if inputs["param_routes"] is not inputs["routes"]:
        fwd += _nbytes(inputs["param_routes"])
    return fwd, fwd + bwd


# --------------------------------------------------------------------------------------------------
# The paths under test


def _op_call(spec, inputs, backend):
    if spec["op"] == "states":
        return vk.selective_scan_states(inputs["u"], inputs["delta"], inputs["A"], inputs["B"],
                                        delta_bias=inputs["delta_bias"], delta_softplus=True, backend=backend)
    return vk.selective_scan_2d(inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                                inputs["delta_bias"], True, routes=inputs["routes"],
                                param_routes=inputs["param_routes"], merge=inputs["merge"], backend=backend)


def unfused_2d(inputs):
    """gather into route order (step-major) → 1D Triton scan → scatter and merge, in torch ops."""
    x, delta = inputs["x"], inputs["delta"]
    H, W = delta.shape[1:3]
    routes, param_routes = inputs["routes"], inputs["param_routes"]
    folded = reference._fold_routes(x, delta, inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                                    inputs["delta_bias"], routes, param_routes)
    y = vk.selective_scan(**folded, delta_softplus=True, backend="triton")
    return reference._unfold_routes(y, routes, H, W, inputs["merge"])


def _differentiable(spec, inputs):
    names = ("u", "delta", "A", "B", "delta_bias") if spec["op"] == "states" else (
        "x", "delta", "A", "B", "C", "D", "delta_bias")
    return [inputs[n] for n in names]


def runners(spec, inputs):
    """name → (forward callable, forward+backward callable)."""
    from vmamba_kernels.triton import backend as tri

    leaves = _differentiable(spec, inputs)

    def with_grad(fn):
        dout = torch.ones_like(fn())

        def run():
            for t in leaves:
                t.requires_grad_(True)
            grads = torch.autograd.grad(fn(), leaves, dout)
            for t in leaves:
                t.requires_grad_(False)
            return grads
        return run

    result = {
        "triton_op": (lambda: _op_call(spec, inputs, "triton"), with_grad(lambda: _op_call(spec, inputs, "triton"))),
        "reference": (lambda: _op_call(spec, inputs, "reference"),
                      with_grad(lambda: _op_call(spec, inputs, "reference"))),
    }
    if spec["op"] == "2d":
        args = (inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                inputs["delta_bias"], inputs["routes"], inputs["param_routes"], True, inputs["merge"])
        dout = torch.ones_like(tri.selective_scan_2d_fwd(*args))

        def kernel_fwd_bwd(atomic=False, n1=True):
            tri.set_atomic_merge(atomic)
            tri.set_n1_kernel(n1)
            out, states = tri.selective_scan_2d_fwd_saving(*args)
            grads = tri.selective_scan_2d_bwd_from_saved(dout, *args, states)
            tri.set_atomic_merge(False)
            tri.set_n1_kernel(True)
            return out, grads

        def kernel_fwd(atomic=False, n1=True):
            tri.set_atomic_merge(atomic)
            tri.set_n1_kernel(n1)
            out = tri.selective_scan_2d_fwd(*args)
            tri.set_atomic_merge(False)
            tri.set_n1_kernel(True)
            return out

        result["triton_kernels"] = (kernel_fwd, kernel_fwd_bwd)
        if spec["N"] == 1:  # the same fused path with the general forward kernel instead of scan_n1's
            result["triton_kernels_general"] = (lambda: kernel_fwd(n1=False), lambda: kernel_fwd_bwd(n1=False))
        if inputs["merge"] == "sum":
            result["triton_kernels_atomic"] = (lambda: kernel_fwd(True), lambda: kernel_fwd_bwd(True))
        result["unfused"] = (lambda: unfused_2d(inputs), with_grad(lambda: unfused_2d(inputs)))
    return result


# --------------------------------------------------------------------------------------------------
# Correctness at real shapes


def _rel_err(got, want):
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check_shape(name, dtype_name, batch=2, device="cuda"):
    """Triton vs reference (outputs and every gradient) and run-to-run bitwise equality."""
    spec = SHAPES[name]
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(spec, batch, dtype, device, seed=1)
    leaves = _differentiable(spec, inputs)
    results = {}
    for backend in ("reference", "triton", "triton"):
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        out = _op_call(spec, inputs, backend)
        g = torch.Generator(device="cpu").manual_seed(2)
        dout = torch.randn(out.shape, generator=g).to(device=device, dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        for t in leaves:
            t.requires_grad_(False)
        results.setdefault(backend, []).append([out.detach()] + [gr.detach() for gr in grads])
    ref, (tri1, tri2) = results["reference"][0], results["triton"]
    names = ["out"] + ["d" + n for n in ("u delta A B delta_bias" if spec["op"] == "states"
                                         else "x delta A B C D delta_bias").split()]
    errs = {n: _rel_err(a, b) for n, a, b in zip(names, tri1, ref)}
    deterministic = all(torch.equal(a, b) for a, b in zip(tri1, tri2))
    if spec["op"] == "2d":  # warm the unfused path's kernels too
        with torch.no_grad():
            unfused_2d(inputs)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    return dict(shape=name, dtype=dtype_name, batch=batch, rel_err=errs, deterministic=deterministic,
                passed=deterministic and all(e <= tol for e in errs.values()), tolerance=tol)


def _check_worker(args):
    """One check; for the benchmark's dtype also one run of every benchmarked path, which compiles them."""
    name, dtype_name, warm = args
    result = check_shape(name, dtype_name)
    if warm:
        spec = SHAPES[name]
        for fwd, fwd_bwd in runners(spec, make_inputs(spec, 2, DTYPES[dtype_name], "cuda")).values():
            fwd()
            fwd_bwd()
    return result


def run_checks(names, dtypes, workers, bench_dtype):
    """Checks in parallel processes: they also compile every kernel variant into Triton's disk cache."""
    jobs = [(n, d, d == bench_dtype) for n in names for d in dtypes]
    if workers <= 1:
        return [_check_worker(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(_check_worker, jobs, chunksize=1)


# --------------------------------------------------------------------------------------------------
# Timing


def copy_bandwidth(device="cuda"):
    import triton.testing

    src = torch.randn(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def time_ms(fn, slow=False, graph=False):
    """Median milliseconds of fn. ``graph``: replayed from a CUDA graph, which times the GPU alone (the
    kernels of small shapes finish before the host has launched the next)."""
    import triton.testing

    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=150, return_mode="median")
    if slow:  # the reference: a few plain runs
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def bench_shape(name, batch, dtype_name, copy_bw, with_reference=True):
    spec = SHAPES[name]
    inputs = make_inputs(spec, batch, DTYPES[dtype_name], "cuda")
    fwd_bytes, total_bytes = minimal_bytes(spec, inputs)
    row = dict(shape=name, batch=batch, dtype=dtype_name, spec=spec, fwd_min_bytes=fwd_bytes,
               fwd_bwd_min_bytes=total_bytes, ms={})
    for path, (fwd, fwd_bwd) in runners(spec, inputs).items():
        if path == "reference" and not with_reference:
            continue
        slow = path == "reference"
        graph = path.startswith("triton_kernels")  # the kernels alone; the op paths with their host time
        row["ms"][path] = dict(fwd=time_ms(fwd, slow, graph), fwd_bwd=time_ms(fwd_bwd, slow, graph))
        torch.cuda.empty_cache()
    main = row["ms"].get("triton_kernels", row["ms"]["triton_op"])
    row["fwd_tb_s"] = fwd_bytes / (main["fwd"] * 1e-3) / 1e12
    row["fwd_bwd_tb_s"] = total_bytes / (main["fwd_bwd"] * 1e-3) / 1e12
    row["fwd_copy_fraction"] = row["fwd_tb_s"] * 1e12 / copy_bw
    row["fwd_bwd_copy_fraction"] = row["fwd_bwd_tb_s"] * 1e12 / copy_bw
    for other in ("reference", "unfused"):
        if other in row["ms"]:
            row[f"speedup_vs_{other}"] = {k: row["ms"][other][k] / row["ms"]["triton_op"][k]
                                          for k in ("fwd", "fwd_bwd")}
    return row


class _NoLaunch:
    """Stands in for a kernel or an autotuner: indexing with a grid gives a launch that does nothing."""

    def __init__(self, configs=()):
        self.configs = list(configs)
        self.best_config = self.configs[0] if self.configs else None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_overhead(names, repeats=7, calls=100):
    """Host time of one op call (forward, forward+backward) with every kernel launch stubbed out, on CPU
    tensors of each shape's kind at 8×8 pixels and batch 2: what the Python and torch code around the kernels
    costs, which bounds small-batch latency. Triton's own launch cost is not included."""
    from vmamba_kernels.triton import launches, route_plan, scan, tiles

    saved = (launches.fwd_tuner, launches.bwd_tuner, scan.selective_scan_fwd_kernel, scan.selective_scan_bwd_kernel,
             route_plan.route_plan_kernel, launches.n1_tuner, launches.n1_bwd_tuner)
    launches.fwd_tuner, launches.bwd_tuner = _NoLaunch(), _NoLaunch(saved[1].configs)
    launches.n1_tuner, launches.n1_bwd_tuner = _NoLaunch(), _NoLaunch(saved[6].configs)
    scan.selective_scan_fwd_kernel = scan.selective_scan_bwd_kernel = route_plan.route_plan_kernel = _NoLaunch()
    tiles.bwd_block_d_candidates.cache_clear()
    tiles.n1_bwd_block_d_candidates.cache_clear()
    # backend='triton' takes CPU tensors only where Triton could run on them; no kernel runs here at all.
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    rows = []
    try:
        for name in names:
            spec = dict(SHAPES[name], H=8, W=8)
            inputs = make_inputs(spec, 2, torch.float32, "cpu")
            row = dict(shape=name)
            for mode, fn in zip(("fwd", "fwd_bwd"), runners(spec, inputs)["triton_op"]):
                for _ in range(10):
                    fn()
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best = min(best, (time.perf_counter() - start) / calls)
                row[f"{mode}_us"] = best * 1e6
            rows.append(row)
            print(f"{name:22s} host time per op call: forward {row['fwd_us']:.0f} us, "
                  f"forward+backward {row['fwd_bwd_us']:.0f} us", flush=True)
    finally:
        (launches.fwd_tuner, launches.bwd_tuner, scan.selective_scan_fwd_kernel, scan.selective_scan_bwd_kernel,
         route_plan.route_plan_kernel, launches.n1_tuner, launches.n1_bwd_tuner) = saved
        tiles.bwd_block_d_candidates.cache_clear()
        tiles.n1_bwd_block_d_candidates.cache_clear()
        if interpret is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = interpret
    return rows


class _Capture:
    """Stands in for an autotuner: records the arguments of each launch instead of running it."""

    def __init__(self, tuner):
        self.configs, self.best_config, self.launches = tuner.configs, tuner.configs[0], []

    def __getitem__(self, grid):
        return lambda **kwargs: self.launches.append(kwargs)


def _captured_launches(spec, tri):
    """(tuner, arguments) of every tuned launch of the training path (forward saving chunk states, then the
    backward) at ``spec``'s shape, batch 2 on CPU with every launch stubbed out; both with the d_state-1 kernels
    (d_state 1) or the step-by-step forward (d_state > 1) and with the general ones."""
    from vmamba_kernels.triton import launches, route_plan, tiles

    names = ("fwd_tuner", "bwd_tuner", "n1_tuner", "n1_bwd_tuner", "steps_tuner")
    saved = {n: getattr(launches, n) for n in names}
    saved_plan_kernel = route_plan.route_plan_kernel
    captures = {n: _Capture(saved[n]) for n in names}
    steps_default = launches.settings["steps_kernel"]
    try:
        for n in names:
            setattr(launches, n, captures[n])
        route_plan.route_plan_kernel = _NoLaunch()
        inputs = make_inputs(spec, 2, torch.bfloat16, "cpu")
        own_kernel = tri.set_n1_kernel if spec["N"] == 1 else tri.set_steps_kernel
        for own in ((True, False) if spec["op"] == "2d" else (True,)):
            own_kernel(own)
            if spec["op"] == "states":
                args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["delta_bias"], True)
                tri.selective_scan_states_bwd(torch.ones(*inputs["u"].shape[:2], spec["N"], inputs["u"].shape[2]),
                                              *args)
            else:
                args = (inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                        inputs["delta_bias"], inputs["routes"], inputs["param_routes"], True, inputs["merge"])
                out, states = tri.selective_scan_2d_fwd_saving(*args)
                tri.selective_scan_2d_bwd_from_saved(torch.ones_like(out), *args, states)
    finally:
        tri.set_n1_kernel(True)
        tri.set_steps_kernel(steps_default)
        for n in names:
            setattr(launches, n, saved[n])
        route_plan.route_plan_kernel = saved_plan_kernel
        tiles.bwd_block_d_candidates.cache_clear()
        tiles.n1_bwd_block_d_candidates.cache_clear()
    return [(n, saved[n], kw) for n in names for kw in captures[n].launches]


def register_report(names):
    """Registers and spills of every tile the tuners may try for each shape (training path: forward saving
    chunk states, then the backward), compiled offline for sm_90 with the arguments the launchers pass (their
    strides and pointers specialized as Triton does at launch)."""
    from vmamba_kernels.triton import backend as tri
    from vmamba_kernels.triton import offline, tiles

    prunes = {"fwd_tuner": tiles.prune_fwd, "bwd_tuner": tiles.prune_bwd, "n1_tuner": tiles.prune_n1,
              "n1_bwd_tuner": tiles.prune_n1_bwd, "steps_tuner": tiles.prune_steps}
    labels = {"fwd_tuner": "forward", "bwd_tuner": "backward", "n1_tuner": "forward, d_state 1",
              "n1_bwd_tuner": "backward, d_state 1", "steps_tuner": "forward, step by step"}
    rows = []
    for name in names:
        for tuner_name, tuner, kw in _captured_launches(SHAPES[name], tri):
            fn = tuner.fn
            while not hasattr(fn, "params"):  # the kernel under the autotuner's heuristics
                fn = fn.fn
            heuristics = tuner.fn.values if hasattr(tuner.fn, "values") else {}
            for cfg in prunes[tuner_name](tuner.configs, {}, **kw):
                args = dict(kw, **cfg.kwargs)
                args.update({k: rule(args) for k, rule in heuristics.items()})
                constants = {p.name: args[p.name] for p in fn.params if p.is_constexpr}
                values = {p.name: args[p.name] for p in fn.params if not p.is_constexpr}
                compiled = offline.compile_kernel(fn, constants, cfg.num_warps, maxnreg=cfg.maxnreg, args=values)
                usage = offline.resource_usage(compiled)
                loop = sum(offline.inner_loop_instructions(compiled).values())
                # a d_state-1 thread holds TT steps × VEC channels of each chunk
                per_thread = cfg.kwargs["TT"] * cfg.kwargs["VEC"] if "TT" in cfg.kwargs else None
                tile = ", ".join(f"{k} {v}" for k, v in cfg.kwargs.items())
                cap = f", cap {cfg.maxnreg}" if cfg.maxnreg else ""
                rows.append(dict(shape=name, kernel=labels[tuner_name], tile=tile, warps=cfg.num_warps,
                                 maxnreg=cfg.maxnreg, loop_instructions=loop, elements_per_thread=per_thread,
                                 **usage))
                per_element = f" ({loop / per_thread:.0f} per element)" if per_thread else ""
                print(f"{name:22s} {labels[tuner_name]:19s} {tile}, {cfg.num_warps} warps{cap}: "
                      f"{usage.get('registers')} registers, {usage.get('spill_stores', 0)} B spill stores, "
                      f"chunk loop {loop} instructions{per_element}", flush=True)
    return rows


def sweep_configs():
    """The d_state-1 tiles a sweep times, wider grids than the tuners hold. Forward: TT steps per thread, LT
    segments and BD / VEC channel lanes on 1 to 8 warps, up to 16 values per thread, each also capped at 168
    registers. Backward: chunks of TT·LT = chunk_size(1) steps, likewise, each with and without the adjoint's
    flips, uncapped and capped at 168 registers, and capped at 128 without prefetching."""
    import triton

    from vmamba_kernels.triton import tiles

    bwd = []
    for TT in (2, 4, 8):
        LT = tiles.chunk_size(1) // TT
        for BD in (4, 8, 16, 32):
            for VEC in (2, 4):
                lanes = BD // VEC * LT
                if VEC > BD or (TT == 8 and VEC == 4) or not 32 <= lanes <= 256:  # TT 8 × VEC 4 spills
                    continue
                for flip in (True, False):
                    tile = dict(TT=TT, LT=LT, BD=BD, VEC=VEC, FLIP=flip)
                    bwd += [triton.Config(dict(tile, PREFETCH=pf), num_warps=lanes // 32, maxnreg=cap)
                            for pf, cap in ((True, None), (True, 168), (False, 128))]
    fwd = list(tiles.n1_tuner.configs)
    for TT in (2, 4, 8):
        for LT in (4, 8, 16):
            for BD, VEC in ((16, 2), (16, 4), (32, 2), (32, 4)):
                lanes = BD // VEC * LT
                for cap in (None, 168):
                    cfg = triton.Config(dict(TT=TT, LT=LT, BD=BD, VEC=VEC, PREFETCH=True), num_warps=lanes // 32,
                                        maxnreg=cap)
                    if TT * VEC <= 16 and 32 <= lanes <= 256 and not any(
                            c.kwargs == cfg.kwargs and c.num_warps == cfg.num_warps and c.maxnreg == cap
                            for c in fwd):
                        fwd.append(cfg)
    return {"forward": fwd, "forward saving states": fwd, "backward": bwd}


def _sweep_runs(spec, batch, dtype):
    """(kernel, tuner, run) of each d_state-1 kernel at ``spec``'s shape."""
    from vmamba_kernels.triton import backend as tri
    from vmamba_kernels.triton import tiles

    inputs = make_inputs(spec, batch, dtype, "cuda")
    args = (inputs["x"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
            inputs["delta_bias"], inputs["routes"], inputs["param_routes"], True, inputs["merge"])
    out, states = tri.selective_scan_2d_fwd_saving(*args)
    dout = torch.ones_like(out)
    return [("forward", tiles.n1_tuner, lambda: tri.selective_scan_2d_fwd(*args)),
            ("forward saving states", tiles.n1_tuner, lambda: tri.selective_scan_2d_fwd_saving(*args)),
            ("backward", tiles.n1_bwd_tuner, lambda: tri.selective_scan_2d_bwd_from_saved(dout, *args, states))]


def _with_config(tuner, cfg, fn):
    """fn() with the tuner holding only cfg; the exception's name instead where this Triton cannot build it."""
    from vmamba_kernels.triton import tiles

    all_configs = tuner.configs
    tuner.configs = [cfg]
    tuner.cache.clear()
    tiles.n1_bwd_block_d_candidates.cache_clear()  # sizes the backward's per-block workspaces
    try:
        return fn()
    except Exception as e:  # a tile this Triton cannot compile, or one the tuner prunes
        return type(e).__name__
    finally:
        tuner.configs = all_configs
        tuner.cache.clear()
        tiles.n1_bwd_block_d_candidates.cache_clear()


def _max_rel_err(got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return max(_rel_err(g.float(), w.float()) for g, w in zip(got, want) if w is not None)


def _sweep_warm(job):
    """One tile's first launch at batch 2, in a worker: it compiles the tile into Triton's disk cache."""
    name, kernel, index, dtype_name = job
    for k, tuner, run in _sweep_runs(SHAPES[name], 2, DTYPES[dtype_name]):
        if k == kernel:
            _with_config(tuner, sweep_configs()[kernel][index], lambda: (run(), torch.cuda.synchronize()))


def tile_sweep(names, batch, dtype_name, workers=1):
    """Time every tile of ``sweep_configs`` on each d_state-1 2D shape, one tile at a time and as CUDA graph
    replays like the fused kernels in ``bench_shape``: the forward without and with saved chunk states, and the
    backward from saved states. Workers compile the tiles first."""
    configs = sweep_configs()
    names = [n for n in names if SHAPES[n]["op"] == "2d" and SHAPES[n]["N"] == 1]
    jobs = [(n, kernel, i, dtype_name) for n in names for kernel, cfgs in configs.items() for i in range(len(cfgs))]
    if workers > 1:
        import multiprocessing as mp

        t0 = time.time()
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_sweep_warm, jobs, chunksize=1)
        print(f"compiled {len(jobs)} tiles in {time.time() - t0:.0f}s", flush=True)
    rows = []
    for name in names:
        for kernel, tuner, run in _sweep_runs(SHAPES[name], batch, DTYPES[dtype_name]):
            want = run()  # the tuned tiles' result: every tile must give the same
            for cfg in configs[kernel]:
                got = _with_config(tuner, cfg, run)
                ms = got if isinstance(got, str) else _with_config(tuner, cfg, lambda: time_ms(run, graph=True))
                failed = isinstance(ms, str)
                err = None if failed else _max_rel_err(got, want)
                rows.append(dict(shape=name, kernel=kernel, config=str(cfg), ms=None if failed else ms,
                                 rel_err_vs_tuned=err, error=ms if failed else None))
                tile = f"{cfg.kwargs} warps {cfg.num_warps} cap {cfg.maxnreg}"
                print(f"{name:18s} {kernel:22s} {tile:100s} "
                      + (ms if failed else f"{ms:.3f} ms  rel err vs tuned {err:.1e}"), flush=True)
    return rows


def tuned_configs():
    from vmamba_kernels.triton import tiles

    return [dict(kernel=kernel, key=[str(k) for k in key], config=str(cfg))
            for kernel, tuner in (("forward", tiles.fwd_tuner), ("forward d_state 1", tiles.n1_tuner),
                                  ("backward", tiles.bwd_tuner), ("backward d_state 1", tiles.n1_bwd_tuner))
            for key, cfg in tuner.cache.items()]


def markdown(report):
    lines = [f"Device: {report['device']}; {report['date']}; commit {report['commit']}; torch {report['torch']}, "
             f"triton {report['triton']}.", f"Command: `{report['command']}`", "",
             f"Copy bandwidth (1 GiB device copy, read + write): {report['copy_tb_s']:.2f} TB/s", ""]
    if report.get("checks"):
        lines += ["| check (batch 2) | dtype | max rel. err | deterministic | passed |", "|---|---|---|---|---|"]
        for c in report["checks"]:
            worst = max(c["rel_err"], key=c["rel_err"].get)
            lines.append(f"| {c['shape']} | {c['dtype']} | {c['rel_err'][worst]:.2e} ({worst}) | "
                         f"{c['deterministic']} | {c['passed']} |")
        lines.append("")
    lines += ["| shape | fwd ms | fwd+bwd ms | fwd TB/s (of copy) | fwd+bwd TB/s (of copy) | op fwd / fwd+bwd ms | "
              "atomic fwd / fwd+bwd ms | general fwd kernel, fwd / fwd+bwd ms | vs reference | vs unfused |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ms = r["ms"]
        main = ms.get("triton_kernels", ms["triton_op"])
        atomic = ms.get("triton_kernels_atomic")
        general = ms.get("triton_kernels_general")
        speed = {o: r.get(f"speedup_vs_{o}") for o in ("reference", "unfused")}
        fmt = {o: (f"{s['fwd']:.1f}× / {s['fwd_bwd']:.1f}×" if s else "–") for o, s in speed.items()}
        atomic_ms = f"{atomic['fwd']:.3f} / {atomic['fwd_bwd']:.3f}" if atomic else "–"
        general_ms = f"{general['fwd']:.3f} / {general['fwd_bwd']:.3f}" if general else "–"
        lines.append(
            f"| {r['shape']} ({r['dtype']}) | {main['fwd']:.3f} | {main['fwd_bwd']:.3f} | "
            f"{r['fwd_tb_s']:.2f} ({100 * r['fwd_copy_fraction']:.0f}%) | "
            f"{r['fwd_bwd_tb_s']:.2f} ({100 * r['fwd_bwd_copy_fraction']:.0f}%) | "
            f"{ms['triton_op']['fwd']:.3f} / {ms['triton_op']['fwd_bwd']:.3f} | {atomic_ms} | {general_ms} | "
            f"{fmt['reference']} | {fmt['unfused']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--check", action="store_true", help="check triton against the reference first")
    parser.add_argument("--check-dtypes", nargs="*", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--workers", type=int, default=16, help="processes for the checks (they compile in parallel)")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the reference")
    parser.add_argument("--profile", action="store_true",
                        help="only run each shape's fused forward 3 times and forward+backward twice, untimed "
                             "(for a profiler; set VMAMBA_KERNELS_TUNE=0 so that no tuning launches interleave)")
    parser.add_argument("--host-overhead", action="store_true",
                        help="only measure the host time of the op around its (stubbed) launches, on CPU")
    parser.add_argument("--registers", action="store_true",
                        help="only compile the tiles the tuners may try for sm_90 (no GPU) and print their registers, "
                             "spills and chunk-loop instructions")
    parser.add_argument("--tile-sweep", action="store_true",
                        help="only time every tile of the d_state-1 kernels on the d_state-1 shapes (GPU)")
    parser.add_argument("--out", default=".")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    if args.host_overhead:
        host_overhead(args.shapes)
        return
    if args.registers:
        register_report(args.shapes)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    import triton

    if args.tile_sweep:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tile_sweep.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, commit=args.commit,
                           rows=tile_sweep(args.shapes, args.batch, args.dtype, args.workers)), f, indent=1)
        return
    if args.profile:
        for name in args.shapes:
            fwd, fwd_bwd = runners(SHAPES[name], make_inputs(SHAPES[name], args.batch, DTYPES[args.dtype], "cuda"))[
                "triton_kernels" if SHAPES[name]["op"] == "2d" else "triton_op"]
            for _ in range(3):
                fwd()
            for _ in range(2):
                fwd_bwd()
        torch.cuda.synchronize()
        return

    report = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), torch=torch.__version__, triton=triton.__version__,
        command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:] if argv is None else argv))
    report["commit"] = args.commit
    if report["commit"] is None:
        try:
            report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            pass
        report["commit"] = report["commit"] or "unknown"
    os.makedirs(args.out, exist_ok=True)
    if args.check:
        t0 = time.time()
        report["checks"] = run_checks(args.shapes, args.check_dtypes, args.workers, args.dtype)
        for c in report["checks"]:
            print(f"check {c['shape']:22s} {c['dtype']:5s} passed={c['passed']} deterministic={c['deterministic']} "
                  + " ".join(f"{k}={v:.1e}" for k, v in c["rel_err"].items()), flush=True)
        print(f"checks took {time.time() - t0:.0f}s", flush=True)
    report["copy_tb_s"] = copy_bandwidth() / 1e12
    print(f"copy bandwidth {report['copy_tb_s']:.2f} TB/s", flush=True)
    report["rows"] = []
    for name in args.shapes:
        t0 = time.time()
        row = bench_shape(name, args.batch, args.dtype, report["copy_tb_s"] * 1e12, not args.no_reference)
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "spec"}), f"({time.time() - t0:.0f}s)", flush=True)
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
            json.dump(report, f, indent=1)
    report["tuned"] = tuned_configs()
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "bench_kernels.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
