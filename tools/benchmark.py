#!/usr/bin/env python3
"""Throughput, latency and peak memory of zoo models and timm baselines, in one run.

For each model, precision (fp32, bf16/fp16 autocast) and memory format (contiguous, channels_last):

- inference img/s at ``--batch-size`` (eval mode, ``torch.inference_mode``);
- training img/s at ``--batch-size`` (forward + backward + AdamW step on random labels), with the median time of
  a step and the host's part of it (until the step's Python returns, before the device finishes): a host time
  near the step time means the host bounds training;
- latency at batch 1 (median ms); with ``--interleave``, every model's latency is timed round-robin (one call of
  each model per round), so that the machine's load, wherever it changes, weighs on every row alike, and
  ``--ratio-to MODEL`` gives each row's latency as a multiple of MODEL's in the same run;
- with ``--modes ...,ort``, the batch-1 latency of onnxruntime (CPU, as many intra-op threads as torch uses) on
  ``--onnx-dir``/MODEL.onnx, a file tools/export.py wrote, beside PyTorch's in the same run (under ``--interleave``,
  round-robin over the models after the eager rounds, and as a multiple of MODEL's own file with ``--ratio-to``);
- peak memory of inference and of training (CUDA only);
- cold start: seconds from building the model to the end of its first training step (``first_step_s``), which
  holds Triton's compilation and any tile tuning. ``--empty-triton-cache`` gives each run an empty Triton
  cache, as a new user's first run has; otherwise kernels compiled by earlier runs are reused.

On CUDA, inference, training and latency are timed as replays of CUDA graphs (tools/toolkit/cuda_graphs.py: the whole
step captured once, the optimizer built with ``capturable=True``), the faster path for host-bound models;
``--no-cuda-graphs`` times eager steps instead. The cold start stays an eager step. A measurement whose capture
fails (or an fp16 training step, whose GradScaler reads the host) runs eager and the row's ``status`` says why;
the row's ``cuda_graphs`` is true only when every measurement in it replayed a graph. On CPU nothing is captured.

    python tools/benchmark.py                                  # zoo T variants + convnext/swin/resnet50/mambaout
    python tools/benchmark.py --models zoo-tiny,baselines --batch-size 128 --amp fp32,bf16 --out-dir DIR
    python tools/benchmark.py --models test_resnet --batch-size 2 --img-size 32 --iters 2 --device cpu   # smoke
    python tools/benchmark.py --models zoo-tiny,convnext_tiny --device cpu --modes latency --amp fp32 \
        --interleave --ratio-to convnext_tiny --iters 15 --warmup 5     # CPU latency beside ConvNeXt-T
    python tools/benchmark.py --models zoo-tiny,convnext_tiny --device cpu --modes latency,ort --onnx-dir DIR \
        --amp fp32 --interleave --ratio-to convnext_tiny     # eager and onnxruntime, round-robin

Model lists: ``zoo`` (every zoo model), ``zoo-tiny`` (the T/L1 variants of each family), ``baselines``
(convnext_tiny, swin_tiny_patch4_window7_224, resnet50, mambaout_tiny), a family name, or model names.
``--out-dir`` receives benchmark.csv, benchmark.md (with date, commit, device and command) and benchmark.json.
"""
import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from toolkit.cli import (
    ToolArgumentParser, UsageError, create_model, git_commit, parse_csv_list, run_tool, zoo_tiny_models,
)
from toolkit.cli import resolve_models as cli_resolve_models
from toolkit.cuda_graphs import cross_entropy_loss, graphed_inference, graphed_train_step

BASELINES = ['convnext_tiny', 'swin_tiny_patch4_window7_224', 'resnet50', 'mambaout_tiny']
AMP = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', default='zoo-tiny,baselines', help='comma list (see above)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', '-b', type=int, default=128, help='batch for the throughput measurements')
    p.add_argument('--amp', default='fp32,bf16', help="comma list of 'fp32', 'bf16', 'fp16'")
    p.add_argument('--channels-last', action='store_true', help='run channels_last instead of contiguous')
    p.add_argument('--memory-formats', default=None,
                   help="comma list of 'contiguous', 'channels_last' (overrides --channels-last)")
    p.add_argument('--modes', default='infer,train,latency',
                   help="comma list of 'infer', 'train', 'latency', 'ort' (needs --onnx-dir)")
    p.add_argument('--onnx-dir', default=None, help="folder of MODEL.onnx files (tools/export.py) for the 'ort' mode")
    p.add_argument('--warmup', type=int, default=10, help='untimed iterations per measurement')
    p.add_argument('--iters', type=int, default=30, help='timed iterations per measurement')
    p.add_argument('--interleave', action='store_true',
                   help="with --modes latency and/or ort: time the models round-robin, one call of each per round "
                        "(--warmup rounds, then --iters timed rounds)")
    p.add_argument('--ratio-to', default=None, metavar='MODEL',
                   help="give each row's latency as a multiple of MODEL's (one of --models; same precision and "
                        "memory format)")
    p.add_argument('--compile', action='store_true', help='torch.compile each model')
    p.add_argument('--no-cuda-graphs', dest='cuda_graphs', action='store_false',
                   help='on CUDA, time eager steps instead of CUDA graph replays (graphs: %(default)s)')
    p.add_argument('--empty-triton-cache', action='store_true',
                   help='compile into a new, empty Triton cache (cold start as on a fresh machine)')
    p.add_argument('--device', default='auto')
    p.add_argument('--out-dir', default=None, help='write benchmark.csv / .md / .json here')
    p.add_argument('--commit', default=None, help='commit to record (default: git rev-parse of the working tree)')
    return p


def resolve_models(spec):
    return cli_resolve_models(spec, groups={'zoo-tiny': zoo_tiny_models, 'baselines': lambda: list(BASELINES)},
                              nothing=f'no models selected by --models {spec!r}')


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def run(self, fn, warmup, iters):
        """Seconds per call: median over ``iters`` individually timed calls after ``warmup`` calls."""
        return self.run_with_host(fn, warmup, iters)[0]

    def run_with_host(self, fn, warmup, iters):
        """(seconds per call, seconds until the call returns): medians over ``iters`` calls. The second is the
        host's time to issue the work; where it nears the first, the host, not the device, sets the speed."""
        for _ in range(warmup):
            fn()
        self.sync()
        times, host = [], []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            host.append(time.perf_counter() - start)
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), statistics.median(host)


def _autocast(device, amp):
    dtype = AMP[amp]
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def _peak_reset(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device):
    if device.type == 'cuda':
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return None


def graphs_wanted(args, device):
    """Whether this run times CUDA graph replays: on CUDA unless --no-cuda-graphs."""
    return bool(args.cuda_graphs) and device.type == 'cuda'


def train_optimizer(model, capturable):
    """The timed training step's optimizer; ``capturable`` keeps its step count on the device, as capture needs."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=capturable)


def _reason(e):
    msg = str(e).splitlines()[0][:100] if str(e) else ''
    return f'{type(e).__name__}: {msg}'


def try_capture(mode, capture, notes):
    """``capture()`` (a replay callable), or None after noting in ``notes`` why ``mode`` runs eager instead."""
    try:
        return capture()
    except Exception as e:  # noqa: BLE001  (any capture failure: time the eager step, and say so)
        notes.append(f'{mode}: eager, CUDA graph capture failed ({_reason(e)})')
        return None


def bench_model(name, args, device, amp, memory_format):
    """One table row. Each mode is measured on its own; a mode that fails or runs out of memory says so in
    ``status`` and the others still run. Training runs first: models that cache tensors (e.g. scan routes) then
    never meet a cache filled under ``torch.inference_mode``."""
    timer = Timer(device)
    row = {'model': name, 'precision': amp, 'memory_format': memory_format, 'img_size': args.img_size,
           'batch_size': args.batch_size}
    build_start = time.perf_counter()
    model, fmt = _built_model(name, args, device, memory_format, row)
    run_model = torch.compile(model) if args.compile else model
    modes = parse_csv_list(args.modes)
    n_classes = model.num_classes if getattr(model, 'num_classes', 0) else 1000
    graphs = graphs_wanted(args, device)
    problems, notes, graphed = [], [], []  # failures; eager fallbacks; modes timed as graph replays

    def batch(n):
        return torch.randn(n, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)

    def measure_train():
        model.train()
        x = batch(args.batch_size)
        y = torch.randint(0, n_classes, (args.batch_size,), device=device)
        capture = graphs and amp != 'fp16'
        if graphs and not capture:
            notes.append("train: eager, fp16's GradScaler step reads the host and cannot be captured")
        optimizer = train_optimizer(model, capturable=capture)
        scaler = torch.amp.GradScaler(device.type) if amp == 'fp16' else None
        _peak_reset(device)

        def train_step():
            with _autocast(device, amp):
                loss = cross_entropy_loss(run_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        train_step()  # the first step: compilation and tuning, counted as cold start
        timer.sync()
        row['first_step_s'] = round(time.perf_counter() - build_start, 2)
        step = None
        if capture:
            step = try_capture('train', lambda: graphed_train_step(run_model, optimizer, x, y, amp), notes)
            if step is None:  # time the same eager step as --no-cuda-graphs does
                optimizer.zero_grad(set_to_none=True)
                optimizer = train_optimizer(model, capturable=False)
            else:
                graphed.append('train')
        sec, host_sec = timer.run_with_host(step or train_step, max(args.warmup // 2, 1), args.iters)
        row['train_img_s'] = round(args.batch_size / sec, 1)
        row['train_step_ms'] = round(1000 * sec, 2)
        row['train_host_ms'] = round(1000 * host_sec, 2)
        row['train_peak_mib'] = _peak_mib(device)
        optimizer.zero_grad(set_to_none=True)

    def infer_fn(mode, x):
        """The timed inference call: a graph replay, or the eager step if not capturing or capture failed."""
        replay = try_capture(mode, lambda: graphed_inference(run_model, x, amp), notes) if graphs else None
        if replay is not None:
            graphed.append(mode)
        return replay or _eager_inference(run_model, x, device, amp)

    def measure_infer():
        model.eval()
        x = batch(args.batch_size)
        _peak_reset(device)
        sec = timer.run(infer_fn('infer', x), args.warmup, args.iters)
        row['infer_img_s'] = round(args.batch_size / sec, 1)
        row['infer_peak_mib'] = _peak_mib(device)

    def measure_latency():
        model.eval()
        x1 = batch(1)
        row['latency_ms'] = round(1000 * timer.run(infer_fn('latency', x1), args.warmup, max(args.iters, 3)), 3)

    def measure_ort():
        x1 = batch(1)
        row['ort_latency_ms'] = round(1000 * timer.run(onnxruntime_fn(name, args.onnx_dir, x1), args.warmup,
                                                       max(args.iters, 3)), 3)

    measured = []
    for mode, fn in (('train', measure_train), ('infer', measure_infer), ('latency', measure_latency),
                     ('ort', measure_ort)):
        if mode not in modes:
            continue
        try:
            fn()
            measured.append(mode)
        except torch.OutOfMemoryError:
            problems.append(f'{mode}: OOM')
        except Exception as e:  # noqa: BLE001  (one failing mode must not stop the table)
            problems.append(f'{mode}: error {_reason(e)}')
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    row['cuda_graphs'] = graphs and bool(measured) and all(m in graphed for m in measured)
    row['status'] = '; '.join(problems + notes) if problems or notes else 'ok'
    return row


def _measured_row(name, args, device, amp, memory_format):
    """``bench_model``'s row, or one that says why the model could not be measured."""
    try:
        row = bench_model(name, args, device, amp, memory_format)
    except torch.OutOfMemoryError:
        row = {'model': name, 'precision': amp, 'memory_format': memory_format, 'status': 'OOM'}
    except Exception as e:  # noqa: BLE001  (e.g. the model cannot be built at this size)
        msg = str(e).splitlines()[0][:120] if str(e) else ''
        row = {'model': name, 'precision': amp, 'memory_format': memory_format,
               'status': f'error {type(e).__name__}: {msg}'}
    row.setdefault('cuda_graphs', False)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    print(' '.join(f'{k}={v}' for k, v in row.items()), file=sys.stderr, flush=True)
    return row


def interleaved_latency_rows(configs, args, device, modes):
    """Rows of the batch-1 latency of each (model, precision, memory format) in ``configs``, timed round-robin:
    every model is built first, then each round times one eager call of each, after --warmup rounds; then every
    onnxruntime session is made ('ort' mode) and its calls take rounds of their own. Nothing of onnxruntime exists
    while the eager calls run: an onnxruntime call just before an eager one had doubled EfficientVMamba-T's eager
    time (its idle threads spin for a while after a run)."""
    timer, rows, inputs = Timer(device), [], []
    for name, amp, memory_format in configs:
        row = {'model': name, 'precision': amp, 'memory_format': memory_format, 'img_size': args.img_size,
               'batch_size': 1, 'cuda_graphs': False}
        try:
            model, fmt = _built_model(name, args, device, memory_format, row)
            x = torch.randn(1, 3, args.img_size, args.img_size, device=device).contiguous(memory_format=fmt)
            call = None
            if 'latency' in modes:
                call = _eager_inference(torch.compile(model.eval()) if args.compile else model.eval(), x, device, amp)
                call()  # a model that cannot run fails here, before the rounds
            row['status'] = 'ok'
            inputs.append((row, x, call))
        except Exception as e:  # noqa: BLE001  (one failing model must not stop the table)
            row['status'] = f'error {_reason(e)}'
        rows.append(row)
    _time_rounds([(row, call) for row, _, call in inputs if call is not None], 'latency_ms', timer, args)
    sessions = []
    if 'ort' in modes:
        for row, x, _ in inputs:
            try:
                call = onnxruntime_fn(row['model'], args.onnx_dir, x)
                call()
                sessions.append((row, call))
            except Exception as e:  # noqa: BLE001
                row['status'] = f'ort: error {_reason(e)}'
    _time_rounds(sessions, 'ort_latency_ms', timer, args)
    return rows


def _time_rounds(calls, key, timer, args):
    """row[key]: the median time of each (row, call) in ``calls``, one call of each per round, after --warmup
    rounds."""
    times = [[] for _ in calls]
    for r in range(args.warmup + args.iters):
        for (_, call), spent in zip(calls, times):
            start = time.perf_counter()
            call()
            timer.sync()
            if r >= args.warmup:
                spent.append(time.perf_counter() - start)
    for (row, _), spent in zip(calls, times):
        row[key] = round(1000 * statistics.median(spent), 3)


def _built_model(name, args, device, memory_format, row):
    """(model on ``device`` in ``memory_format``, that format); the row gets the model's parameter count."""
    model = create_model(name, img_size=args.img_size)
    row['params_m'] = round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    fmt = torch.channels_last if memory_format == 'channels_last' else torch.contiguous_format
    return model.to(device).to(memory_format=fmt), fmt


def _eager_inference(model, x, device, amp):
    """One eager inference call of ``model`` on x, as the timers run it."""
    def infer():
        with torch.inference_mode(), _autocast(device, amp):
            model(x)
    return infer


def add_latency_ratios(rows, reference):
    """Each row's latency_ratio (and ort_latency_ratio): its latency over ``reference``'s at the same precision and
    memory format, eager to eager and onnxruntime to onnxruntime."""
    for key, ratio in (('latency_ms', 'latency_ratio'), ('ort_latency_ms', 'ort_latency_ratio')):
        base = {(r['precision'], r['memory_format']): r[key] for r in rows if r['model'] == reference and r.get(key)}
        for r in rows:
            ref = base.get((r['precision'], r['memory_format']))
            if ref and r.get(key):
                r[ratio] = round(r[key] / ref, 2)


def onnxruntime_fn(name, folder, x):
    """A call of an onnxruntime CPU session of ``folder/name.onnx`` on x, with torch's thread count."""
    import onnxruntime as ort
    path = os.path.join(folder, f'{name}.onnx')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no {name}.onnx in --onnx-dir (tools/export.py writes it)')
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x.cpu().numpy()}
    return lambda: session.run(None, feed)


def failed(status):
    """Whether a row's status reports an error (an eager fallback is a note, not a failure)."""
    return any(part.split(': ', 1)[-1].startswith('error ') or part.startswith('error ')
               for part in status.split('; '))


COLUMNS = [
    ('model', 'model'), ('params_m', 'params (M)'), ('precision', 'precision'), ('memory_format', 'memory format'),
    ('infer_img_s', 'infer img/s'), ('train_img_s', 'train img/s'), ('train_step_ms', 'train step (ms)'),
    ('train_host_ms', 'train step host (ms)'), ('first_step_s', 'first step (s)'), ('latency_ms', 'latency bs1 (ms)'),
    ('latency_ratio', 'latency ratio'),
    ('ort_latency_ms', 'onnxruntime bs1 (ms)'), ('ort_latency_ratio', 'onnxruntime ratio'),
    ('infer_peak_mib', 'infer peak MiB'), ('train_peak_mib', 'train peak MiB'), ('cuda_graphs', 'CUDA graphs'),
    ('status', 'status'),
]


def _cell(v):
    return '' if v is None else str(v)


def markdown(rows, header_lines):
    out = list(header_lines) + ['']
    out.append('| ' + ' | '.join(title for _, title in COLUMNS) + ' |')
    out.append('|' + '---|' * len(COLUMNS))
    for r in rows:
        out.append('| ' + ' | '.join(_cell(r.get(k)) for k, _ in COLUMNS) + ' |')
    return '\n'.join(out) + '\n'


def console(rows):
    widths = [max(len(title), *(len(_cell(r.get(k))) for r in rows)) for k, title in COLUMNS]
    lines = ['  '.join(title.ljust(w) for (_, title), w in zip(COLUMNS, widths))]
    lines.append('  '.join('-' * w for w in widths))
    for r in rows:
        lines.append('  '.join(_cell(r.get(k)).ljust(w) for (k, _), w in zip(COLUMNS, widths)))
    return '\n'.join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    precisions = parse_csv_list(args.amp)
    bad = [p for p in precisions if p not in AMP]
    if not precisions or bad:
        raise UsageError(f"--amp must list fp32/bf16/fp16, got {args.amp!r}")
    formats = parse_csv_list(args.memory_formats) if args.memory_formats else \
        ['channels_last' if args.channels_last else 'contiguous']
    if any(f not in ('contiguous', 'channels_last') for f in formats):
        raise UsageError(f"--memory-formats must list contiguous/channels_last, got {args.memory_formats!r}")
    modes = parse_csv_list(args.modes)
    if not modes or any(m not in ('infer', 'train', 'latency', 'ort') for m in modes):
        raise UsageError(f"--modes must list infer/train/latency/ort, got {args.modes!r}")
    if 'ort' in modes and not (args.onnx_dir and os.path.isdir(args.onnx_dir)):
        raise UsageError(f"--modes ort needs --onnx-dir, a folder of MODEL.onnx files, got {args.onnx_dir!r}")
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        raise UsageError('--batch-size and --iters must be >= 1, --warmup >= 0')
    if args.interleave and not set(modes) <= {'latency', 'ort'}:
        raise UsageError(f"--interleave times latency only: use --modes latency and/or ort, got {args.modes!r}")
    device_name = args.device
    if device_name == 'auto':
        device_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_name.startswith('cuda') and not torch.cuda.is_available():
        raise UsageError('--device cuda requested but CUDA is not available')
    device = torch.device(device_name)
    if args.empty_triton_cache:
        import tempfile
        os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp(prefix='triton-cache-')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    names = resolve_models(args.models)
    if args.ratio_to is not None and args.ratio_to not in names:
        raise UsageError(f"--ratio-to {args.ratio_to!r} must be one of the models measured: {', '.join(names)}")
    graphs = graphs_wanted(args, device) and not args.interleave
    commit = args.commit or git_commit()

    device_desc = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)'
    stamp = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    command = 'python tools/benchmark.py ' + ' '.join(shlex.quote(a) for a in argv)
    header = [
        f'Benchmark of {len(names)} models, {stamp}, commit {commit}, on {device_desc}.',
        f'torch {torch.__version__}, timm {__import__("timm").__version__}; input {args.img_size}x{args.img_size}, '
        f'throughput batch {args.batch_size}, latency batch 1; ' + (
            f'latency timed round-robin over the models, one call of each per round: median of {args.iters} '
            f'rounds after {args.warmup} warm-up rounds' if args.interleave else
            f'median of {args.iters} timed iterations after {args.warmup} warm-up') +
        '; training = forward + backward + AdamW step; TF32 off.' + (
            f' Latency ratio: to {args.ratio_to} in the same run.' if args.ratio_to else ''),
        'CUDA graphs: ' + (
            'on: steps timed as graph replays where a row says cuda_graphs True, eager elsewhere (status says why); '
            'the first step is eager.' if graphs else
            f"off ({'--interleave' if args.interleave else '--no-cuda-graphs'}): eager steps." if device.type == 'cuda'
            else 'off (CPU): eager steps.'),
        f'Command: `{command}`',
    ]
    print('\n'.join(header), flush=True)

    configs = [(name, amp, memory_format) for name in names for amp in precisions for memory_format in formats]
    rows = interleaved_latency_rows(configs, args, device, modes) if args.interleave else [
        _measured_row(name, args, device, amp, memory_format) for name, amp, memory_format in configs]
    if args.interleave:
        for row in rows:
            print(' '.join(f'{k}={v}' for k, v in row.items()), file=sys.stderr, flush=True)
    if args.ratio_to is not None:
        add_latency_ratios(rows, args.ratio_to)
    failures = sum(failed(r['status']) for r in rows)
    print(console(rows))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        keys = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        with open(os.path.join(args.out_dir, 'benchmark.csv'), 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(args.out_dir, 'benchmark.md'), 'w') as f:
            f.write(markdown(rows, header))
        with open(os.path.join(args.out_dir, 'benchmark.json'), 'w') as f:
            json.dump({'header': header, 'device': device_desc, 'date': stamp, 'commit': commit,
                       'command': command, 'cuda_graphs': graphs, 'rows': rows}, f, indent=2)
        print(f'wrote {args.out_dir}/benchmark.csv, benchmark.md, benchmark.json')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
