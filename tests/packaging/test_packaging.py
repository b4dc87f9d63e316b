"""The package installs as users get it: vmamba_kernels standalone, no top-level `kernels`, a working wheel."""
import ast
import os
import pathlib
import shutil
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


# What building the package reads. The build runs in a copy: setuptools writes build/ and *.egg-info beside the
# sources, and test processes (pytest -n) that build at once in one folder break each other's build.
PACKAGE_SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "vmamba_zoo_timm_hint.py", "kernels",
                   "vmamba_zoo")


@pytest.fixture(scope="module")
def package_source(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    for name in PACKAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    return source


@pytest.fixture(scope="module")
def wheel(package_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = _run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                   str(package_source)])
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


@pytest.mark.parametrize("install", ["wheel", "editable"])
def test_installed_package_hints_import_vmamba_zoo_for_a_zoo_name_without_importing_anything_at_start(
        install, request, tmp_path):
    """A user who did `pip install vmamba_zoo` (or `pip install -e .` in a clone) and `import timm` only: timm's
    unknown-model error for a zoo name says to `import vmamba_zoo`, other names keep timm's error, and interpreter
    start imports none of torch, timm or vmamba_zoo (the installed .pth file imports only the small hint module)."""
    venv = tmp_path / "venv"  # a user's environment: the dependencies from this one, no PYTHONPATH
    result = _run(["-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    assert result.returncode == 0, result.stderr
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    what = ([str(request.getfixturevalue("wheel"))] if install == "wheel"
            else ["--no-build-isolation", "-e", str(request.getfixturevalue("package_source"))])
    result = subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", *what],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    probe = """
import sys
at_start = sorted(m for m in ("torch", "timm", "vmamba_zoo", "vmamba_kernels") if m in sys.modules)
assert at_start == [], at_start
assert "vmamba_zoo_timm_hint" in sys.modules, "the .pth file did not run"
import importlib.util
assert importlib.util.find_spec("timm") is not None  # asking whether timm is there, as other libraries do
import timm
for name in ("groupmamba_tiny", "vmamba_tiny_s1l8.some_tag", "no_such_model"):
    try:
        timm.create_model(name)
    except RuntimeError as e:
        print(e)
import vmamba_zoo
print(type(timm.create_model("groupmamba_tiny", num_classes=3)).__name__, vmamba_zoo.__file__)
"""
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                            env=env)
    assert result.returncode == 0, result.stderr
    zoo, tagged, other, built = result.stdout.strip().splitlines()
    assert zoo == ("Unknown model (groupmamba_tiny): groupmamba_tiny is a vmamba_zoo model name: "
                   "`import vmamba_zoo` registers the zoo's models with timm")
    assert tagged.startswith("Unknown model (vmamba_tiny_s1l8)") and "`import vmamba_zoo`" in tagged, tagged
    assert other == "Unknown model (no_such_model)"
    home = venv if install == "wheel" else request.getfixturevalue("package_source")
    assert built.startswith("GroupMamba ") and built.split()[1].startswith(str(home)), built
