"""The import arrows of ARCHITECTURE.md, read from every source file with ast (nothing is imported)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MM_LIBRARIES = ("mmengine", "mmdet", "mmseg", "mmcv")
# What the tools' folder makes importable (it is on sys.path when they run): its modules and the toolkit package.
TOOLS = tuple(sorted(name[:-3] if name.endswith(".py") else name for name in os.listdir(os.path.join(REPO, "tools"))
                     if name.endswith(".py") or os.path.isfile(os.path.join(REPO, "tools", name, "__init__.py"))))


def _module_name(path: str) -> str:
    """The dotted name a file is imported under (kernels/ installs as vmamba_kernels)."""
    parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
    if parts[0] == "kernels":
        parts[0] = "vmamba_kernels"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> set:
    """Absolute names of every module ``source`` (the text of ``module``) imports, at any depth of the file."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return found


def _sources(*folders):
    for folder in folders:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(root, name)


def _under(name: str, *prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(module: str, imported: set) -> list:
    """The imports ``module`` may not make, by ARCHITECTURE.md's arrows."""
    forbidden = ["tools", *TOOLS]
    if _under(module, "vmamba_kernels"):
        forbidden += ["vmamba_zoo", "timm", *MM_LIBRARIES]
        if _under(module, "vmamba_kernels.triton"):
            forbidden.append("vmamba_kernels.ops")
    elif _under(module, "vmamba_zoo.checkpoint"):
        forbidden += ["vmamba_zoo.layers", "vmamba_zoo.models", "vmamba_zoo.mm", "vmamba_kernels", *MM_LIBRARIES]
    elif _under(module, "vmamba_zoo.layers"):
        forbidden += ["vmamba_zoo.models", "vmamba_zoo.mm", "vmamba_zoo.checkpoint", *MM_LIBRARIES]
    elif _under(module, "vmamba_zoo.models"):
        forbidden += ["vmamba_zoo.mm", *MM_LIBRARIES]
    elif _under(module, "vmamba_zoo.mm"):
        pass  # the one place that imports the mm libraries; models and everything below them are allowed
    elif _under(module, "vmamba_zoo"):
        forbidden += ["vmamba_zoo.mm", *MM_LIBRARIES]
    # ``from . import ops`` inside vmamba_kernels.triton resolves to vmamba_kernels.triton.ops, not ops
    return sorted(name for name in imported if _under(name, *forbidden))


PACKAGE_FILES = list(_sources("kernels", "vmamba_zoo"))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_imports_follow_the_arrows(path):
    module = _module_name(path)
    with open(path, encoding="utf-8") as f:
        imported = imports_of(f.read(), module, is_package=path.endswith("__init__.py"))
    assert not violations(module, imported), f"{module} imports {violations(module, imported)}"


def test_the_check_sees_every_package_and_resolves_relative_imports():
    modules = {_module_name(p) for p in PACKAGE_FILES}
    assert {"vmamba_kernels.ops", "vmamba_kernels.triton.backend", "vmamba_zoo.layers.routes",
            "vmamba_zoo.models.vmamba", "vmamba_zoo.mm.backbone", "vmamba_zoo.checkpoint"} <= modules
    assert imports_of("from .. import ops", "vmamba_kernels.triton.backend") >= {"vmamba_kernels.ops"}
    assert imports_of("from ..layers.routes import device_routes", "vmamba_zoo.models.vmamba") >= {
        "vmamba_zoo.layers.routes"}


@pytest.mark.parametrize("module, source", [
    ("vmamba_kernels.routes", "import vmamba_zoo"),
    ("vmamba_kernels.ops", "from timm.layers import DropPath"),
    ("vmamba_kernels.triton.backend", "from .. import ops"),
    ("vmamba_kernels.triton.launches", "from vmamba_kernels.ops import selective_scan"),
    ("vmamba_zoo.layers.routes", "from ..models import vmamba"),
    ("vmamba_zoo.models.vmamba", "from mmengine.registry import MODELS"),
    ("vmamba_zoo.models.vmamba", "from ..mm import backbone"),
    ("vmamba_zoo.checkpoint", "from .models import vmamba"),
    ("vmamba_zoo.mm.backbone", "import benchmark"),
    ("vmamba_zoo.models.vmamba", "from toolkit.cli import create_model"),
])
def test_a_backward_arrow_is_reported(module, source):
    assert violations(module, imports_of(source, module))


MAX_FUNCTION_LINES = 150  # a longer function is split into named steps


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list:
    """(qualified name, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > limit:
                    found.append((name, lines))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_no_function_is_over_the_line_limit():
    too_long = []
    for path in _sources("tools", "vmamba_zoo", "kernels"):
        with open(path, encoding="utf-8") as f:
            too_long += [f"{os.path.relpath(path, REPO)}: {name} ({lines} lines)"
                         for name, lines in long_functions(f.read())]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps): {too_long}"


def test_the_line_limit_check_counts_nested_functions_and_methods():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # a def line + this body: one over
    source = f"def f():\n{body}\n\nclass C:\n    def m(self):\n        def inner():\n" + body.replace(
        "    ", "            ") + "\n        return inner\n"
    assert long_functions(source) == [("f", MAX_FUNCTION_LINES + 1), ("C.m", MAX_FUNCTION_LINES + 3),
                                      ("C.m.inner", MAX_FUNCTION_LINES + 1)]
    assert long_functions("def g():\n    return 1\n") == []
