"""The README's set-up commands: every make target and .ci/run use the interpreter named by PYTHON=."""
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["install", "demo", "test"])
def test_every_make_target_honours_python_and_torch_index(target):
    result = subprocess.run(["make", "-n", target, "PYTHON=/venv/bin/python3", "TORCH_INDEX=https://example.org/cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines and all("/venv/bin/python3" in line for line in lines), result.stdout
    assert all(re.search(r"(^|[\s;(])python3?\s", line) is None for line in lines), "a bare python in " + result.stdout
    assert "https://example.org/cpu" in result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_hands_demo_args_to_the_training_tool():
    result = subprocess.run(["make", "-n", "demo", "DEMO_ARGS=--checkpoint-hist 5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tools/train.py --model groupmamba_tiny --epochs 2 --checkpoint-hist 5" in result.stdout


def test_ci_run_calls_python_only_through_the_python_variable():
    script = (ROOT / ".ci/run").read_text()
    commands = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    bare = [line for line in commands if re.search(r'(^|[\s;(])python3?\s', line)]
    assert not bare, bare
