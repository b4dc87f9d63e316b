"""The Triton backend against the reference, on CPU under TRITON_INTERPRET=1.

Triton decides at import whether kernels are interpreted, and other tests of the session may already
have imported this backend for real GPUs; so the checks run in a child process that sets
TRITON_INTERPRET=1 before importing anything (``python test_triton.py <group>``). The child prints one
JSON line per compared quantity; the tests here assert on them.

Every check draws fresh random inputs, poisons the backend's fresh buffers with NaN (an unwritten
element cannot pass), compares outputs and all gradients with the reference by a norm-relative error
(fp32 1e-3, bf16/fp16 5e-2, as mamba_ssm's tests), and runs the backend twice to require bitwise equal
results. Shapes are tiny: the interpreter runs every tile operation in Python.
"""
import json
import os
import subprocess
import sys

import pytest

TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
GROUPS = ("scan_1d", "states", "cross_sum", "continuous_params", "atrous_odd", "multihead_none", "per_route_x",
          "batch_split", "single_state", "adjoint_forms", "steps")
WIDER_OUT_CASES = 6  # cases of the "wider_out" group


def _run_group(group):
    # One group runs the forward kernel without software prefetching (the loads after the compute).
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               VMAMBA_KERNELS_PREFETCH="0" if group == "per_route_x" else "1")
    proc = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"checks of {group!r} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("group", GROUPS)
def test_triton_matches_reference(group):
    records = _run_group(group)
    compared = [r for r in records if r["kind"] == "compare"]
    assert compared, f"no comparisons ran for {group}"
    bad = [r for r in compared if not (r["finite"] and r["rel_err"] <= TOLERANCE[r["dtype"]])]
    assert not bad, "\n".join(f"{r['case']} {r['name']} ({r['dtype']}): rel_err={r['rel_err']:.3g} "
                              f"finite={r['finite']}" for r in bad)
    repeats = [r for r in records if r["kind"] == "repeat"]
    assert repeats and all(r["bitwise_equal"] for r in repeats), [r for r in repeats if not r["bitwise_equal"]]


def test_wider_out_dtype_is_the_scan_of_a_widened_copy_of_x():
    """bf16 x with out_dtype fp32 gives, bit for bit, the output and every gradient of the scan of an fp32
    copy of x (x's gradient rounded to bf16 as the copy's backward rounds it), on the d_state-1 and the
    general kernels, merge "none" (GroupMamba's) and "sum", shared and per-route x."""
    records = [r for r in _run_group("wider_out") if r["kind"] == "equal"]
    assert len(records) == WIDER_OUT_CASES * 2 * 8, len(records)  # two paths, out and 7 gradients each
    bad = [r for r in records if not (r["finite"] and r["equal"])]
    assert not bad, "\n".join(f"{r['case']} {r['name']} {r['dtypes']}: equal={r['equal']} finite={r['finite']}"
                              for r in bad)


@pytest.mark.parametrize("CPG", [1, 3, 4, 8, 16, 96, 384, 768])
def test_single_state_tiles_fit_every_channel_count(CPG):
    """The d_state-1 tuners keep a tile for any channel count (Triton raises on an empty list), backward tiles
    span one saved chunk, and the backward's workspaces (sized for the narrowest kept block) fit every tile."""
    from vmamba_kernels.triton import tiles

    for save_chunks in (True, False):
        kept = tiles.prune_n1(tiles.n1_tuner.configs, {}, CPG=CPG, SAVE_CHUNKS=save_chunks,
                                 SAVE_T=tiles.chunk_size(1))
        assert kept, (CPG, save_chunks)
    kept = tiles.prune_n1_bwd(tiles.n1_bwd_tuner.configs, {}, CPG=CPG)
    assert kept and all(c.kwargs["TT"] * c.kwargs["LT"] == tiles.chunk_size(1) for c in kept)
    mode = tiles.tune_mode()
    tiles.set_tune_mode("tune")  # every kept tile may run: the workspaces fit the narrowest
    try:
        assert min(c.kwargs["BD"] for c in kept) >= min(tiles.n1_bwd_block_d_candidates(CPG))
    finally:
        tiles.set_tune_mode(mode)
    assert kept[0].kwargs["BD"] in tiles.n1_bwd_block_d_candidates(CPG)


def test_single_state_tiles_fill_their_warps():
    """Each d_state-1 tile puts BD / VEC channel lanes next to LT segment lanes and fills its warps exactly:
    more lanes would spread a segment's steps over threads, fewer would repeat work."""
    from vmamba_kernels.triton import tiles

    for TT, LT, BD, VEC, warps, *_ in tiles.N1_TILES + tiles.N1_BWD_TILES:
        assert BD // VEC * LT == 32 * warps, (TT, LT, BD, VEC, warps)


def _cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="the compiled kernels need a CUDA device")
def test_steps_forward_on_cuda_matches_the_reference_with_every_tile():
    """On the device, every tile of the step-by-step forward (the tuner's whole list): model-like problems
    (EfficientVMamba's cross routes with bf16 B and C read 4 at a time, PlainMamba's snakes with raster parameters,
    ViM2's one-channel scans with images on lanes), outputs and every gradient (through the backward that reads
    its chunk states) against the fp64 reference."""
    import torch

    import vmamba_kernels as vk
    from vmamba_kernels import reference
    from vmamba_kernels.triton import backend as tri
    from vmamba_kernels.triton import launches, tiles

    g = torch.Generator().manual_seed(5)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def cross_problem(H, W, Dm, N, routes, param_routes):
        K = routes.shape[0]
        return (randn(2, H, W, Dm), randn(2, H, W, K, Dm, scale=0.5) - 0.2, -(torch.rand(K, Dm, N, generator=g) + 0.3),
                randn(2, H, W, K, N), randn(2, H, W, K, N), randn(K, Dm), randn(K, Dm, scale=0.3), routes,
                param_routes, True, "sum")

    raster = vk.scan_routes("raster", 7, 7).expand(4, -1).contiguous()
    problems = {"cross": cross_problem(14, 14, 96, 16, vk.scan_routes("cross", 14, 14), None),
                "snakes_raster_params": cross_problem(7, 7, 40, 16, vk.scan_routes("continuous", 7, 7), raster)}
    configs = list(tiles.steps_tuner.configs)
    previous = launches.settings["steps_kernel"]
    launches.set_steps_kernel(True)
    try:
        for name, args in problems.items():
            args = list(args)
            args[8] = args[7] if args[8] is None else args[8]
            cpu = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            ref_out = reference.selective_scan_2d_ref(*cpu[:7], True, cpu[7], cpu[8], "sum")
            dout = randn(*ref_out.shape)
            ref_grads = reference.selective_scan_2d_bwd_ref(dout.double(), *cpu[:7], True, cpu[7], cpu[8], "sum")
            for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
                dev = [a.cuda() for a in args[:9]]
                dev = [a.to(dtype) if i in (0, 1, 3, 4) else a for i, a in enumerate(dev)]
                for cfg in configs:
                    tiles.steps_tuner.configs = [cfg]
                    tiles.steps_tuner.cache.clear()
                    out, states = tri.selective_scan_2d_fwd_saving(*dev, True, "sum")
                    grads = tri.selective_scan_2d_bwd_from_saved(dout.cuda().to(dtype), *dev, True, "sum", states)
                    label = f"{name} {dtype} {tiles.config_label(cfg)}"
                    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
                        got = got.double().cpu()
                        assert torch.isfinite(got).all(), label
                        assert float((got - want).norm() / want.norm()) < tol, label
        # ViM2's channel mixer: one channel per scan, images on lanes, B and C broadcast over scans and steps
        T, K, L, N = 300, 2, 40, 16
        u, delta = randn(T, K, L), torch.rand(T, K, L, generator=g) * 0.5
        b, c = randn(1, K, N, 1).expand(T, K, N, L), randn(1, K, N, 1).expand(T, K, N, L)
        A, bias = -(torch.rand(K, N, generator=g) + 0.3), randn(K, scale=0.3)
        ref_out = reference.selective_scan_ref(u.double(), delta.double(), A.double(), b.double(), c.double(), None,
                                               None, bias.double(), True)
        for cfg in configs:
            tiles.steps_tuner.configs = [cfg]
            tiles.steps_tuner.cache.clear()
            out, _ = tri.selective_scan_fwd(u.cuda(), delta.cuda(), A.cuda(), b.cuda(), c.cuda(), None, None,
                                            bias.cuda(), True)
            assert float((out.double().cpu() - ref_out).norm() / ref_out.norm()) < 1e-3, tiles.config_label(cfg)
    finally:
        tiles.steps_tuner.configs = configs
        tiles.steps_tuner.cache.clear()
        launches.set_steps_kernel(previous)


@pytest.mark.parametrize("N", [1, 2, 3, 4, 8, 16, 32, 64, 256])
def test_backward_tiles_fit_every_problem(N):
    """The backward's tuner must always keep a config (Triton raises on an empty list), lead with the default
    tile, and only offer channel blocks and tile sizes the kernel is built for."""
    from vmamba_kernels.triton import tiles

    for CPG in (1, 3, 16, 96, 384, 1024):
        BT, BN = tiles.chunk_size(N), tiles.next_pow2(N)
        kept = tiles.prune_bwd(tiles.bwd_tuner.configs, {}, BT=BT, BN=BN, CPG=CPG, N=N)
        assert kept, (CPG, N)
        first = kept[0]
        assert first.kwargs["BD"] == tiles.bwd_block_d(CPG, N) and first.num_warps == 8
        assert first.maxnreg is None
        for cfg in kept:
            BD = cfg.kwargs["BD"]
            assert BD <= max(1, tiles.next_pow2(CPG)), (CPG, N, BD)
            assert cfg is first or 1024 <= BT * BD * BN <= 4096, (CPG, N, BD)
        assert len({(c.kwargs["BD"], c.num_warps, c.maxnreg) for c in kept}) == len(kept)
        assert first.kwargs["BD"] in tiles.bwd_block_d_candidates(CPG, N)
        mode = tiles.tune_mode()
        tiles.set_tune_mode("tune")  # every kept tile may run: the workspaces fit the narrowest
        try:
            assert min(tiles.bwd_block_d_candidates(CPG, N)) == min(c.kwargs["BD"] for c in kept)
        finally:
            tiles.set_tune_mode(mode)


@pytest.mark.parametrize("N, CPG, save_chunks", [(1, 96, True), (1, 96, False), (1, 16, False), (16, 384, True),
                                                  (16, 1, False)])
def test_forward_tiles_lead_with_the_main_list_then_the_lean_ones(N, CPG, save_chunks):
    from vmamba_kernels.triton import tiles

    BN, save_t = tiles.next_pow2(N), tiles.chunk_size(N)
    kept = tiles.prune_fwd(tiles.fwd_tuner.configs, {}, BN=BN, CPG=CPG, SAVE_T=save_t, SAVE_CHUNKS=save_chunks)
    assert kept and kept[0].maxnreg is None
    assert len(kept) <= 4 + len(tiles.FWD_LEAN_TILES)
    main_list = tiles.fwd_tuner.configs[:len(tiles.FWD_TILES)]
    from_main = [c in main_list for c in kept]
    assert from_main == sorted(from_main, reverse=True), "lean tiles come last"
    for cfg in kept:
        BT, BD = cfg.kwargs["BT"], cfg.kwargs["BD"]
        assert cfg is kept[0] or (BD <= max(8, tiles.next_pow2(CPG)) and 256 <= BT * BD * BN <= 4096), cfg
        assert not (save_chunks and BT > save_t), cfg


# --------------------------------------------------------------------------------------------------
# The child process


def _child(group):
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    torch.set_num_threads(1)
    _vectorize_interpreter_scan()
    import vmamba_kernels as vk
    from oracle import wider_out_and_copy_forms  # this file's folder: the child runs it as a script
    from vmamba_kernels import reference
    from vmamba_kernels.triton import alloc
    from vmamba_kernels.triton import backend as tri
    from vmamba_kernels.triton import launches
    from vmamba_kernels.triton import tiles

    alloc.poison(True)
    # The groups test the chunked d_state > 1 forward; the step-by-step one (the GPU default) has its own group.
    launches.set_steps_kernel(group == "steps")

    def emit(**record):
        print(json.dumps(record), flush=True)

    def compare(case, names, got, want, dtype):
        for name, g, w in zip(names, got, want):
            if w is None:
                assert g is None, f"{case}: {name} should be None"
                continue
            g64, w64 = g.double(), w.double()
            finite = bool(torch.isfinite(g64).all())
            err = float((g64 - w64).norm() / w64.norm().clamp_min(1e-30)) if finite else float("inf")
            emit(kind="compare", case=case, name=name, dtype=str(dtype).replace("torch.", ""), rel_err=err,
                 finite=finite)

    def equal(case, names, got, want):
        for name, g, w in zip(names, got, want):
            same = g.dtype == w.dtype and torch.equal(g, w)
            emit(kind="equal", case=case, name=name, dtypes=[str(g.dtype), str(w.dtype)], equal=same,
                 finite=bool(torch.isfinite(g).all()))

    def repeat(case, run):
        first, second = run(), run()
        equal = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(first, second))
        emit(kind="repeat", case=case, bitwise_equal=equal)

    def scan_1d(case, Bt, Dm, L, N, G, dtype, D, z, bias, softplus, last):
        u = torch.randn(Bt, Dm, L).to(dtype)
        delta = (torch.rand(Bt, Dm, L) * 0.8 - 0.4 if softplus else torch.rand(Bt, Dm, L) * 0.5).to(dtype)
        A = -(torch.rand(Dm, N) + 0.3)
        B = torch.randn(*((Bt, G, N, L) if G else (Bt, N, L))).to(dtype)
        C = torch.randn(*((Bt, G, N, L) if G else (Bt, N, L))).to(dtype)
        Dv = torch.randn(Dm) if D else None
        zv = torch.randn(Bt, Dm, L).to(dtype) if z else None
        bv = torch.randn(Dm) * 0.3 if bias else None
        args = (u, delta, A, B, C, Dv, zv, bv, softplus)
        out, state = tri.selective_scan_fwd(*args)
        ref_out, ref_state = reference.selective_scan_ref(*args, return_last_state=True)
        compare(case, ("out", "last_state"), (out, state), (ref_out, ref_state), dtype)
        dout = torch.randn_like(ref_out)
        dlast = torch.randn_like(ref_state) if last else None
        names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")
        compare(case, names, tri.selective_scan_bwd(dout, dlast, *args),
                reference.selective_scan_bwd_ref(dout, dlast, *args), dtype)
        repeat(case, lambda: (*tri.selective_scan_fwd(*args), *tri.selective_scan_bwd(dout, dlast, *args)))

    def states(case, Bt, Dm, L, N, G, dtype, bias, softplus):
        u = torch.randn(Bt, Dm, L).to(dtype)
        delta = (torch.rand(Bt, Dm, L) * 0.5).to(dtype)
        A = -(torch.rand(Dm, N) + 0.3)
        B = torch.randn(*((Bt, G, N, L) if G else (Bt, N, L))).to(dtype)
        bv = torch.randn(Dm) * 0.3 if bias else None
        args = (u, delta, A, B, bv, softplus)
        compare(case, ("states",), (tri.selective_scan_states_fwd(*args),),
                (reference.selective_scan_states_ref(*args),), dtype)
        dstates = torch.randn(Bt, Dm, N, L)
        names = ("du", "ddelta", "dA", "dB", "ddelta_bias")
        compare(case, names, tri.selective_scan_states_bwd(dstates, *args),
                reference.selective_scan_states_bwd_ref(dstates, *args), dtype)
        repeat(case, lambda: (tri.selective_scan_states_fwd(*args), *tri.selective_scan_states_bwd(dstates, *args)))

    def scan_2d(case, routes, H, W, Bt, Dm, N, dtype, merge, per_route_x=False, param_routes=None, D=True,
                bias=True, softplus=True, bc_offset=None):
        """bc_offset: B and C sliced out of one (…, K, offset + 2N) projection at that offset, as models make
        them (contiguous states, rows aligned or not)."""
        K = routes.shape[0]
        param_routes = routes if param_routes is None else param_routes
        x = torch.randn(*((Bt, H, W, K, Dm) if per_route_x else (Bt, H, W, Dm))).to(dtype)
        delta = (torch.rand(Bt, H, W, K, Dm) * 0.8 - 0.4).to(dtype)
        A = -(torch.rand(K, Dm, N) + 0.3)
        if bc_offset is None:
            B = torch.randn(Bt, H, W, K, N).to(dtype)
            C = torch.randn(Bt, H, W, K, N).to(dtype)
        else:
            BC = torch.randn(Bt, H, W, K, bc_offset + 2 * N).to(dtype)
            B, C = BC[..., bc_offset:bc_offset + N], BC[..., bc_offset + N:]
        Dv = torch.randn(K, Dm) if D else None
        bv = torch.randn(K, Dm) * 0.3 if bias else None
        args = (x, delta, A, B, C, Dv, bv, routes, param_routes, softplus, merge)
        ref_args = (x, delta, A, B, C, Dv, bv, softplus, routes, param_routes, merge)
        out = tri.selective_scan_2d_fwd(*args)
        ref_out = reference.selective_scan_2d_ref(*ref_args)
        compare(case, ("out",), (out,), (ref_out,), dtype)
        dout = torch.randn_like(ref_out)
        names = ("dx", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
        compare(case, names, tri.selective_scan_2d_bwd(dout, *args),
                reference.selective_scan_2d_bwd_ref(dout, *ref_args), dtype)
        out_saved, chunk_states = tri.selective_scan_2d_fwd_saving(*args)
        compare(case + "/saved", ("out",), (out_saved,), (ref_out,), dtype)
        compare(case + "/saved", names, tri.selective_scan_2d_bwd_from_saved(dout, *args, chunk_states),
                reference.selective_scan_2d_bwd_ref(dout, *ref_args), dtype)
        repeat(case, lambda: (tri.selective_scan_2d_fwd(*args), *tri.selective_scan_2d_bwd(dout, *args)))

    def expanded_dout(case, routes, H, W, Bt, Dm):
        """dout as ``out.sum().backward()`` hands it over: one value expanded, channel stride 0."""
        K = routes.shape[0]
        args = (torch.randn(Bt, H, W, Dm), torch.rand(Bt, H, W, K, Dm) * 0.8 - 0.4, -(torch.rand(K, Dm, 1) + 0.3),
                torch.randn(Bt, H, W, K, 1), torch.randn(Bt, H, W, K, 1), torch.randn(K, Dm), torch.randn(K, Dm))
        dout = torch.ones(1, 1, 1, 1).expand(Bt, H, W, Dm)
        names = ("dx", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
        compare(case, names, tri.selective_scan_2d_bwd(dout, *args, routes, routes, True, "sum"),
                reference.selective_scan_2d_bwd_ref(dout.contiguous(), *args, True, routes, routes, "sum"),
                torch.float32)

    def strided_inputs(case, routes, H, W, Bt, Dm):
        """Views as models hand them over: x with every other channel (channel stride 2, which the d_state-1
        kernel does not read, so the general one runs), B and C sliced out of one (…, K, 2) projection."""
        K = routes.shape[0]
        x = torch.randn(Bt, H, W, 2 * Dm)[..., ::2]
        BC = torch.randn(Bt, H, W, K, 2)
        args = (x, torch.rand(Bt, H, W, K, Dm) * 0.8 - 0.4, -(torch.rand(K, Dm, 1) + 0.3), BC[..., :1], BC[..., 1:],
                torch.randn(K, Dm), torch.randn(K, Dm))
        for single_x in (x, x.contiguous()):
            run_args = (single_x,) + args[1:]
            out = tri.selective_scan_2d_fwd(*run_args, routes, routes, True, "sum")
            ref = reference.selective_scan_2d_ref(*run_args, True, routes, routes, "sum")
            compare(case + ("/strided_x" if single_x is x else "/contiguous_x"), ("out",), (out,), (ref,),
                    torch.float32)
            dout = torch.randn_like(ref)
            compare(case + ("/strided_x" if single_x is x else "/contiguous_x"),
                    ("dx", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"),
                    tri.selective_scan_2d_bwd(dout, *run_args, routes, routes, True, "sum"),
                    reference.selective_scan_2d_bwd_ref(dout, *run_args, True, routes, routes, "sum"), torch.float32)

    def same_chunk_states(case, routes, H, W, Bt, Dm, dtype, merge, N=1, use_kernel=tri.set_n1_kernel):
        """The d_state-1 kernel (or, with N > 1 and ``use_kernel=set_steps_kernel``, the step-by-step one) saves
        the chunk states the general kernel saves (the backward reads them)."""
        K = routes.shape[0]
        args = (torch.randn(Bt, H, W, Dm).to(dtype), (torch.rand(Bt, H, W, K, Dm) * 0.8 - 0.4).to(dtype),
                -(torch.rand(K, Dm, N) + 0.3), torch.randn(Bt, H, W, K, N).to(dtype),
                torch.randn(Bt, H, W, K, N).to(dtype), torch.randn(K, Dm), torch.randn(K, Dm) * 0.3, routes, routes,
                True, merge)
        out, states = tri.selective_scan_2d_fwd_saving(*args)
        use_kernel(False)
        try:
            general_out, general_states = tri.selective_scan_2d_fwd_saving(*args)
        finally:
            use_kernel(True)
        compare(case + "/vs_general", ("out", "chunk_states"), (out, states), (general_out, general_states), dtype)

    def through_op(case, routes, H, W, Bt, Dm, N):
        """The public op on the triton backend: the forward hands its chunk states to the backward (also
        under torch.compile, whose fake kernel must predict their shape)."""
        K = routes.shape[0]
        inputs = [torch.randn(Bt, H, W, Dm), torch.rand(Bt, H, W, K, Dm) * 0.8 - 0.4, -(torch.rand(K, Dm, N) + 0.3),
                  torch.randn(Bt, H, W, K, N), torch.randn(Bt, H, W, K, N), torch.randn(K, Dm), torch.randn(K, Dm)]
        names = ("out", "dx", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")

        def run(backend, compiled=False):
            leaves = [t.clone().requires_grad_() for t in inputs]
            f = lambda *a: vk.selective_scan_2d(*a, delta_softplus=True, routes=routes, backend=backend)
            out = (torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f)(*leaves)
            return (out, *torch.autograd.grad(out, leaves, dout))

        dout = torch.randn(Bt, H, W, Dm)
        want = run("reference")
        compare(case + "/op", names, run("triton"), want, torch.float32)
        compare(case + "/compiled", names, run("triton", compiled=True), want, torch.float32)

    def wider_out(case, routes, H, W, Bt, Dm, N, merge, per_route_x):
        """bf16 x (and dt, B, C) with out_dtype fp32 against the scan of an fp32 copy of x, bitwise: through the
        op (its forward saves the chunk states, its backward reads them), and the backend's plain forward and
        recomputing backward."""
        K = routes.shape[0]
        x = torch.randn(*((Bt, H, W, K, Dm) if per_route_x else (Bt, H, W, Dm))).to(bf16)
        others = [(torch.rand(Bt, H, W, K, Dm) * 0.8 - 0.4).to(bf16), -(torch.rand(K, Dm, N) + 0.3),
                  torch.randn(Bt, H, W, K, N).to(bf16), torch.randn(Bt, H, W, K, N).to(bf16), torch.randn(K, Dm),
                  torch.randn(K, Dm) * 0.3]
        names = ("out", "dx", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
        (out, grads), (copy_out, copy_grads) = wider_out_and_copy_forms(x, others, routes, merge, f32, "triton")
        equal(case + "/op", names, (out, *grads), (copy_out, *copy_grads))
        args = (*others, routes, routes, True, merge)
        dout = torch.randn_like(copy_out)
        got = (tri.selective_scan_2d_fwd(x, *args, out_dtype=f32), *tri.selective_scan_2d_bwd(dout, x, *args))
        copy_grads = tri.selective_scan_2d_bwd(dout, x.float(), *args)
        equal(case + "/recomputing", names, got,
              (tri.selective_scan_2d_fwd(x.float(), *args), copy_grads[0].to(bf16), *copy_grads[1:]))

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    if group == "scan_1d":
        scan_1d("plain", 2, 4, 8, 1, 0, f32, D=False, z=False, bias=False, softplus=False, last=False)
        scan_1d("all_options", 1, 6, 9, 3, 0, f32, D=True, z=True, bias=True, softplus=True, last=True)
        scan_1d("grouped", 2, 8, 6, 2, 2, f32, D=True, z=False, bias=True, softplus=True, last=True)
        scan_1d("n17", 1, 2, 5, 17, 0, f32, D=True, z=True, bias=False, softplus=True, last=False)
        scan_1d("bf16", 1, 4, 6, 2, 0, bf16, D=True, z=True, bias=True, softplus=True, last=False)
    elif group == "states":
        states("plain", 2, 4, 8, 1, 0, f32, bias=False, softplus=False)
        states("grouped_bias", 1, 4, 9, 3, 2, f32, bias=True, softplus=True)
        states("fp16", 1, 3, 5, 2, 0, f16, bias=True, softplus=True)
    elif group == "cross_sum":
        scan_2d("cross_3x4", vk.scan_routes("cross", 3, 4), 3, 4, 2, 5, 2, f32, "sum")
        scan_2d("cross_bf16", vk.scan_routes("cross", 2, 3), 2, 3, 1, 4, 1, bf16, "sum", D=False, bias=False)
        through_op("cross_2x3", vk.scan_routes("cross", 2, 3), 2, 3, 1, 3, 2)
    elif group == "continuous_params":
        raster = vk.scan_routes("raster", 3, 3).expand(4, -1).contiguous()
        scan_2d("continuous_raster_params", vk.scan_routes("continuous", 3, 3), 3, 3, 1, 4, 3, f32, "sum",
                param_routes=raster)
    elif group == "atrous_odd":
        scan_2d("atrous_3x5", vk.scan_routes("atrous", 3, 5), 3, 5, 2, 3, 2, f32, "sum")
        scan_2d("atrous_5x3_none", vk.scan_routes("atrous", 5, 3), 5, 3, 1, 3, 1, f32, "none", softplus=False)
    elif group == "multihead_none":
        routes = vk.scan_routes("multihead", 3, 3, patterns=("S", "X"))
        scan_2d("multihead_SX_none", routes, 3, 3, 1, 2, 2, f32, "none", bias=False)
        scan_2d("multihead_SX_sum", routes, 3, 3, 1, 2, 1, f32, "sum", D=False)
    elif group == "per_route_x":
        scan_2d("cross_per_route_none", vk.scan_routes("cross", 2, 3), 2, 3, 2, 4, 1, f32, "none", per_route_x=True)
        scan_2d("cross_per_route_sum", vk.scan_routes("cross", 3, 2), 3, 2, 1, 3, 2, f32, "sum", per_route_x=True)
    elif group == "batch_split":
        # Batches beyond the launch grid's batch axis run in slices: shrink the limit to see it on tiny shapes.
        tri.MAX_GRID_BATCH = 2
        scan_1d("split_1d", 3, 4, 5, 2, 2, f32, D=True, z=True, bias=True, softplus=True, last=True)
        states("split_states", 3, 2, 4, 2, 0, f32, bias=True, softplus=True)
        scan_2d("split_2d", vk.scan_routes("cross", 2, 2), 2, 2, 3, 2, 1, f32, "sum")
    elif group == "single_state":
        # d_state 1 runs scan_n1's forward: positions computed from affine walks (cross), read through the
        # index (snakes, padded atrous routes, a 1x1 image whose rows are shorter than a segment), channel
        # blocks and chunks that do not divide the problem, and first visits that vary within a route.
        scan_2d("n1_cross_5x3", vk.scan_routes("cross", 5, 3), 5, 3, 2, 12, 1, f32, "sum")
        scan_2d("n1_continuous", vk.scan_routes("continuous", 3, 4), 3, 4, 1, 5, 1, f32, "sum")
        scan_2d("n1_atrous_padded", vk.scan_routes("atrous", 3, 5), 3, 5, 1, 4, 1, f32, "sum", bias=False)
        scan_2d("n1_one_pixel", vk.scan_routes("cross", 1, 1), 1, 1, 2, 3, 1, f32, "sum")
        scan_2d("n1_per_route_fp16", vk.scan_routes("cross", 3, 3), 3, 3, 1, 8, 1, f16, "none", per_route_x=True)
        raster = vk.scan_routes("raster", 3, 4)[0]
        half = torch.where(torch.arange(12) < 6, raster, -1)
        mixed = torch.stack([half, raster.flip(0)])  # route 1 revisits the first half, then visits the rest
        scan_2d("n1_mixed_first_visits", mixed, 3, 4, 1, 4, 1, f32, "sum")
        half_back = torch.cat([raster[:6].flip(0), raster[6:] * 0 - 1])  # padding trails, as routes require
        scan_2d("n1_unvisited_zero", torch.stack([half, half_back]), 3, 4, 1, 4, 1, f32, "sum")
        scan_2d("n1_unvisited_zero_none", torch.stack([half, half_back]), 3, 4, 1, 4, 1, f32, "none")
        expanded_dout("n1_expanded_dout", vk.scan_routes("cross", 3, 4), 3, 4, 2, 6)
        strided_inputs("n1_strided", vk.scan_routes("cross", 3, 4), 3, 4, 2, 6)
        through_op("n1_cross_3x3", vk.scan_routes("cross", 3, 3), 3, 3, 1, 4, 1)
        same_chunk_states("n1_cross_4x6", vk.scan_routes("cross", 4, 6), 4, 6, 2, 10, f32, "sum")
        same_chunk_states("n1_snake_3x3", vk.scan_routes("continuous", 3, 3), 3, 3, 1, 4, f32, "sum")
        # The backward's adjoint with reverse scans instead of flips; then with segments spread over more lanes
        # than a warp has, which it flips steps but scans segments in reverse (4 segments, 16 channel lanes).
        tiles.INTERPRET_N1_TILE = {"TT": 2, "LT": 2, "BD": 8, "VEC": 1, "FLIP": False}
        scan_2d("n1_reverse_scans", vk.scan_routes("cross", 3, 5), 3, 5, 2, 12, 1, f32, "sum")
        tiles.INTERPRET_N1_TILE = {"TT": 1, "LT": 4, "BD": 16, "VEC": 1, "FLIP": True}
        tiles.n1_bwd_block_d_candidates.cache_clear()
        scan_2d("n1_segments_over_warps", vk.scan_routes("cross", 3, 5), 3, 5, 2, 12, 1, f32, "sum")
        # Steps on the tile's second axis (the layout Triton 3.6 keeps in one thread).
        launches.N1_STEP_AXIS = 1
        tiles.INTERPRET_N1_TILE = {"TT": 2, "LT": 2, "BD": 8, "VEC": 1, "FLIP": True}
        tiles.n1_bwd_block_d_candidates.cache_clear()
        scan_2d("n1_step_axis_1_cross", vk.scan_routes("cross", 5, 3), 5, 3, 2, 12, 1, f32, "sum")
        scan_2d("n1_step_axis_1_mixed", mixed, 3, 4, 1, 4, 1, f32, "sum")
        scan_2d("n1_step_axis_1_per_route", vk.scan_routes("cross", 3, 3), 3, 3, 1, 8, 1, f32, "none",
                per_route_x=True)
        same_chunk_states("n1_step_axis_1_states", vk.scan_routes("cross", 4, 6), 4, 6, 2, 10, f32, "sum")
        tiles.INTERPRET_N1_TILE = {"TT": 4, "LT": 1, "BD": 8, "VEC": 1, "FLIP": False}
        scan_2d("n1_step_axis_1_one_segment", vk.scan_routes("continuous", 3, 4), 3, 4, 1, 5, 1, f32, "sum")
    elif group == "adjoint_forms":
        # The backward's other adjoint scans (the default is the 4-tuple reverse scan): the 2-tuple scan through
        # a final state gradient in a padded last chunk and into whole chunks (EVEN_T, where step t + 1 of the
        # last row is past the end), every state's gradient, routes padded at their ends, and parameters read
        # along other routes than x (decay_{t+1} at the next step's parameter position); then both scans
        # flipped and scanned forward.
        from vmamba_kernels.triton import scan

        forms, kernel = set(), scan.selective_scan_bwd_kernel

        class Spy:  # the forms the backward launches with (the interpreter launches the kernel directly)
            def __getitem__(self, grid):
                return lambda **kw: (forms.add((kw["ADJOINT"], kw["FLIP"])), kernel[grid](**kw))[1]

        scan.selective_scan_bwd_kernel = Spy()
        raster = vk.scan_routes("raster", 3, 3).expand(4, -1).contiguous()
        for form, flip in ((2, False), (2, True), (4, True), (4, False)):
            tri.set_adjoint_scan(form, flip)
            name = f"adjoint_{form}{'_flip' if flip else ''}"
            scan_1d(name + "/dlast", 1, 6, 9, 3, 0, f32, D=True, z=True, bias=True, softplus=True, last=True)
            scan_2d(name + "/atrous", vk.scan_routes("atrous", 3, 5), 3, 5, 1, 3, 2, f32, "sum")
            if not flip:
                scan_1d(name + "/even", 1, 4, 8, 2, 0, f32, D=False, z=False, bias=False, softplus=False, last=True)
                states(name + "/states", 1, 4, 6, 2, 2, f32, bias=True, softplus=True)
                scan_2d(name + "/params", vk.scan_routes("continuous", 3, 3), 3, 3, 1, 3, 3, f32, "none",
                        param_routes=raster)
        assert forms == {(2, False), (2, True), (4, True), (4, False)}, forms
    elif group == "steps":
        # d_state > 1 with 8 or more channels runs scan_steps' forward: B and C read 4, 2 or 1 states at a time
        # (bf16 rows aligned to 4, to 2, or neither; fp32), channel blocks that do not divide the channels (12),
        # d_state that fills no power of two (3), padded routes, parameters read along other routes (PlainMamba's),
        # per-route outputs, the 1D op (z, a final state and its gradient), and the chunk states it saves.
        launched = set()
        launch = launches._launch_steps

        def spy(grid, **kw):
            launched.add((kw["PACK"], kw["EVEN_N"], kw["CPG"] % 8 == 0, kw["BATCH_LANES"]))
            return launch(grid, **kw)

        def channel_scans(case, T, K, L, N, dtype):
            """ViM2's channel mixer: one channel per scan (images on lanes), B and C broadcast over scans and
            steps."""
            u = torch.randn(T, K, L).to(dtype)
            delta = (torch.rand(T, K, L) * 0.5).to(dtype)
            b, c = torch.randn(1, K, N, 1).to(dtype), torch.randn(1, K, N, 1).to(dtype)
            args = (u, delta, -(torch.rand(K, N) + 0.3), b.expand(T, K, N, L), c.expand(T, K, N, L), None, None,
                    torch.randn(K) * 0.3, True)
            out, state = tri.selective_scan_fwd(*args)
            ref_out, ref_state = reference.selective_scan_ref(*args, return_last_state=True)
            compare(case, ("out", "last_state"), (out, state), (ref_out, ref_state), dtype)
            dout = torch.randn_like(ref_out)
            names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")
            compare(case, names, tri.selective_scan_bwd(dout, None, *args),
                    reference.selective_scan_bwd_ref(dout, None, *args), dtype)

        launches._launch_steps = spy
        cross = vk.scan_routes("cross", 3, 4)
        raster = vk.scan_routes("raster", 3, 3).expand(4, -1).contiguous()
        scan_2d("steps_cross_bf16_pack4", cross, 3, 4, 2, 8, 4, bf16, "sum")
        scan_2d("steps_cross_bf16_pack2", cross, 3, 4, 1, 8, 4, bf16, "sum", bc_offset=2)
        scan_2d("steps_cross_bf16_pack1", cross, 3, 4, 1, 8, 4, bf16, "sum", bc_offset=1)
        scan_2d("steps_cross_f32_12_channels", cross, 3, 4, 1, 12, 2, f32, "sum")
        scan_2d("steps_atrous_padded_n3", vk.scan_routes("atrous", 3, 5), 3, 5, 1, 8, 3, f32, "sum", bias=False)
        scan_2d("steps_continuous_raster_params", vk.scan_routes("continuous", 3, 3), 3, 3, 1, 8, 4, bf16, "sum",
                param_routes=raster)
        scan_2d("steps_per_route_none", cross, 3, 4, 1, 8, 2, f32, "none", per_route_x=True, D=False)
        scan_1d("steps_1d", 2, 16, 9, 4, 2, f32, D=True, z=True, bias=True, softplus=True, last=True)
        through_op("steps_op", cross, 3, 4, 1, 8, 4)
        same_chunk_states("steps_cross_states", vk.scan_routes("cross", 4, 5), 4, 5, 2, 8, f32, "sum", N=4,
                          use_kernel=tri.set_steps_kernel)
        channel_scans("steps_channel_scans", 11, 2, 7, 16, f32)  # 11 images: a block of 8 lanes and a partial one
        channel_scans("steps_channel_scans_bf16", 9, 2, 6, 4, bf16)
        assert {pack for pack, _, _, _ in launched} == {1, 2, 4}, launched
        assert {even_n for _, even_n, _, _ in launched} == {True, False}, launched
        assert {even_d for _, _, even_d, _ in launched} == {True, False}, launched
        assert {lanes for _, _, _, lanes in launched} == {True, False}, launched
    elif group == "wider_out":
        _round_interpreter_narrowing_to_nearest_even()
        cross = vk.scan_routes("cross", 3, 4)  # every pixel on every route: a shared x's gradient sums four
        wider_out("n1_per_route_none", cross, 3, 4, 2, 8, 1, "none", per_route_x=True)  # GroupMamba's call
        wider_out("n1_shared_sum", cross, 3, 4, 1, 8, 1, "sum", per_route_x=False)
        wider_out("n1_atrous_per_route_sum", vk.scan_routes("atrous", 3, 5), 3, 5, 1, 4, 1, "sum", per_route_x=True)
        wider_out("general_per_route_none", cross, 3, 4, 1, 4, 2, "none", per_route_x=True)
        wider_out("general_shared_sum", cross, 3, 4, 1, 4, 2, "sum", per_route_x=False)
        tri.set_n1_kernel(False)
        wider_out("general_n1_per_route_none", cross, 3, 4, 1, 8, 1, "none", per_route_x=True)
    else:
        raise SystemExit(f"unknown group {group!r}")


def _round_interpreter_narrowing_to_nearest_even():
    """The interpreter narrows fp32 to bf16 by dropping the low bits; GPUs round to nearest even (the rounding
    Triton's downcasts ask for, and torch's casts use). Bitwise comparisons with torch's casts need the GPU's."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    truncate = interpreter.InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncate(self, src, dst_type)
        rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    interpreter.InterpreterBuilder.create_fp_trunc = create_fp_trunc


def _vectorize_interpreter_scan():
    """The interpreter scans element by element in Python; run the same sequential definition
    (out[0] = x[0], out[i] = combine(out[i-1], x[i])) once per step, vectorized over the other axes."""
    import numpy as np
    from triton.runtime import interpreter

    if not hasattr(interpreter, "ScanOps") or not hasattr(interpreter.ScanOps, "generic_scan"):
        return

    def generic_scan(self, input):
        data = [arg.handle.data for arg in input]
        dtypes = [arg.dtype for arg in input]
        axis = self.axis
        outs = [np.empty_like(d) for d in data]
        acc = [np.take(d, [0], axis=axis) for d in data]
        for o, a in zip(outs, acc):
            np.put_along_axis(o, np.zeros_like(a, dtype=np.int64), a, axis=axis)
        for i in range(1, data[0].shape[axis]):
            cur = [np.take(d, [i], axis=axis) for d in data]
            ret = self.combine_fn.fn(*[self.to_tensor(a, t) for a, t in zip(acc, dtypes)],
                                     *[self.to_tensor(c, t) for c, t in zip(cur, dtypes)])
            ret = ret if isinstance(ret, tuple) else (ret,)
            acc = [np.broadcast_to(r.handle.data, cur[0].shape).astype(d.dtype) for r, d in zip(ret, data)]
            for o, a in zip(outs, acc):
                np.put_along_axis(o, np.full_like(a, i, dtype=np.int64), a, axis=axis)
        return [self.to_tensor(o, t) for o, t in zip(outs, dtypes)]

    interpreter.ScanOps.generic_scan = generic_scan


if __name__ == "__main__":
    _child(sys.argv[1])
