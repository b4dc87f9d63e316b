#!/usr/bin/env bash
# Build and install mmcv 2.1.0 with its compiled ops (NMS, RoIAlign, ...) for the installed torch.
#
# mmdet 3.3 and mmsegmentation 1.2.2 need mmcv >=2.0.0rc4,<2.2.0 with ops. PyPI ships mmcv 2.x as
# an sdist only, and it does not compile against torch >= 2.13 as is: its setup.py forces C++14/17
# while torch's headers need C++20. This script downloads the sdist, switches it to C++20 and builds
# it against the torch already installed (hence --no-build-isolation: in an isolated build env the
# ops are silently skipped because torch is not importable there).
#
# Expected time: about 46 minutes on 2 CPU cores (CPU-only build); it scales with cores (MAX_JOBS).
#
# Usage:
#   tools/install_mmcv.sh                 # build and pip install
#   tools/install_mmcv.sh --wheel-dir DIR # build a wheel into DIR, do not install
#   tools/install_mmcv.sh --patch-only [--sdist mmcv-2.1.0.tar.gz] [--src-dir DIR]
#                                         # download (or take) the sdist, unpack and patch only
# Environment: MAX_JOBS (default: all cores), FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST="9.0" for a
# GPU build, MMCV_VERSION (default 2.1.0), PYTHON (default: python).
set -euo pipefail

MMCV_VERSION="${MMCV_VERSION:-2.1.0}"
PYTHON="${PYTHON:-python}"
PATCH_ONLY=0
SDIST=""
SRC_DIR=""
WHEEL_DIR=""

while [ $# -gt 0 ]; do
    case "$1" in
        --patch-only) PATCH_ONLY=1 ;;
        --sdist) SDIST="$2"; shift ;;
        --src-dir) SRC_DIR="$2"; shift ;;
        --wheel-dir) WHEEL_DIR="$2"; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "install_mmcv.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "$SRC_DIR" ]; then
    SRC_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mmcv-build.XXXXXX")"
fi
mkdir -p "$SRC_DIR"

# 1. The sdist. pip prepares its metadata by running setup.py, which imports torch and
#    pkg_resources; --no-build-isolation lets it see both.
if [ -z "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation \
        "mmcv==${MMCV_VERSION}" -d "$SRC_DIR"
    SDIST="$SRC_DIR/mmcv-${MMCV_VERSION}.tar.gz"
fi
tar -xzf "$SDIST" -C "$SRC_DIR"
PKG_DIR="$SRC_DIR/mmcv-${MMCV_VERSION}"
SETUP="$PKG_DIR/setup.py"
[ -f "$SETUP" ] || { echo "install_mmcv.sh: $SETUP not found in $SDIST" >&2; exit 1; }

# 2. C++14/17 -> C++20 in every compiler flag (gcc's -std=, MSVC's /std:).
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

# 3. Build environment: setup.py imports pkg_resources (setuptools < 70 still builds it cleanly);
#    ninja parallelizes the extension build.
"$PYTHON" -c 'import torch; print("building mmcv for torch", torch.__version__)'
"$PYTHON" -m pip install "setuptools<70" ninja

export MMCV_WITH_OPS=1
export FORCE_CUDA="${FORCE_CUDA:-0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -n "$WHEEL_DIR" ]; then
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" "$PKG_DIR"
    exit 0
fi
"$PYTHON" -m pip install --no-build-isolation --no-deps "$PKG_DIR"

# 4. The ops must be there: without them mmdet fails only later, at the first NMS.
"$PYTHON" -c 'from mmcv.ops import nms, RoIAlign; import mmcv; print("mmcv", mmcv.__version__, "with ops")'
