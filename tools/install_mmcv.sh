#!/usr/bin/env bash
# Build and install mmcv 2.1.0 with its compiled ops (NMS, RoIAlign, ...) for the installed torch.
#
# mmdet 3.3 and mmsegmentation 1.2.2 need mmcv >=2.0.0rc4,<2.2.0 with ops. PyPI ships mmcv 2.x as
# an sdist only, and it does not compile against torch >= 2.13 as is: its setup.py forces C++14/17
# while torch's headers need C++20. This script downloads the sdist, switches it to C++20 and builds
# it against the torch already installed (hence --no-build-isolation: in an isolated build env the
# ops are silently skipped because torch is not importable there).
#
# mmcv's setup.py imports pkg_resources, which setuptools >= 82 no longer ships, while torch 2.14
# requires setuptools >= 77.0.3 (a fresh venv gets the newest). The build tools mmcv needs
# (setuptools<70, wheel, ninja) therefore go into a folder of their own that is put first on
# PYTHONPATH for the download and the build only: the environment's own setuptools is not touched.
#
# Expected time: about 46 minutes on 2 CPU cores (CPU-only build); it scales with cores (MAX_JOBS).
#
# Usage:
#   tools/install_mmcv.sh                 # build and pip install
#   tools/install_mmcv.sh --wheel-dir DIR # build a wheel into DIR, do not install
#   tools/install_mmcv.sh --prepare-only  # download, patch, prepare the build tools and run setup.py's
#                                         # metadata step with the ops on; stop before compiling (seconds)
#   tools/install_mmcv.sh --patch-only [--sdist mmcv-2.1.0.tar.gz] [--src-dir DIR]
#                                         # download (or take) the sdist, unpack and patch only
# Environment: MAX_JOBS (default: all cores), FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST="9.0" for a
# GPU build, MMCV_VERSION (default 2.1.0), PYTHON (default: python).
set -euo pipefail

MMCV_VERSION="${MMCV_VERSION:-2.1.0}"
PYTHON="${PYTHON:-python}"
PATCH_ONLY=0
PREPARE_ONLY=0
SDIST=""
SRC_DIR=""
WHEEL_DIR=""

while [ $# -gt 0 ]; do
    case "$1" in
        --patch-only) PATCH_ONLY=1 ;;
        --prepare-only) PREPARE_ONLY=1 ;;
        --sdist) SDIST="$2"; shift ;;
        --src-dir) SRC_DIR="$2"; shift ;;
        --wheel-dir) WHEEL_DIR="$2"; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "install_mmcv.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$SRC_DIR" ]; then
    SRC_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")"
fi
mkdir -p "$SRC_DIR"
SRC_DIR="$(cd "$SRC_DIR" && pwd)"

# 1. Build tools, first: the download below already runs setup.py (pip prepares its metadata), and
#    that imports torch and pkg_resources. They live in their own folder, first on PYTHONPATH while
#    building. (--patch-only with a given --sdist runs no setup.py and needs none of this.)
if [ -z "$SDIST" ] || [ "$PATCH_ONLY" = 0 ]; then
    "$PYTHON" -c 'import torch; print("building mmcv for torch", torch.__version__)' || {
        echo "install_mmcv.sh: torch must be installed in $PYTHON's environment first" >&2; exit 1; }
    BUILD_TOOLS="$SRC_DIR/build-tools"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-conflicts --target "$BUILD_TOOLS" \
        "setuptools<70" "wheel<0.49" ninja
    export PYTHONPATH="$BUILD_TOOLS${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$BUILD_TOOLS/bin:$PATH"
    BUILD_TOOLS="$BUILD_TOOLS" "$PYTHON" - <<'PY'
import os, pkg_resources, setuptools, wheel
assert setuptools.__file__.startswith(os.environ["BUILD_TOOLS"]), setuptools.__file__
print("build tools: setuptools", setuptools.__version__, "(with pkg_resources) from", os.environ["BUILD_TOOLS"])
PY
fi

# 2. The sdist. --no-build-isolation lets pip's metadata step see torch and the build tools.
if [ -z "$SDIST" ]; then
    "$PYTHON" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        --no-build-isolation "mmcv==${MMCV_VERSION}" -d "$SRC_DIR"
    SDIST="$SRC_DIR/mmcv-${MMCV_VERSION}.tar.gz"
fi
tar -xzf "$SDIST" -C "$SRC_DIR"
PKG_DIR="$SRC_DIR/mmcv-${MMCV_VERSION}"
SETUP="$PKG_DIR/setup.py"
[ -f "$SETUP" ] || { echo "install_mmcv.sh: $SETUP not found in $SDIST" >&2; exit 1; }

# 3. C++14/17 -> C++20 in every compiler flag (gcc's -std=, MSVC's /std:).
sed -E -i 's/std([=:])c\+\+1[47]/std\1c++20/g' "$SETUP"
if grep -Eq 'std[=:]c\+\+1[47]' "$SETUP" || ! grep -q 'std=c++20' "$SETUP"; then
    echo "install_mmcv.sh: patching the C++ standard in $SETUP failed" >&2
    exit 1
fi
echo "patched $SETUP to C++20"
if [ "$PATCH_ONLY" = 1 ]; then
    echo "$PKG_DIR"
    exit 0
fi

export MMCV_WITH_OPS=1
export FORCE_CUDA="${FORCE_CUDA:-0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

if [ "$PREPARE_ONLY" = 1 ]; then
    # Everything the build runs before the compiler: setup.py with the ops on, the patched flags,
    # torch's extension builder and ninja. The ops list must be there, or the build would skip them.
    EGG_BASE="$SRC_DIR/egg-info"
    mkdir -p "$EGG_BASE"
    (cd "$PKG_DIR" && "$PYTHON" setup.py -q egg_info --egg-base "$EGG_BASE")
    "$PYTHON" -c 'from torch.utils.cpp_extension import verify_ninja_availability as v; v(); print("ninja found")'
    (cd "$PKG_DIR" && "$PYTHON" - <<'PY'
import runpy, sys
import setuptools
calls = {}
setuptools.setup = lambda **kw: calls.update(kw)
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py", run_name="__main__")
exts = calls.get("ext_modules") or []
assert exts, "setup.py declared no extension: the ops would be skipped"
flags = [f for e in exts for v in (e.extra_compile_args.values() if isinstance(e.extra_compile_args, dict)
                                   else [e.extra_compile_args]) for f in v]
assert any("c++20" in f for f in flags) and not any("c++17" in f or "c++14" in f for f in flags), flags
print("setup.py ready:", [e.name for e in exts], "C++20")
PY
    )
    echo "install_mmcv.sh: prepared $PKG_DIR; the build itself was not run (--prepare-only)"
    exit 0
fi

# 4. Build.
if [ -n "$WHEEL_DIR" ]; then
    "$PYTHON" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -w "$WHEEL_DIR" "$PKG_DIR"
    exit 0
fi
"$PYTHON" -m pip install --disable-pip-version-check --no-build-isolation --no-deps "$PKG_DIR"

# 5. The ops must be there: without them mmdet fails only later, at the first NMS.
"$PYTHON" -c 'from mmcv.ops import nms, RoIAlign; import mmcv; print("mmcv", mmcv.__version__, "with ops")'
