#!/usr/bin/env python3
"""The least onnxruntime time that any standard-operator export of a model can take, beside ConvNeXt-T's file.

An ONNX graph of standard operators has no fused scan: whatever its form (chunked, per step, as a loop), each
scan state passes through at least the operators of its own recurrence step, each over a state-sized tensor:
the decay's exponent dt·A (Mul) and its Exp, the drive (dt·u)·B (Mul), the update decay·h + drive (Mul, Add),
and the readout C·h over the states (Mul and ReduceSum, or one batched MatMul). This tool

1. counts each model's scan states per image: Bt·L·D·N summed over the scan ops of one eager forward at
   ``--img-size``;
2. times one recurrence step in onnxruntime over ``--block-states`` states (batch-sized tensors, onnxruntime's
   best case), with either readout, for the least time per state;
3. times the rest of each model (``--rest``): its ``torch.onnx.export`` with every scan replaced by a product
   of its inputs' shape (no scan at all);
4. times ConvNeXt-T's own export (TorchScript exporter);

steps 2 to 4 round-robin in one process (no session's threads spin between calls), each at its fastest call.
It prints, per model, states × time per state (its scans' floor), the rest, their sum (the floor of the whole
file) and that sum as a multiple of ConvNeXt-T's file. Where that multiple passes 3×, no standard-operator export
of the model can run within 3× of ConvNeXt-T in onnxruntime on that machine.

    python tools/ort_scan_floor.py --models zoo-tiny --threads 2 --out-dir OUT
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Dict

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toolkit.cli import ToolArgumentParser, create_model, git_commit, resolve_models, run_tool, zoo_tiny_models

SCAN_OPS = {"selective_scan_fwd", "selective_scan_states_fwd", "selective_scan_2d_fwd"}


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', default='zoo-tiny', help="comma list of model names, or 'zoo-tiny'")
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--threads', type=int, default=2, help='onnxruntime intra-op threads (and torch threads)')
    p.add_argument('--block-states', type=int, default=1 << 20, help='states per timed operator block')
    p.add_argument('--rounds', type=int, default=30, help='timed rounds (after 5 warm-up rounds)')
    p.add_argument('--no-rest', dest='rest', action='store_false',
                   help='time the scans\' floor only, not the rest of each model (no export)')
    p.add_argument('--out-dir', default=None, help='write ort_scan_floor.md / .json here')
    p.add_argument('--commit', default=None)
    return p


class _ScanStates(TorchDispatchMode):
    """Counts Bt·L·D·N over the zoo's scan ops (vmamba::*_fwd) that run under it."""

    def __init__(self):
        super().__init__()
        self.states = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith('vmamba::') and name.split('::')[1].split('.')[0] in SCAN_OPS:
            op = name.split('::')[1].split('.')[0]
            if op == 'selective_scan_2d_fwd':  # delta (Bt, H, W, K, D), A (K, D, N), routes (K, Lr)
                delta, A, routes = args[1], args[2], kwargs.get('routes', args[7] if len(args) > 7 else None)
                Bt, _, _, K, D = delta.shape
                self.states += Bt * K * routes.shape[1] * D * A.shape[-1]
            else:  # u (Bt, D, L), A (D, N)
                u, A = args[0], args[2]
                self.states += u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1]
        return func(*args, **kwargs)


def scan_states(name: str, img_size: int) -> int:
    """Scan states of one image's eager forward (every scan op of the model, 1D, 2D and all-states)."""
    model = create_model(name).eval()
    counter = _ScanStates()
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.states


def step_graph(block_states: int, readout: str):
    """One recurrence step over ``block_states`` states of d_state 16 and 1024 channels per row, as onnxruntime
    would run it at its best, and its inputs. ``readout``: 'sum' (C·h by Mul, then ReduceSum over the states;
    states (N, rows, D)) or 'matmul' (one batched MatMul of C (rows, 1, N) and the states (rows, N, D))."""
    import onnx
    from onnx import TensorProto, helper
    N, D = 16, 1024
    R = max(1, block_states // (N * D))
    if readout == 'sum':
        shapes = {"dt": [1, R, D], "A": [N, 1, D], "h": [N, R, D], "dtu": [1, R, D], "B": [N, R, 1], "C": [N, R, 1]}
        read = [helper.make_node("Mul", ["h_next", "C"], ["Ch"]),
                helper.make_node("ReduceSum", ["Ch", "axes"], ["y"], keepdims=0)]
        y_shape, initializers = [R, D], [helper.make_tensor("axes", TensorProto.INT64, [1], [0])]
    else:
        shapes = {"dt": [R, 1, D], "A": [1, N, D], "h": [R, N, D], "dtu": [R, 1, D], "B": [R, N, 1], "C": [R, 1, N]}
        read, y_shape, initializers = [helper.make_node("MatMul", ["C", "h_next"], ["y"])], [R, 1, D], []
    nodes = [helper.make_node("Mul", ["dt", "A"], ["x"]), helper.make_node("Exp", ["x"], ["decay"]),
             helper.make_node("Mul", ["dtu", "B"], ["drive"]), helper.make_node("Mul", ["decay", "h"], ["kept"]),
             helper.make_node("Add", ["kept", "drive"], ["h_next"]), *read]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "scan_step", [helper.make_tensor_value_info(k, f, v) for k, v in shapes.items()],
        [helper.make_tensor_value_info("y", f, y_shape), helper.make_tensor_value_info("h_next", f, shapes["h"])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    feed["dt"], feed["A"] = np.abs(feed["dt"]), -np.abs(feed["A"])
    return model.SerializeToString(), feed, N * R * D


@contextlib.contextmanager
def scans_stubbed():
    """While it runs, an exported scan is one product of its inputs, shaped as its output: what is left of the
    model's file is everything but the scans."""
    from vmamba_kernels import reference
    saved = {name: getattr(reference, name) for name in
             ('selective_scan_ref', 'selective_scan_states_ref', 'selective_scan_2d_ref')}

    def scan_1d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
                out_dtype=None):
        out = u * delta
        return (out, u.new_zeros(u.shape[0], u.shape[1], A.shape[1])) if return_last_state else out

    def states(u, delta, A, B, delta_bias=None, delta_softplus=False):
        return (u * delta).unsqueeze(2) * A.unsqueeze(-1)  # (Bt, Dm, N, L)

    def scan_2d(x, delta, A, B, C, D, delta_bias, delta_softplus, routes, param_routes, merge, out_dtype=None):
        y = delta * (x if x.dim() == 5 else x.unsqueeze(3))  # (Bt, H, W, K, Dm)
        return y.sum(3) if merge == 'sum' else y

    reference.selective_scan_ref, reference.selective_scan_states_ref, reference.selective_scan_2d_ref = (
        scan_1d, states, scan_2d)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(reference, name, fn)


def rest_file(name: str, folder: str, img_size: int) -> str:
    """The model's ONNX file at batch 1 with its scans stubbed (``scans_stubbed``)."""
    import warnings
    path = os.path.join(folder, f'{name}_rest.onnx')
    model = create_model(name).eval()
    with scans_stubbed(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (torch.randn(1, 3, img_size, img_size),), path, dynamo=True,
                          input_names=['x'], verbose=False)
    return path


def convnext_file(folder: str, img_size: int) -> str:
    path = os.path.join(folder, 'convnext_tiny.onnx')
    model = create_model('convnext_tiny').eval()
    torch.onnx.export(model, (torch.randn(1, 3, img_size, img_size),), path, dynamo=False, input_names=['x'])
    return path


def fastest_times(sessions: Dict[str, tuple], rounds: int) -> Dict[str, float]:
    """The fastest of ``rounds`` calls of each (session, feed), one call of each per round after 5 warm-up rounds:
    the least time each can take on this machine (its load from other work only ever adds time)."""
    times = {name: [] for name in sessions}
    for r in range(rounds + 5):
        for name, (session, feed) in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            if r >= 5:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def machine() -> str:
    cores = os.cpu_count()
    return f'{cores}-core {platform.machine()} ({platform.processor() or "CPU"}), onnxruntime CPUExecutionProvider'


def main(argv=None):
    args = build_parser().parse_args(argv)
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    models = resolve_models(args.models, groups={'zoo-tiny': zoo_tiny_models})
    states = {}
    for name in models:
        states[name] = scan_states(name, args.img_size)
        print(f'{name}: {states[name] / 1e6:.1f} M scan states per image', flush=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    # threads that spin after a call would slow the other session's next call in the round
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = lambda f: ort.InferenceSession(f, options, providers=['CPUExecutionProvider'])
    image = {'x': np.random.default_rng(1).standard_normal((1, 3, args.img_size, args.img_size)).astype(np.float32)}
    sessions, blocks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions['convnext_tiny'] = (session(convnext_file(tmp, args.img_size)), image)
        for name in (models if args.rest else []):
            start = time.perf_counter()
            sessions[f'rest:{name}'] = (session(rest_file(name, tmp, args.img_size)), image)
            print(f'{name}: exported without its scans in {time.perf_counter() - start:.0f} s', flush=True)
    for readout in ('sum', 'matmul'):
        graph, feed, blocks[readout] = step_graph(args.block_states, readout)
        sessions[f'step:{readout}'] = (session(graph), feed)
    times = fastest_times(sessions, args.rounds)
    per_state = min(times[f'step:{r}'] / blocks[r] for r in blocks)
    convnext = times['convnext_tiny']
    rows = []
    for name, n in states.items():
        row = dict(model=name, scan_states_m=round(n / 1e6, 2), floor_ms=round(n * per_state * 1e3, 1),
                   floor_x_convnext=round(n * per_state / convnext, 2))
        if args.rest:
            rest = times[f'rest:{name}']
            row.update(rest_ms=round(rest * 1e3, 1), total_ms=round((rest + n * per_state) * 1e3, 1),
                       total_x_convnext=round((rest + n * per_state) / convnext, 2))
        rows.append(row)
    print(f'onnxruntime, {args.threads} threads: one step takes {per_state * 1e9:.3f} ns per state ('
          + ', '.join(f'{r} readout {times[f"step:{r}"] / blocks[r] * 1e9:.3f}' for r in blocks)
          + f'); ConvNeXt-T\'s file {convnext * 1e3:.1f} ms')
    keys = ['scan_states_m', 'floor_ms', 'floor_x_convnext'] + (['rest_ms', 'total_ms', 'total_x_convnext']
                                                                 if args.rest else [])
    titles = {'scan_states_m': 'scan states per image (M)', 'floor_ms': 'floor of its scans (ms)',
              'floor_x_convnext': 'scans × ConvNeXt-T', 'rest_ms': 'the rest of its file (ms)',
              'total_ms': 'floor of its file (ms)', 'total_x_convnext': 'file × ConvNeXt-T'}
    lines = ['| model | ' + ' | '.join(titles[k] for k in keys) + ' |', '|---' * (len(keys) + 1) + '|']
    lines += ['| ' + ' | '.join([r['model']] + [str(r[k]) for k in keys]) + ' |' for r in rows]
    print('\n'.join(lines))
    if args.out_dir:
        from vmamba_zoo.checkpoint import atomic_write
        record = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), machine=machine(),
                      commit=args.commit or git_commit(), threads=args.threads, img_size=args.img_size,
                      ns_per_state=round(per_state * 1e9, 4), convnext_tiny_ms=round(convnext * 1e3, 2),
                      ns_per_state_by_readout={r: round(times[f'step:{r}'] / blocks[r] * 1e9, 4) for r in blocks},
                      onnxruntime=ort.__version__, command=' '.join(sys.argv), rows=rows)
        atomic_write(os.path.join(args.out_dir, 'ort_scan_floor.json'),
                     lambda f: f.write(json.dumps(record, indent=1).encode()))
        table = '\n'.join(lines) + '\n'
        atomic_write(os.path.join(args.out_dir, 'ort_scan_floor.md'), lambda f: f.write(table.encode()))


if __name__ == '__main__':
    run_tool(main)
