"""The compiled eager CPU scan (vmamba_kernels.cpu_scan) against the per-step oracle, in each of its lane layouts,
and its build: the cache, a failed build, and the switch that turns it off."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vmamba_kernels as vk
from vmamba_kernels import cpu_scan, reference
from tests.kernels.oracle import atrous_2d_problem, gather_scan_scatter, per_step_scan, relative_error


def _inputs(Bt, Dm, L, N, groups, seed, positive_A=False):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (Bt, N, L) if groups is None else (Bt, groups, N, L)
    A = torch.rand(Dm, N, generator=g) * 2 + 0.05
    return dict(
        u=torch.randn(Bt, Dm, L, generator=g),
        delta=torch.randn(Bt, Dm, L, generator=g),
        A=A * 0.05 if positive_A else -A,  # decays above 1 (growing states) or below
        B=torch.randn(*shape_bc, generator=g),
        C=torch.randn(*shape_bc, generator=g),
        D=torch.randn(Dm, generator=g),
        z=torch.randn(Bt, Dm, L, generator=g),
        delta_bias=torch.randn(Dm, generator=g),
    )


def test_the_compiled_scan_is_built_here():
    # CI has a C compiler: every test below must run the compiled loop, not fall back unnoticed
    assert cpu_scan.available()


def _calls(monkeypatch):
    """Counts the compiled scan's calls that took their problem."""
    calls, run = [], cpu_scan.selective_scan_fwd

    def counted(*args):
        last = run(*args)
        calls.append(last is not None)
        return last
    monkeypatch.setattr(cpu_scan, "selective_scan_fwd", counted)
    return calls


def _assert_compiled_scan_matches_the_oracle(x, softplus, monkeypatch):
    """The compiled scan takes the 1D problem x, and its output and last state match the per-step oracle."""
    calls = _calls(monkeypatch)
    with torch.no_grad():
        out, last = vk.selective_scan(**x, delta_softplus=softplus, return_last_state=True, backend="reference")
    want, want_last, _ = per_step_scan(**x, delta_softplus=softplus)
    assert calls == [True]
    assert relative_error(out, want) < 1e-5 and relative_error(last, want_last) < 1e-5


# (Bt, Dm, N, groups): lanes over channels (whole tiles of 16, a partial tile, 8 channels) or over rows (1 or 3
# channels per row; 35 rows: two whole tiles of rows and a partial one); d_state 1, 16 and 20
LAYOUTS = {
    "channel-tiles": (2, 32, 16, None),
    "partial-channel-tile": (1, 42, 4, 2),
    "eight-channels": (3, 16, 1, 2),
    "row-lanes": (35, 2, 16, 2),
    "row-lanes-three-channels": (5, 3, 20, None),
}


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compiled_scan_matches_the_oracle(layout, softplus, monkeypatch):
    Bt, Dm, N, groups = LAYOUTS[layout]
    x = _inputs(Bt, Dm, 37, N, groups, seed=len(layout))
    if not softplus:  # dt = delta + bias as given: kept positive, so that the states decay
        x["delta"], x["delta_bias"] = x["delta"].abs(), x["delta_bias"].abs() * 0.1
    _assert_compiled_scan_matches_the_oracle(x, softplus, monkeypatch)


@pytest.mark.parametrize("layout", ["channel-tiles", "row-lanes"])
def test_compiled_scan_of_growing_states_and_shared_B_C(layout, monkeypatch):
    # A > 0 (decays above 1, the general exp2 of the C loop), and B, C one value for every row and step, as
    # ViM2's channel scan passes them (stride 0)
    Bt, Dm, N, groups = LAYOUTS[layout]
    x = _inputs(Bt, Dm, 29, N, groups, seed=3, positive_A=True)
    x["B"], x["C"] = (x[k][:1, ..., :1].expand(x[k].shape) for k in ("B", "C"))
    _assert_compiled_scan_matches_the_oracle(x, True, monkeypatch)


def test_compiled_softplus_and_decays_across_their_range(monkeypatch):
    # delta from -60 to 60: softplus's tail, its threshold at 20, and decays that underflow to 0; A up to -30
    x = _inputs(2, 16, 240, 4, None, seed=8)
    x["delta"] = torch.linspace(-60, 60, 240).expand(2, 16, 240).contiguous()
    x["delta_bias"] = None
    x["A"] = x["A"] * 15
    _assert_compiled_scan_matches_the_oracle(x, True, monkeypatch)


@pytest.mark.parametrize("merge", ["sum", "none"])
def test_compiled_2d_scan_matches_the_oracle(merge, monkeypatch):
    calls = _calls(monkeypatch)
    x = atrous_2d_problem(Dm=20)  # 20 channels per route: a whole tile of lanes and a partial one
    with torch.no_grad():
        out = vk.selective_scan_2d(**x, delta_softplus=True, merge=merge, backend="reference")
    want = gather_scan_scatter(**x, param_routes=x["routes"], merge=merge, delta_softplus=True)
    assert calls == [True]
    assert relative_error(out, want) < 1e-5


def test_compiled_scan_propagates_nan(monkeypatch):
    calls = _calls(monkeypatch)
    x = _inputs(2, 16, 20, 4, None, seed=2)
    x["delta"][1, 3, 5] = float("nan")
    with torch.no_grad():
        out = vk.selective_scan(**x, delta_softplus=True, backend="reference")
    assert calls == [True]
    assert out[1, 3, 5:].isnan().all() and not out[1, 3, :5].isnan().any() and not out[0].isnan().any()


def test_compiled_scan_follows_torchs_thread_count(monkeypatch):
    x = _inputs(3, 48, 50, 16, None, seed=6)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(vk.selective_scan(**x, delta_softplus=True, backend="reference"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])  # work items are independent: no thread sees another's lanes


def test_switched_off_the_pytorch_form_runs(monkeypatch):
    calls = _calls(monkeypatch)
    monkeypatch.setenv("VMAMBA_CPU_SCAN", "0")
    x = _inputs(2, 16, 20, 4, None, seed=4)
    with torch.no_grad():
        out = vk.selective_scan(**x, delta_softplus=True, backend="reference")
    want, _, _ = per_step_scan(**x, delta_softplus=True)
    assert calls == [False] and relative_error(out, want) < 1e-5


def _run(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


SCAN_ONCE = """
    import torch, vmamba_kernels as vk
    from vmamba_kernels import cpu_scan
    x = torch.randn(1, 16, 30)
    with torch.no_grad():
        out = vk.selective_scan(x, x, -torch.ones(16, 4), torch.randn(1, 4, 30), torch.randn(1, 4, 30))
    print(cpu_scan.available(), bool(torch.isfinite(out).all()))
"""


def test_the_build_is_cached_and_reused(tmp_path):
    env = {"VMAMBA_KERNELS_CACHE": str(tmp_path), "VMAMBA_CPU_SCAN": "1"}
    first = _run(SCAN_ONCE, env)
    assert first.returncode == 0 and first.stdout.split() == ["True", "True"], first.stderr
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
    stamp = built[0].stat().st_mtime_ns
    second = _run(SCAN_ONCE, env)
    assert second.returncode == 0 and second.stdout.split() == ["True", "True"], second.stderr
    assert sorted(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_a_failed_build_warns_and_the_pytorch_form_runs(tmp_path):
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'no such compiler here' >&2\nexit 1\n")
    failing.chmod(0o755)
    env = {"VMAMBA_KERNELS_CACHE": str(tmp_path / "cache"), "VMAMBA_CPU_SCAN": "1", "CC": str(failing)}
    run = _run(SCAN_ONCE, env)
    assert run.returncode == 0 and run.stdout.split() == ["False", "True"], run.stderr
    assert "could not be built" in run.stderr and "no such compiler here" in run.stderr
    assert run.stderr.count("RuntimeWarning") == 1
