"""tools/bench_layers.py on CPU at tiny sizes: every candidate runs, agrees with the baseline, and is counted."""
import json

from .tool_runner import assert_ok, run_script


def test_bench_layers_cpu_smoke(tmp_path):
    out = tmp_path / "bench_layers.json"
    proc = run_script("bench_layers.py", "--device", "cpu", "--batch", "1", "--img-size", "16", "--stages", "1",
                      "--dtype", "fp32", "--warmup", "0", "--reps", "1", "--out", out)
    assert_ok(proc)
    data = json.loads(out.read_text())
    rows = {(r["group"], r["impl"]): r for r in data["rows"]}
    assert set(rows) == {("fusion", "nchw"), ("fusion", "channels_last"), ("fusion", "merged"), ("fusion", "fused"),
                         ("block", "baseline_nchw"), ("block", "channels_last"), ("block", "channels_last_merged"),
                         ("block", "channels_last_fused")}
    for r in rows.values():
        assert r["stage"] == 0 and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["rel_err_vs_baseline"] < 1e-5, r  # fp32: the candidates are one function
    assert rows[("fusion", "nchw")]["shape"] == [1, 128, 4, 4]
    assert rows[("block", "baseline_nchw")]["shape"] == [1, 4, 4, 64]
    # the default fusion launches fewer ops than the baseline (α folded into the kernels)
    assert rows[("fusion", "channels_last")]["fwd_bwd_ops"] < rows[("fusion", "nchw")]["fwd_bwd_ops"]
    assert "channels_last" in proc.stdout and data["meta"]["device"] == "cpu"


def test_bench_layers_rejects_bad_stage():
    proc = run_script("bench_layers.py", "--device", "cpu", "--stages", "5")
    assert proc.returncode == 2 and "--stages" in proc.stderr
