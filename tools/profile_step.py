#!/usr/bin/env python3
"""Where a training step's time goes: GPU time by kind of kernel, launches, host time and cold start.

For each model, in a fresh child process with an empty Triton cache (so that compilation and tuning count, as
they do for a new user):

- cold start: seconds to build the model, to finish the first inference and the first training step;
- the steady-state training step (median ms) and its host part (until the step's Python returns);
- a torch.profiler trace of ``--profile-steps`` training steps, its GPU kernel time split into kinds (scan,
  GEMM, norm, conv, copies/casts/permutes, elementwise, reductions, optimizer, other) by kernel name, the number
  of kernel launches per step, and the kernels that take the most time.

    python tools/profile_step.py --models vmamba_tiny_s1l8,groupmamba_tiny --out-dir DIR     # CUDA
    python tools/profile_step.py --models test_resnet --device cpu --batch-size 2 --img-size 32   # smoke

The kinds come from kernel names, so treat them as approximate; the top-kernel list shows the names.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone

from toolkit.cli import ToolArgumentParser, UsageError, git_commit, parse_csv_list, run_tool

# First match wins: the order matters (a "copy" inside a GEMM's name stays a GEMM).
KINDS = [
    ('scan', re.compile(r'scan|selective', re.I)),
    ('gemm', re.compile(r'gemm|nvjet|cutlass|xmma|wgmma|sm90_|sm80_|cublas|matmul|splitK', re.I)),
    ('optimizer', re.compile(r'multi_tensor|adam|foreach', re.I)),
    ('norm', re.compile(r'layer_norm|layernorm|batch_norm|batchnorm|welford|bn_fw|bn_bw|_norm_', re.I)),
    ('conv', re.compile(r'conv|depthwise|dgrad|wgrad|implicit_convolve|fprop', re.I)),
    ('copy', re.compile(r'copy|transpose|permute|cat_|CatArray|index|gather|scatter|contiguous|fill', re.I)),
    ('reduce', re.compile(r'reduce|softmax|sum_|mean', re.I)),
    ('elementwise', re.compile(r'elementwise|vectorized|unrolled|pointwise|triton_poi', re.I)),
]


def kind_of(kernel_name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(kernel_name):
            return kind
    return 'other'


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', default='vmamba_tiny_s1l8,groupmamba_tiny,efficientvmamba_tiny,spatialmamba_tiny,'
                                       'plainmamba_l1,vim2_tiny,convnext_tiny', help='comma list of model names')
    p.add_argument('--batch-size', '-b', type=int, default=128)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp', default='bf16', choices=['fp32', 'bf16'])
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--iters', type=int, default=10, help='timed steady-state steps')
    p.add_argument('--profile-steps', type=int, default=2)
    p.add_argument('--top', type=int, default=12, help='kernels listed by time')
    p.add_argument('--device', default='auto')
    p.add_argument('--keep-cache', action='store_true',
                   help="use the Triton cache as it is (default: an empty one per model, as for a new user)")
    p.add_argument('--timeout', type=int, default=300, help='seconds per model')
    p.add_argument('--out-dir', default=None, help='write profile.json and profile.md here')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    return p


def profile_model(name, args):
    """One model, in this process: cold start, steady state, profile."""
    import torch

    from benchmark import Timer
    from toolkit.cli import create_model
    from toolkit.cuda_graphs import cross_entropy_loss
    device = torch.device(args.device)
    timer = Timer(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    rec = {'model': name, 'batch_size': args.batch_size, 'img_size': args.img_size, 'amp': args.amp}
    start = time.perf_counter()
    model = create_model(name, img_size=args.img_size).to(device)
    timer.sync()
    rec['cold_build_s'] = round(time.perf_counter() - start, 2)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    classes = model.num_classes or 1000
    y = torch.randint(0, classes, (args.batch_size,), device=device)

    model.eval()
    with torch.inference_mode(), torch.autocast(**amp):
        model(x)
    timer.sync()
    rec['cold_first_infer_s'] = round(time.perf_counter() - start, 2)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            loss = cross_entropy_loss(model(x), y)
        loss.backward()
        optimizer.step()

    step()
    timer.sync()
    rec['cold_first_step_s'] = round(time.perf_counter() - start, 2)
    step_s, host_s = timer.run_with_host(step, args.warmup, args.iters)
    rec['step_ms'] = round(1000 * step_s, 2)
    rec['host_ms'] = round(1000 * host_s, 2)
    rec['train_img_s'] = round(args.batch_size / step_s, 1)
    if device.type == 'cuda':
        rec['train_peak_gib'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    rec.update(kernel_split(step, args, device))
    return rec


def kernel_split(step, args, device):
    """GPU kernel time per step by kind, launches per step and the top kernels, from torch.profiler."""
    import torch
    from benchmark import Timer
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            step()
        Timer(device).sync()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if device.type == 'cuda' and evt.device_type == torch.autograd.DeviceType.CUDA:
            us = evt.device_time
        elif device.type != 'cuda' and evt.device_type == torch.autograd.DeviceType.CPU and not evt.cpu_parent:
            us = evt.cpu_time  # CPU smoke runs: top-level ops stand in for kernels
        else:
            continue
        per_kernel[evt.name][0] += us
        per_kernel[evt.name][1] += 1
    n = args.profile_steps
    kinds = defaultdict(float)
    launches = 0
    for kname, (us, count) in per_kernel.items():
        kinds[kind_of(kname)] += us / n / 1000
        launches += count
    total = sum(kinds.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]
    return {
        'gpu_ms': round(total, 2),
        'launches': round(launches / n),
        'split_ms': {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        'top_kernels': [{'name': k[:140], 'kind': kind_of(k), 'ms': round(us / n / 1000, 3), 'calls': c // n}
                        for k, (us, c) in top],
    }


def run_child(name, args, argv):
    """Profile one model in a fresh process (fresh Triton cache unless --keep-cache); its JSON record."""
    env = dict(os.environ)
    cache = None
    if not args.keep_cache:
        cache = tempfile.mkdtemp(prefix='triton-cache-')
        env['TRITON_CACHE_DIR'] = cache
    with tempfile.NamedTemporaryFile(suffix='.json', delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--child', f'{name}={out}']
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = 'timeout'
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = {'model': name, 'error': f'child exited with {rc} before writing a result (see its output above)'}
    finally:
        os.unlink(out)
    rec['process_s'] = round(time.perf_counter() - start, 1)
    return rec


def markdown(rows, header):
    kinds = [k for k, _ in KINDS] + ['other']
    cols = ['model', 'step_ms', 'host_ms', 'gpu_ms', 'launches'] + kinds + ['cold_first_step_s', 'train_img_s']
    out = header + ['', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        if 'error' in r:
            out.append(f"| {r['model']} | error: {r['error'][:100]} |")
            continue
        cells = []
        for c in cols:
            if c in kinds:
                ms = r['split_ms'].get(c, 0.0)
                cells.append(f"{ms:.1f} ({100 * ms / max(r['gpu_ms'], 1e-9):.0f}%)")
            else:
                cells.append(str(r.get(c, '')))
        out.append('| ' + ' | '.join(cells) + ' |')
    for r in rows:
        if r.get('top_kernels'):
            out += ['', f"Top kernels of {r['model']} (ms per step, calls per step):", '']
            out += [f"- {k['ms']:.2f} ms, {k['calls']}×, {k['kind']}: `{k['name']}`" for k in r['top_kernels']]
    return '\n'.join(out) + '\n'


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == 'auto':
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.batch_size < 1 or args.iters < 1 or args.profile_steps < 1:
        raise UsageError('--batch-size, --iters and --profile-steps must be >= 1')
    if args.child:
        name, out = args.child.split('=', 1)
        try:
            rec = profile_model(name, args)
        except Exception as e:  # noqa: BLE001  (reported in the table; the parent goes on with the next model)
            import traceback
            traceback.print_exc()
            rec = {'model': name, 'error': f'{type(e).__name__}: {str(e)[:300]}'}
        with open(out, 'w') as f:
            json.dump(rec, f)
        return 0
    names = parse_csv_list(args.models)
    if not names:
        raise UsageError('--models is empty')
    from toolkit.cli import require_model
    for name in names:
        require_model(name)
    child_argv = [a for a in argv]
    stamp = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    import torch
    device_desc = torch.cuda.get_device_name(0) if args.device.startswith('cuda') else 'CPU'
    header = [f'Training-step profile, {stamp}, commit {git_commit()}, on {device_desc}, torch {torch.__version__}.',
              f'Batch {args.batch_size}, {args.img_size}², {args.amp}, AdamW; median of {args.iters} steps after '
              f'{args.warmup}; kernel split over {args.profile_steps} profiled steps; cold start in a fresh process'
              f"{' with the Triton cache as it was' if args.keep_cache else ' with an empty Triton cache'}.",
              'Command: `python tools/profile_step.py ' + ' '.join(shlex.quote(a) for a in argv) + '`']
    print('\n'.join(header), flush=True)
    rows = []
    for i, name in enumerate(names):
        print(f'[{i + 1}/{len(names)}] {name} ...', file=sys.stderr, flush=True)
        rec = run_child(name, args, child_argv)
        rows.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != 'top_kernels'}), flush=True)
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            tmp = os.path.join(args.out_dir, 'profile.json.tmp')
            with open(tmp, 'w') as f:
                json.dump({'header': header, 'rows': rows}, f, indent=1)
            os.replace(tmp, os.path.join(args.out_dir, 'profile.json'))
    text = markdown(rows, header)
    if args.out_dir:
        with open(os.path.join(args.out_dir, 'profile.md'), 'w') as f:
            f.write(text)
    print(text)
    return 1 if any('error' in r for r in rows) else 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
