"""Microbenchmark of Spatial-Mamba's layers: the state fusion's implementations and a whole block, forward and
forward+backward, at the stage shapes of ``spatialmamba_tiny`` (batch 128, 224², bf16 autocast by default).

Candidates (each the same function; ``vmamba_zoo.layers.state_fusion`` and ``vmamba_zoo.models.spatialmamba``
say why each exists):

- state fusion, on the scan's (B, 2C, H, W) fp32 states: ``StateFusion(impl=...)`` for every impl in
  ``FUSION_IMPLS`` ("nchw" is the baseline: pad, conv and scale per dilation in NCHW);
- block, on a (B, H, W, C) map: ``SpatialMambaBlock`` with (mixer_layout, fusion_impl) = (channels_first, nchw)
  (the baseline), (channels_last, channels_last) (the eval default), (channels_last, merged) and (channels_last,
  fused) (the fused Triton kernels of ``vmamba_kernels.dilated_dwconv_sum``, opt-in).

Each row has the median GPU time of ``--reps`` runs after ``--warmup`` (torch.cuda.Event; wall time on CPU),
the number of aten ops that launch work (views excluded; counted once with a dispatch mode, a proxy for kernel
launches), and the output's relative error against the baseline row of its group.

    python tools/bench_layers.py --out results/bench_layers.json           # GPU, batch 128, every stage
    python tools/bench_layers.py --device cpu --batch 2 --img-size 32 --warmup 1 --reps 2   # smoke run
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toolkit.cli import ToolArgumentParser, UsageError, git_commit, run_tool

from vmamba_zoo.layers.state_fusion import FUSION_IMPLS, StateFusion
from vmamba_zoo.models.spatialmamba import SpatialMambaBlock

# spatialmamba_tiny: stage i runs at (img/4)/2^i with dims 64·2^i; the mixer's states have 2·dim channels
STAGE_DIMS = (64, 128, 256, 512)
BLOCK_VARIANTS = {
    "baseline_nchw": dict(mixer_layout="channels_first", fusion_impl="nchw"),
    "channels_last": dict(mixer_layout="channels_last", fusion_impl="channels_last"),
    "channels_last_merged": dict(mixer_layout="channels_last", fusion_impl="merged"),
    "channels_last_fused": dict(mixer_layout="channels_last", fusion_impl="fused"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NO_LAUNCH = {"aten.detach", "aten._local_scalar_dense", "aten.lift_fresh", "aten.alias"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops that do work (views and metadata ops excluded)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not func.is_view and name not in _NO_LAUNCH:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())


def time_ms(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def count_ops(fn):
    with OpCounter() as counter:
        fn()
    return counter.total


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _runners(module, inp, autocast):
    params = [p for p in module.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad(), autocast():
            return module(inp)

    def fwd_bwd():
        with autocast():
            out = module(inp)
        torch.autograd.grad(out, [inp] + params, torch.ones_like(out))

    return fwd, fwd_bwd


def bench_group(group, stage, candidates, make_input, args, device, autocast):
    """Times every candidate module on one input; the first candidate is the baseline for rel_err."""
    rows, base_out = [], None
    inp = make_input()
    for name, module in candidates.items():
        module.to(device).train()
        fwd, fwd_bwd = _runners(module, inp, autocast)
        out = fwd()
        err = 0.0 if base_out is None else rel_err(out, base_out)
        base_out = out if base_out is None else base_out
        row = dict(group=group, stage=stage, impl=name, shape=list(inp.shape),
                   fwd_ms=time_ms(fwd, device, args.warmup, args.reps),
                   fwd_bwd_ms=time_ms(fwd_bwd, device, args.warmup, args.reps),
                   fwd_ops=count_ops(fwd), fwd_bwd_ops=count_ops(fwd_bwd), rel_err_vs_baseline=err)
        rows.append(row)
        print(f"{group:<6} s{stage + 1}  {name:<22} {str(tuple(row['shape'])):<22} {row['fwd_ms']:9.3f} "
              f"{row['fwd_bwd_ms']:11.3f} {row['fwd_ops']:7d} {row['fwd_bwd_ops']:8d} {err:10.2e}", flush=True)
        module.cpu()
    return rows


def build_parser():
    p = ToolArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224, help="stage i runs at (img_size/4)/2^i")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (fp32: no autocast)")
    p.add_argument("--stages", default="1,2,3,4", help="comma-separated stages (1-4)")
    p.add_argument("--groups", default="fusion,block", help="comma-separated: fusion, block")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the rows as JSON to this file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available (use --device cpu)")
    try:
        stages = sorted({int(s) - 1 for s in args.stages.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"--stages must be comma-separated integers in 1-4, got {args.stages!r}")
    if not stages or any(not 0 <= s < len(STAGE_DIMS) for s in stages):
        raise UsageError(f"--stages must be in 1-4, got {args.stages!r}")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not groups or any(g not in ("fusion", "block") for g in groups):
        raise UsageError(f"--groups must be from fusion,block, got {args.groups!r}")
    if args.batch < 1 or args.img_size < 4 or args.warmup < 0 or args.reps < 1:
        raise UsageError("need --batch >= 1, --img-size >= 4, --warmup >= 0, --reps >= 1")
    dtype = DTYPES[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} batch={args.batch} "
          f"img={args.img_size} dtype={args.dtype} torch={torch.__version__} commit={git_commit()}")
    print(f"{'group':<6} {'stg':<3} {'impl':<22} {'input':<22} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd ops':>7} "
          f"{'f+b ops':>8} {'rel err':>10}")
    rows = []
    for s in stages:
        dim, size = STAGE_DIMS[s], max(1, args.img_size // 4 // 2 ** s)
        if "fusion" in groups:
            base = StateFusion(2 * dim, impl="nchw")
            with torch.no_grad():  # random kernels, so that a wrong tap cannot hide behind all-ones weights
                base.weight.normal_()
                base.alpha.normal_()
            candidates = {}
            for impl in ("nchw",) + tuple(i for i in FUSION_IMPLS if i not in ("nchw", "auto")):  # auto: by mode
                m = StateFusion(2 * dim, impl=impl)
                m.load_state_dict(base.state_dict())
                candidates[impl] = m

            def states():  # the scan's output: fp32, channels-first
                return torch.randn(args.batch, 2 * dim, size, size, device=device, requires_grad=True)

            rows += bench_group("fusion", s, candidates, states, args, device, autocast)
        if "block" in groups:
            base = SpatialMambaBlock(dim, **BLOCK_VARIANTS["baseline_nchw"])
            candidates = {}
            for name, kw in BLOCK_VARIANTS.items():
                m = SpatialMambaBlock(dim, **kw)
                m.load_state_dict(base.state_dict())
                candidates[name] = m

            def tokens():  # the residual stream under autocast: (B, H, W, C), contiguous
                x = torch.randn(args.batch, size, size, dim, device=device)
                return x.to(dtype if dtype != torch.float32 else x.dtype).requires_grad_()

            rows += bench_group("block", s, candidates, tokens, args, device, autocast)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    batch=args.batch, img_size=args.img_size, dtype=args.dtype, warmup=args.warmup, reps=args.reps,
                    torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d"))
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
