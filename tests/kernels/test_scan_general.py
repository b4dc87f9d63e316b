"""The general kernels' step-by-step scans (``scan._state_steps``, ``scan._adjoint_steps``).

Tiles whose threads hold every step of a chunk (at least ``scan.STEP_LOOP_PAIRS_PER_WARP`` (channel, state) pairs
per warp) run their scans step by step in registers; the others keep ``tl.associative_scan``. A child process
sets the threshold so that every general-kernel launch takes one path, and reruns the checks of
``test_triton.py`` (fresh random inputs, outputs and every gradient against the reference, run-to-run bitwise
equality) for the groups that use the general kernels: the 1D scan (with z and the final state's gradient), the
all-states scan (the gradient of every state) and the 2D routes. A compile for sm_90 checks that the d_state-16
tiles take the step-by-step path on the GPU.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}

_CHILD = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {here!r})
from vmamba_kernels.triton import scan
scan.STEP_LOOP_PAIRS_PER_WARP = {pairs}
import test_triton
test_triton._child({group!r})
"""


@pytest.mark.parametrize("path, group", [("steps", "scan_1d"), ("steps", "states"), ("steps", "cross_sum"),
                                         ("steps", "continuous_params"), ("steps", "atrous_odd"),
                                         ("associative", "scan_1d"), ("associative", "continuous_params")])
def test_scans_match_reference(path, group):
    pairs = 1 if path == "steps" else 1 << 30
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(here=HERE, group=group, pairs=pairs)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"checks of {group!r} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    compared = [r for r in records if r["kind"] == "compare"]
    assert compared, f"no comparisons ran for {group}"
    bad = [r for r in compared if not (r["finite"] and r["rel_err"] <= TOLERANCE[r["dtype"]])]
    assert not bad, "\n".join(f"{r['case']} {r['name']} ({r['dtype']}): rel_err={r['rel_err']:.3g}" for r in bad)
    repeats = [r for r in records if r["kind"] == "repeat"]
    assert repeats and all(r["bitwise_equal"] for r in repeats), [r for r in repeats if not r["bitwise_equal"]]


@pytest.mark.parametrize("BD, warps, steps", [(16, 8, True), (2, 1, True), (8, 8, False)])
def test_d_state_16_backward_scans_step_by_step_on_sm90(BD, warps, steps):
    """PlainMamba's backward tile (chunk 16, d_state 16) compiled for sm_90: with every step in one thread the
    chunk loop's only lane shuffles are the four reductions (over states: dB·g and dA's argument; over channels:
    dB and dC); the associative scans add hundreds."""
    from vmamba_kernels.triton import scan
    from vmamba_kernels.triton.offline import compile_kernel, inner_loop_instructions

    constants = dict(HAS_D=True, HAS_BIAS=True, HAS_Z=False, SOFTPLUS=True, GATHER=True, ZERO_UNVISITED=True,
                     IN_MODE=1, DX_MERGE=scan.MERGE_SERIAL, HAS_DLAST=False, BT=16, BD=BD, BN=16, EVEN_D=True,
                     EVEN_T=False)
    loop = inner_loop_instructions(compile_kernel(scan.selective_scan_bwd_kernel, constants, warps))
    shuffles_per_step_and_pair = loop["SHFL"] * 32 * warps / (16 * BD * 16)
    assert (shuffles_per_step_and_pair <= 16) == steps, dict(loop)
