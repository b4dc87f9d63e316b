#!/usr/bin/env python3
"""Export a zoo model to ONNX (or a torch.export program) with dynamic batch, height and width.

The scan ops have no ONNX translation; while exporting they run the reference scan's math in standard
operators (a chunked scan, routes built from the input size), so one file serves every input size and
holds only standard ONNX operators (no custom domain).

    python tools/export.py vmamba_tiny_s1l8 --format onnx --out vmamba_tiny.onnx --checkpoint ckpt.pth --check
    python tools/export.py plainmamba_l1 --format onnx --out l1.onnx --check --check-sizes 224 160x192 289
    python tools/export.py groupmamba_tiny --format torch-export --out groupmamba_tiny.pt2

``--check`` runs the exported file (onnxruntime for ONNX, the program for torch.export) at each
``--check-sizes`` and compares it with PyTorch eager (relative error, at most ``--rtol``), then prints the
batch-``--batch-size`` latency of both at the first size.
"""
import argparse
import contextlib
import os
import sys
import time
import warnings

import torch

from toolkit.cli import ToolArgumentParser, UsageError, create_model, parse_key_values, run_tool

FORMATS = ('onnx', 'torch-export')


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('model', help='model name (timm registry, after importing vmamba_zoo)')
    p.add_argument('--format', default='onnx', choices=FORMATS)
    p.add_argument('--out', required=True, help='output file (.onnx, or .pt2 for torch-export)')
    p.add_argument('--checkpoint', default=None, help='local weights: zoo (training or plain) or official format')
    p.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=False,
                   help='export the EMA weights of the checkpoint')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE')
    p.add_argument('--img-size', type=int, default=None, help="the model's default input size")
    p.add_argument('--opset', type=int, default=18, help='ONNX opset (17 or newer)')
    p.add_argument('--check', action=argparse.BooleanOptionalAction, default=False,
                   help='compare the exported file with eager PyTorch and time both')
    p.add_argument('--check-sizes', nargs='*', default=['224', '160x192', '289'], metavar='HxW',
                   help='input sizes for --check (N or HxW)')
    p.add_argument('--rtol', type=float, default=1e-3, help='largest relative error --check accepts')
    p.add_argument('--batch-size', '-b', type=int, default=1, help='batch of the latency measurement')
    p.add_argument('--repeats', type=int, default=10, help='timed runs of the latency measurement (median)')
    p.add_argument('--threads', type=int, default=None, help='CPU threads for both runtimes (default: torch\'s)')
    return p


def parse_size(text: str):
    try:
        parts = [int(v) for v in text.lower().split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise UsageError(f'--check-sizes takes N or HxW with positive ints, got {text!r}')
    return tuple(parts)


def _example_input(model, img_size=None):
    """Batch 2 (exporters specialize sizes of 1) at ``img_size`` or the model's default size."""
    size = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
    if img_size:
        size = (size[0], img_size, img_size)
    return torch.randn(2, *size)


def _dynamic_shapes(fmt):
    if fmt == 'onnx':
        return ({0: 'batch', 2: 'height', 3: 'width'},)
    dim = torch.export.Dim.DYNAMIC
    return ({0: dim, 2: dim, 3: dim},)


@contextlib.contextmanager
def linear_time_onnx_rewrites():
    """While it runs, onnxscript's optimizer leaves out its rewrite patterns of several output nodes (SlicesSplit).

    onnxscript (0.7) matches such a pattern by walking the whole graph at every node, so the optimization is
    quadratic in the graph's size: it took most of a T model's export here (VMamba-T: over 15 minutes). The zoo's
    graphs give those patterns nothing to rewrite (tests/tools/test_export_tool.py compares the results). Without
    that private rule list (another onnxscript), nothing changes."""
    try:
        from onnxscript import rewriter
        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(
        rule for rule in rules if getattr(getattr(rule, '_target_pattern', None), 'has_single_output_node', True))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def export_onnx(model, out: str, opset: int, img_size=None):
    """torch.onnx.export (dynamo) with dynamic batch, height and width, optimized by onnxscript as that export
    would be (``linear_time_onnx_rewrites``), written atomically. Prints each phase's time: a T model takes
    minutes."""
    from vmamba_zoo.checkpoint import atomic_write
    x = _example_input(model, img_size)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_dynamic_shapes('onnx'),
                                    opset_version=opset, input_names=['image'], output_names=['output'],
                                    optimize=False, verbose=False)
    print(f'  traced and translated to ONNX in {time.perf_counter() - start:.0f} s', flush=True)
    start = time.perf_counter()
    with linear_time_onnx_rewrites():
        program.optimize()
    print(f'  optimized in {time.perf_counter() - start:.0f} s', flush=True)
    atomic_write(out, lambda f: f.write(program.model_proto.SerializeToString()))


def export_program(model, out: str, img_size=None):
    from vmamba_zoo.checkpoint import atomic_write
    x = _example_input(model, img_size)
    program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes('torch-export'))
    atomic_write(out, lambda f: torch.export.save(program, f))


def onnx_operator_domains(path: str):
    """Domains of every node once local functions are inlined ('' is the standard ONNX domain)."""
    import onnx
    import onnx.inliner
    model = onnx.inliner.inline_local_functions(onnx.load(path))
    return sorted({node.domain or '' for node in model.graph.node})


def _runner(fmt: str, path: str, threads):
    if fmt == 'onnx':
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    module = torch.export.load(path).module()
    return lambda x: module(x)


def _median_ms(fn, x, repeats):
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def check(model, fmt: str, path: str, sizes, rtol: float, batch_size: int, repeats: int, threads):
    """Relative error of the exported file against eager at each size; latencies at the first size."""
    run = _runner(fmt, path, threads)
    runtime = 'onnxruntime' if fmt == 'onnx' else 'torch.export'
    worst = 0.0
    for i, (H, W) in enumerate(sizes):
        x = torch.randn(1 + i % 2, 3, H, W)
        with torch.inference_mode():
            want = model(x)
        got = run(x)
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
        worst = max(worst, err)
        print(f'  {H}x{W} batch {x.shape[0]}: rel. err {err:.2e} {"ok" if err <= rtol else "FAILED"}', flush=True)
    H, W = sizes[0]
    x = torch.randn(batch_size, 3, H, W)
    with torch.inference_mode():
        eager_ms = _median_ms(model, x, repeats)
    exported_ms = _median_ms(run, x, repeats)
    print(f'  latency at {H}x{W}, batch {batch_size}, {torch.get_num_threads()} threads: '
          f'PyTorch eager {eager_ms:.1f} ms, {runtime} {exported_ms:.1f} ms', flush=True)
    return worst


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.opset < 17:
        raise UsageError(f'--opset must be 17 or newer (LayerNormalization), got {args.opset}')
    sizes = [parse_size(s) for s in args.check_sizes]
    if args.check and not sizes:
        raise UsageError('--check needs at least one --check-sizes entry')
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = parse_key_values(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    model = create_model(args.model, img_size=args.img_size, **kwargs)
    if args.checkpoint:
        from toolkit.checkpoint_io import load_into_model
        if not os.path.isfile(args.checkpoint):
            raise UsageError(f'checkpoint not found: {args.checkpoint}')
        how = load_into_model(model, args.checkpoint, use_ema=args.use_ema)
        print(f'{args.model}: weights from {args.checkpoint} ({how})', flush=True)
    model = model.eval()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f'output folder does not exist: {out_dir}')

    print(f'{args.model}: exporting to {args.format} (minutes for a T model)...', flush=True)
    start = time.perf_counter()
    if args.format == 'onnx':
        export_onnx(model, args.out, args.opset, args.img_size)
        domains = onnx_operator_domains(args.out)
        if domains != ['']:
            print(f'{args.out}: operators outside the standard ONNX domain: {domains}', file=sys.stderr)
            return 1
    else:
        export_program(model, args.out, args.img_size)
    print(f'{args.model}: exported {args.format} to {args.out} in {time.perf_counter() - start:.0f} s '
          f'(dynamic batch, height, width)', flush=True)
    if args.check:
        worst = check(model, args.format, args.out, sizes, args.rtol, args.batch_size, args.repeats, args.threads)
        if worst > args.rtol:
            print(f'{args.model}: the exported file differs from eager (rel. err {worst:.2e} > {args.rtol})',
                  file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
