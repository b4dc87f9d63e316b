"""Running a test file's own checks under the Triton interpreter. Triton decides at import whether kernels are
interpreted, so the checks run in a child process started with TRITON_INTERPRET=1, which prints one JSON record
per comparison (``rel_err``, ``tol``, ``finite``) or property (``ok``)."""
import json
import os
import subprocess
import sys

import pytest


def records_under_interpreter(script: str, *args: str, timeout: int = 900) -> list:
    """The JSON records that ``python script *args`` prints with TRITON_INTERPRET=1 (it must exit 0)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def records_of_form(form: str, script: str, checks) -> list:
    """The records of a test file's checks of one form of its op: the PyTorch form (``form="reference"``) from
    ``checks(form)`` in this process, the fused kernels ("triton") from ``script`` run under the interpreter."""
    if form == "reference":
        return checks(form)
    pytest.importorskip("triton")
    return records_under_interpreter(script)


def assert_within_tolerance(records: list, at_least: int) -> None:
    """At least ``at_least`` comparisons ran, each is finite and within its record's tolerance, and every property
    record holds."""
    compared = [r for r in records if "rel_err" in r]
    assert len(compared) >= at_least, (len(compared), at_least)
    bad = [r for r in compared if not (r["finite"] and r["rel_err"] <= r["tol"])]
    assert not bad, bad
    failed = [r for r in records if not r.get("ok", True)]
    assert not failed, failed
