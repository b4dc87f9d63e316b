"""The Triton kernels compile for Hopper (sm_90) without a GPU.

The interpreter tests check what the kernels compute but never run Triton's compiler, so a kernel that
only the interpreter accepts would first fail on a user's GPU. Triton compiles for a given target offline
(its wheel ships ptxas); this compiles the forward and backward kernels with the constants the launchers
pass for the model shapes that matter: the 2D op with merged overlapping routes at d_state 1 (VMamba) and
16 (PlainMamba), per-route outputs (GroupMamba), and the 1D op with every state stored (Spatial-Mamba).
"""
import pytest

from vmamba_kernels.triton import route_plan, scan
from vmamba_kernels.triton.offline import compile_kernel, resource_usage

SHARED = dict(HAS_D=True, HAS_BIAS=True, HAS_Z=False, SOFTPLUS=True, GATHER=True, ZERO_UNVISITED=True)


@pytest.mark.parametrize("case", [
    # VMamba-T stage 1: cross routes summed in order, d_state 1, chunk states saved for the backward.
    dict(N=1, BT=64, BD=32, MERGE=scan.MERGE_SERIAL, OUT_MODE=scan.OUT_Y, SAVE_CHUNKS=True, SAVE_T=64, warps=4),
    # PlainMamba-L1: d_state 16, no saved states (inference).
    dict(N=16, BT=16, BD=16, MERGE=scan.MERGE_SERIAL, OUT_MODE=scan.OUT_Y, SAVE_CHUNKS=False, SAVE_T=16, warps=8),
    # GroupMamba: one route per program, plain stores.
    dict(N=1, BT=128, BD=16, MERGE=scan.MERGE_STORE, OUT_MODE=scan.OUT_Y, SAVE_CHUNKS=False, SAVE_T=64, warps=4),
    # Spatial-Mamba: the 1D op storing every state.
    dict(N=1, BT=64, BD=32, MERGE=scan.MERGE_STORE, OUT_MODE=scan.OUT_STATES, SAVE_CHUNKS=False, SAVE_T=64,
         warps=4, GATHER=False, ZERO_UNVISITED=False),
], ids=["vmamba", "plainmamba", "groupmamba", "spatialmamba"])
def test_forward_compiles_for_sm90(case):
    case = dict(case)
    warps, N = case.pop("warps"), case.pop("N")
    constants = dict(SHARED, STORE_LAST=False, BN=N, EVEN_D=True, EVEN_T=False, PREFETCH=True, VEC=True, **case)
    kernel = compile_kernel(scan.selective_scan_fwd_kernel, constants, warps)
    assert kernel.asm["cubin"]


# The adjoint scan's forms (set_adjoint_scan): the default 4-tuple reverse scan, the 2-tuple one, and either
# flipped and scanned forward (also where steps span warps: d_state 1's 64-step chunks).
@pytest.mark.parametrize("N, BT, BD, warps, adjoint, flip", [
    (1, 64, 32, 8, 4, False), (1, 64, 64, 4, 4, False), (16, 16, 8, 8, 4, False), (16, 16, 16, 4, 4, False),
    (16, 16, 8, 8, 2, False), (16, 16, 16, 4, 2, False), (16, 16, 16, 4, 2, True), (16, 16, 16, 4, 4, True),
    (1, 64, 32, 8, 4, True)])
def test_backward_compiles_for_sm90(N, BT, BD, warps, adjoint, flip):
    constants = dict(SHARED, IN_MODE=1, DX_MERGE=scan.MERGE_SERIAL, HAS_DLAST=False, ADJOINT=adjoint, FLIP=flip,
                     BT=BT, BD=BD, BN=N, EVEN_D=True, EVEN_T=False)
    kernel = compile_kernel(scan.selective_scan_bwd_kernel, constants, warps)
    usage = resource_usage(kernel)
    assert 0 < usage["registers"] <= 255 and usage["spill_stores"] >= 0, usage


def test_backward_flip_avoids_the_reverse_scan_shuffles():
    """Triton reverses a reverse scan's operands across lanes, in and out, even where each thread holds all
    steps (d_state 16); flipped steps scanned forward stay in registers. Should a Triton release stop
    shuffling, the flip would no longer be needed."""
    from vmamba_kernels.triton.offline import inner_loop_instructions

    shuffles = {}
    for flip in (False, True):
        constants = dict(SHARED, IN_MODE=1, DX_MERGE=scan.MERGE_SERIAL, HAS_DLAST=False, ADJOINT=4, FLIP=flip,
                         BT=16, BD=16, BN=16, EVEN_D=True, EVEN_T=False)
        kernel = compile_kernel(scan.selective_scan_bwd_kernel, constants, 8)
        shuffles[flip] = inner_loop_instructions(kernel)["SHFL"]
    assert 0 < shuffles[True] < shuffles[False] / 2, shuffles


def test_route_plan_compiles_for_sm90():
    kernel = compile_kernel(route_plan.route_plan_kernel, dict(BLOCK=1024), 8)
    assert kernel.asm["cubin"]


def test_missing_constants_are_named():
    with pytest.raises(ValueError, match=r"constants not given for \['BLOCK'\]"):
        compile_kernel(route_plan.route_plan_kernel, {}, 8)


@pytest.mark.parametrize("merge, save_chunks", [(scan.MERGE_SERIAL, True), (scan.MERGE_STORE, False)],
                         ids=["vmamba_training", "groupmamba_inference"])
def test_single_state_forward_compiles_for_sm90(merge, save_chunks):
    """scan_n1's forward, with the hardware log2 (inline PTX, which the interpreter tests cannot run), for every
    tile its tuner may try."""
    from vmamba_kernels.triton import launches, scan_n1, tiles

    for TT, LT, BD, VEC, warps, prefetch, cap in tiles.N1_TILES:
        constants = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, MERGE=merge, ZERO_UNVISITED=True,
                         SAVE_CHUNKS=save_chunks, SAVE_T=64, FAST_MATH=True, TT=TT, LT=LT, BD=BD, VEC=VEC,
                         PREFETCH=prefetch, STEP_AXIS=launches.n1_step_axis(), EVEN_D=True, EVEN_T=False)
        kernel = compile_kernel(scan_n1.route_scan_n1_fwd_kernel, constants, warps, maxnreg=cap)
        assert "lg2.approx.f32" in kernel.asm["ptx"]
        usage = resource_usage(kernel)
        assert 0 < usage["registers"] <= (cap or 255), (TT, LT, BD, VEC, warps, cap, usage)


@pytest.mark.parametrize("dx_merge", [scan.MERGE_SERIAL, scan.MERGE_STORE], ids=["shared_x", "per_route_x"])
def test_single_state_backward_compiles_for_sm90(dx_merge):
    from vmamba_kernels.triton import launches, scan_n1, tiles

    for TT, LT, BD, VEC, warps, flip, prefetch, cap in tiles.N1_BWD_TILES:
        constants = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, DX_MERGE=dx_merge, ZERO_UNVISITED=True,
                         FAST_MATH=True, TT=TT, LT=LT, BD=BD, VEC=VEC, FLIP=flip, PREFETCH=prefetch,
                         STEP_AXIS=launches.n1_step_axis(), EVEN_D=True, EVEN_T=False)
        usage = resource_usage(compile_kernel(scan_n1.route_scan_n1_bwd_kernel, constants, warps, maxnreg=cap))
        assert 0 < usage["registers"] <= (cap or 255), (TT, LT, BD, VEC, warps, flip, prefetch, cap, usage)


def test_launch_arguments_give_the_kernel_its_vector_loads():
    """With a launch's arguments, compile_kernel specializes as Triton does at launch (strides that are
    multiples of 16, 16-byte aligned pointers, unit values as constants): the four-channel loads of scan_n1
    become vector loads, which a compile without them cannot show."""
    import re

    import torch

    from vmamba_kernels.triton import launches, scan_n1

    fn = scan_n1.route_scan_n1_fwd_kernel
    constants = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, MERGE=scan.MERGE_SERIAL, ZERO_UNVISITED=True,
                     SAVE_CHUNKS=False, SAVE_T=64, FAST_MATH=True, TT=4, LT=8, BD=32, VEC=4, PREFETCH=True,
                     STEP_AXIS=launches.n1_step_axis(), EVEN_D=True, EVEN_T=True)
    tensor_types = dict(x=torch.bfloat16, delta=torch.bfloat16, B=torch.bfloat16, C=torch.bfloat16,
                        out=torch.bfloat16, A=torch.float32, D=torch.float32, delta_bias=torch.float32,
                        chunk_states=torch.float32, routes=torch.int32, route_info=torch.int32,
                        parallel_ok=torch.int32, coverage=torch.int32, first_visit=torch.int8,
                        out_visited=torch.int8)
    args = {name: torch.empty(64, dtype=dtype) for name, dtype in tensor_types.items()}
    # VMamba-T stage 1: 56² pixels, 4 routes of 96 channels, delta (Bt, L, K, Dm), B/C (Bt, L, K, 1)
    args.update(Lr=3136, L=3136, K=4, CPG=96, sx_b=301056, sx_k=0, sx_t=96, sdt_b=1204224, sdt_k=96, sdt_t=384,
                sB_b=12544, sB_k=1, sB_t=4, sC_b=12544, sC_k=1, sC_t=4, sA_k=96, sA_d=1, sD_k=96, so_b=301056,
                so_k=0, so_t=96)

    def vector_loads(kernel):
        return re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.b32", kernel.asm["ptx"])

    assert vector_loads(compile_kernel(fn, constants, 2, args=args))
    assert not vector_loads(compile_kernel(fn, constants, 2))


def test_step_axis_keeps_the_steps_in_one_thread():
    """scan_n1 scans each segment's steps inside a thread; which tile axis Triton keeps in one thread depends
    on its version (how it orders equally strided axes), so the backend probes it. With the probed axis the
    probe's scan along the steps compiles without lane shuffles, with the other it needs them."""
    from vmamba_kernels.triton import launches, scan_n1

    axis = launches.n1_step_axis()

    def shuffles(step_axis):
        kernel = compile_kernel(scan_n1.step_axis_probe_kernel, {"STEP_AXIS": step_axis}, 2)
        return kernel.asm["ptx"].count("shfl.sync")

    assert shuffles(axis) == 0 < shuffles(1 - axis)


def test_chunk_loop_instructions_are_read_from_the_sass():
    """``inner_loop_instructions`` finds the d_state-1 forward's chunk loop: three transcendentals per element a
    thread holds (softplus's exp2 and log2, the decay's exp2), with its loads and stores, for two tile shapes;
    and nothing when no loop is that long."""
    from vmamba_kernels.triton import launches, offline, scan_n1

    for TT, LT, BD, VEC, warps in [(4, 8, 32, 2, 4), (2, 16, 16, 4, 2)]:
        constants = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, MERGE=scan.MERGE_SERIAL, ZERO_UNVISITED=True,
                         SAVE_CHUNKS=False, SAVE_T=64, FAST_MATH=True, TT=TT, LT=LT, BD=BD, VEC=VEC, PREFETCH=True,
                         STEP_AXIS=launches.n1_step_axis(), EVEN_D=True, EVEN_T=False)
        kernel = compile_kernel(scan_n1.route_scan_n1_fwd_kernel, constants, warps)
        loop = offline.inner_loop_instructions(kernel)
        assert loop["MUFU"] == 3 * TT * VEC, (TT, VEC, loop)
        assert loop["LDG"] > 0 and loop["STG"] > 0 and loop["BRA"] > 0, loop
        assert not offline.inner_loop_instructions(kernel, min_length=100_000)


@pytest.mark.parametrize("N, G", [(16, 4), (96, 1), (768, 1)], ids=["groupmamba_grouped", "stage1", "wide"])
def test_layer_norm_compiles_for_sm90(N, G):
    """Both LayerNorm kernels with the launchers' tiles, bf16 rows in, fp32 out (autocast's), without spills."""
    import torch
    from vmamba_kernels.triton import layer_norm as ln

    BM, BN, warps = ln._tile(N, G)
    M = 4 * BM
    x, out = torch.empty(M, N, dtype=torch.bfloat16), torch.empty(M, N)
    w, stats = torch.empty(G, N), torch.empty(M)
    fwd = compile_kernel(ln.layer_norm_fwd_kernel, dict(HAS_W=True, HAS_B=True, G=G, BM=BM, BN=BN), warps,
                         args=dict(x=x, w=w, b=w, out=out, mean=stats, rstd=stats, M=M, N=N, eps=1e-5,
                                   sx_m=N, so_m=N))
    parts = torch.empty(4, G, N)
    bwd = compile_kernel(ln.layer_norm_bwd_kernel, dict(HAS_W=True, HAS_B=True, G=G, BM=BM, BN=BN), warps,
                         args=dict(dy=out, x=x, w=w, mean=stats, rstd=stats, dx=x, dw_part=parts, db_part=parts,
                                   M=M, N=N, sdy_m=N, sx_m=N, sdx_m=N))
    for kernel in (fwd, bwd):
        usage = resource_usage(kernel)
        assert 0 < usage["registers"] <= 255 and usage["spill_stores"] == 0, usage
