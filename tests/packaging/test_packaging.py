"""The package installs as users get it: vmamba_kernels standalone, no top-level `kernels`, a working wheel."""
import ast
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(code, **kwargs):
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, timeout=600, **kwargs)


def test_kernel_library_imports_only_torch():
    probe = ("import sys, vmamba_kernels; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
             "{'vmamba_zoo', 'timm', 'mmengine', 'mmcv', 'mmdet', 'mmseg', 'fvcore'}); "
             "print(bad); assert not bad, bad")
    result = _run(["-c", probe], cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kernel_sources_name_no_zoo_or_mm_import():
    forbidden = ("vmamba_zoo", "timm", "mmengine", "mmcv", "mmdet", "mmseg")
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_no_top_level_kernels_module_is_installed():
    result = _run(["-c", "import importlib.util as u; print(u.find_spec('kernels'))"], cwd="/")
    assert result.stdout.strip() == "None", result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = _run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)])
    assert result.returncode == 0, result.stderr
    (path,) = out.glob("vmamba_zoo-*.whl")
    return path


def test_wheel_layout(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"vmamba_kernels", "vmamba_zoo"} <= tops
    assert "kernels" not in tops and "tests" not in tops


def test_wheel_installs_and_imports_in_a_clean_path(wheel, tmp_path):
    target = tmp_path / "site"
    result = _run(["-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])
    assert result.returncode == 0, result.stderr
    # -S: no site-packages .pth files, so the development (editable) install cannot answer the import;
    # the dependencies (torch, timm) come from the interpreter's site-packages by path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    probe = ("import vmamba_kernels, vmamba_zoo, torch; "
             "print(vmamba_kernels.__file__); print(vmamba_zoo.__file__); "
             "u = torch.randn(1, 2, 3); print(vmamba_kernels.selective_scan(u, u.abs(), -torch.ones(2, 1), "
             "torch.ones(1, 1, 3), torch.ones(1, 1, 3)).shape)")
    result = _run(["-S", "-c", probe], cwd=str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    kernels_file, zoo_file, shape = result.stdout.split("\n")[:3]
    assert kernels_file.startswith(str(target)) and zoo_file.startswith(str(target))
    assert shape == "torch.Size([1, 2, 3])"
