#!/usr/bin/env bash
# What the CPU test suite cannot check, on a CUDA machine (roughly 15 minutes on one H200 in all):
#   1. the scan kernels against the reference at real shapes, then their times (tools/bench_kernels.py);
#   2. torch.compile of a zoo model on CUDA, forward and backward, against eager;
#   3. tools/train.py with bf16 (torchrun over every GPU, NCCL) and fp16 AMP, then tools/validate.py;
#   4. whole-model throughput of the zoo's T variants next to the timm baselines (tools/benchmark.py).
# Results go to OUT_DIR (default gpu_checks/): one log per step plus the tools' JSON/markdown tables.
# STEPS (default all) picks steps, e.g. "kernels compile train" and "models" as two shorter runs.
#
#   bash tools/gpu_checks.sh [OUT_DIR] [COMMIT] [STEPS]
#
# Without an install (a bare copy of the repository), the package is linked onto PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_checks}"
COMMIT="${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
STEPS="${3:-kernels compile train models}"
RUNS="$(mktemp -d)"  # training runs (checkpoints stay out of OUT_DIR)
mkdir -p "$OUT"
if ! python -c "import vmamba_kernels, vmamba_zoo" 2>/dev/null; then
    LINK="$(mktemp -d)"
    ln -sfn "$PWD/kernels" "$LINK/vmamba_kernels"
    export PYTHONPATH="$LINK:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
GPUS="$(python -c "import torch; print(torch.cuda.device_count())")"
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_checks.sh needs a CUDA device" >&2
    exit 2
fi
failed=0
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, report the status
    local name="$1" limit="$2"
    shift 2
    echo "### $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "### $name: exit $rc"
    tail -n 5 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

wanted kernels && step kernels 300 python tools/bench_kernels.py --check --no-reference --workers 8 --commit "$COMMIT" --out "$OUT"

wanted compile && step compile 180 python - <<'EOF'
import torch, timm, vmamba_zoo  # noqa: F401
torch.manual_seed(0)
model = timm.create_model("vmamba_tiny_s1l8", num_classes=10).cuda()
x = torch.randn(2, 3, 224, 224, device="cuda")
eager_out = model(x)
eager_out.square().mean().backward()
eager_grads = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
compiled_out = torch.compile(model, fullgraph=False)(x)
compiled_out.square().mean().backward()
err = ((compiled_out - eager_out).norm() / eager_out.norm()).item()
grad_err = max(((p.grad - g).norm() / g.norm().clamp(min=1e-12)).item() for p, g in zip(model.parameters(), eager_grads))
print(f"torch.compile vs eager: output rel. err {err:.2e}, worst parameter-gradient rel. err {grad_err:.2e}")
assert err < 1e-3 and grad_err < 1e-2, (err, grad_err)
EOF

if wanted train; then
    step train_bf16_ddp 240 torchrun --nproc-per-node "$GPUS" tools/train.py --model groupmamba_tiny --epochs 2 \
        -b 128 --amp bf16 --channels-last --workers 4 --output "$RUNS/bf16"
    step validate 120 python tools/validate.py --checkpoint "$RUNS/bf16/model_best.pth.tar" --amp bf16
    step train_fp16 240 python tools/train.py --model efficientvmamba_tiny --epochs 2 -b 128 --amp fp16 \
        --workers 4 --output "$RUNS/fp16"
fi

wanted models && step models 600 python tools/benchmark.py --models zoo-tiny,baselines --batch-size 128 --amp bf16 --warmup 5 \
    --iters 15 --commit "$COMMIT" --out-dir "$OUT"

exit "$failed"
