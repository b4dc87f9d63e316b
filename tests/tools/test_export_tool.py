"""tools/export.py as a user runs it: a local checkpoint in, a standard ONNX file out, parity checked."""
import contextlib
import warnings

import pytest
import torch
import timm

import vmamba_zoo  # noqa: F401
from tests.tools.tool_runner import load_tool, run_script

SMALL = ["--model-kwargs", "embed_dim=32", "depth=2", "--img-size", "64"]


def test_onnx_export_from_a_checkpoint_with_parity_and_latency(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = timm.create_model("plainmamba_l1", embed_dim=32, depth=2, img_size=64)
    ckpt = tmp_path / "weights.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "model.onnx"
    proc = run_script("export.py", "plainmamba_l1", *SMALL, "--format", "onnx", "--out", out, "--checkpoint", ckpt,
                      "--check", "--check-sizes", "64", "80x96", "--repeats", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()
    assert "80x96 batch 2: rel. err" in proc.stdout and "FAILED" not in proc.stdout
    assert "onnxruntime" in proc.stdout and "PyTorch eager" in proc.stdout

    import onnxruntime as ort
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 72, 56)
    with torch.no_grad():
        want = model.eval()(x)  # the checkpoint's weights, not fresh ones
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_bad_arguments_are_one_line_errors(tmp_path):
    proc = run_script("export.py", "plainmamba_l1", "--out", tmp_path / "m.onnx", "--opset", "13")
    assert proc.returncode == 2 and "--opset must be 17 or newer" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("export.py", "no_such_model", "--out", tmp_path / "m.onnx")
    assert proc.returncode == 2 and "unknown model" in proc.stderr
    proc = run_script("export.py", "plainmamba_l1", "--out", tmp_path / "m.onnx", "--checkpoint", tmp_path / "none.pth")
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr


def test_export_leaves_out_only_rewrites_that_change_nothing_in_zoo_graphs():
    """export.py optimizes without onnxscript's several-output patterns (quadratic in the graph's size): the
    optimized graph is node for node the one that plain torch.onnx.export's optimization gives."""
    pytest.importorskip("onnxruntime")
    rewriter = pytest.importorskip("onnxscript.rewriter")
    export = load_tool("export")
    rules = rewriter._DEFAULT_REWRITE_RULES
    with export.linear_time_onnx_rewrites():
        kept = rewriter._DEFAULT_REWRITE_RULES
        assert kept and all(rule._target_pattern.has_single_output_node for rule in kept)
        assert len(kept) < len(rules), "onnxscript has no several-output pattern left: drop the workaround"
    assert rewriter._DEFAULT_REWRITE_RULES is rules

    torch.manual_seed(0)
    model = timm.create_model("plainmamba_l1", embed_dim=32, depth=2, img_size=64).eval()
    graphs = []
    for scoped in (contextlib.nullcontext, export.linear_time_onnx_rewrites):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), dynamo=True, optimize=False,
                                        dynamic_shapes=({0: "batch", 2: "height", 3: "width"},), verbose=False)
        with scoped():
            program.optimize()
        graphs.append([(node.op_type, len(node.inputs)) for node in program.model.graph])
    assert graphs[0] == graphs[1]


def test_torch_export_program_runs_at_another_size(tmp_path):
    out = tmp_path / "model.pt2"
    proc = run_script("export.py", "plainmamba_l1", *SMALL, "--format", "torch-export", "--out", out, "--check",
                      "--check-sizes", "64", "80x96", "--repeats", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "80x96 batch 2: rel. err" in proc.stdout and "FAILED" not in proc.stdout
    assert not [p.name for p in tmp_path.iterdir() if p.name != "model.pt2"]  # no temporary file left beside it
    program = torch.export.load(str(out))
    torch.manual_seed(0)
    x = torch.randn(3, 3, 72, 56)
    assert program.module()(x).shape == (3, 1000)
