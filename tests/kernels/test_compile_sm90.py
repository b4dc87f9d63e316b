"""The Triton kernels compile for Hopper (sm_90) without a GPU.

The interpreter tests check what the kernels compute but never run Triton's compiler, so a kernel that
only the interpreter accepts would first fail on a user's GPU. Triton compiles for a given target offline
(its wheel ships ptxas); this compiles the forward and backward kernels with the constants the launchers
pass for the model shapes that matter: the 2D op with merged overlapping routes at d_state 1 (VMamba) and
16 (PlainMamba), per-route outputs (GroupMamba), and the 1D op with every state stored (Spatial-Mamba).
"""
import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vmamba_kernels.triton import route_plan, scan

# Pointer arguments and their element types (bf16 activations, fp32 parameters and workspaces).
POINTERS = {
    "x": "bf16", "delta": "bf16", "A": "fp32", "B": "bf16", "C": "bf16", "D": "fp32", "delta_bias": "fp32",
    "z": "bf16", "routes": "i32", "param_routes": "i32", "first_visit": "i8", "parallel_ok": "i32",
    "coverage": "i32", "x_visited": "i8", "param_visited": "i8", "out_visited": "i8", "out": "bf16",
    "last_state": "fp32", "chunk_states": "fp32", "dout": "bf16", "dlast_state": "fp32", "dx": "bf16",
    "ddelta": "bf16", "dz": "bf16", "dB_part": "fp32", "dC_part": "fp32", "dA_part": "fp32", "dD_part": "fp32",
    "dbias_part": "fp32", "first_key": "i32", "x_visited_any": "i8",
}
SHARED = dict(HAS_D=True, HAS_BIAS=True, HAS_Z=False, SOFTPLUS=True, GATHER=True, ZERO_UNVISITED=True)


def _compile(fn, constants, num_warps):
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
        else:
            signature[name] = "*" + POINTERS[name] if name in POINTERS else "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    assert not missing, f"constants not given for {missing}"
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


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
    kernel = _compile(scan.selective_scan_fwd_kernel, constants, warps)
    assert kernel.asm["cubin"]


@pytest.mark.parametrize("N, BT, BD, warps", [(1, 64, 32, 8), (1, 64, 64, 4), (16, 16, 8, 8), (16, 16, 16, 4)])
def test_backward_compiles_for_sm90(N, BT, BD, warps):
    constants = dict(SHARED, IN_MODE=1, DX_MERGE=scan.MERGE_SERIAL, HAS_DLAST=False, BT=BT, BD=BD, BN=N,
                     EVEN_D=True, EVEN_T=False)
    kernel = _compile(scan.selective_scan_bwd_kernel, constants, warps)
    assert kernel.asm["cubin"]


def test_route_plan_compiles_for_sm90():
    kernel = _compile(route_plan.route_plan_kernel, dict(BLOCK=1024), 8)
    assert kernel.asm["cubin"]
