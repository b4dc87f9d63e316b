#!/usr/bin/env python3
"""The least onnxruntime time that any standard-operator scan of a model can take, beside ConvNeXt-T's whole file.

An ONNX graph of standard operators has no fused scan: whatever its form (chunked, per step, as a loop), each
scan state passes through at least the operators of its own recurrence step, each over a state-sized tensor:
the decay's exponent dt·A (Mul) and its Exp, the drive (dt·u)·B (Mul), the update decay·h + drive (Mul, Add),
and the readout C·h summed over the states (Mul, ReduceSum). This tool

1. counts each model's scan states per image: Bt·L·D·N summed over the scan ops of one eager forward at
   ``--img-size``;
2. times those seven operators in onnxruntime over one block of ``--block-states`` states (batch-sized
   tensors, onnxruntime's best case), for the time per state;
3. times ConvNeXt-T's own export (TorchScript exporter) in the same process, round-robin beside step 2 (no
   session's threads spin between calls), each at its fastest call;

and prints, per model, states × time per state: a lower bound of its scans alone in onnxruntime, and that
bound as a multiple of ConvNeXt-T's whole file. Where the bound passes 3×, no standard-operator export of the
model can run within 3× of ConvNeXt-T on that machine.

    python tools/ort_scan_floor.py --models zoo-tiny --threads 2 --out-dir OUT
"""
import argparse
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


def step_graph(block_states: int):
    """The seven state-sized operators of one recurrence step over (16, rows, 1024) states, and its inputs."""
    import onnx
    from onnx import TensorProto, helper
    N, D = 16, 1024
    R = max(1, block_states // (N * D))
    f = TensorProto.FLOAT
    shapes = {"dt": [1, R, D], "A": [N, 1, D], "h": [N, R, D], "dtu": [1, R, D], "B": [N, R, 1], "C": [N, R, 1]}
    nodes = [helper.make_node("Mul", ["dt", "A"], ["x"]), helper.make_node("Exp", ["x"], ["decay"]),
             helper.make_node("Mul", ["dtu", "B"], ["drive"]), helper.make_node("Mul", ["decay", "h"], ["kept"]),
             helper.make_node("Add", ["kept", "drive"], ["h_next"]), helper.make_node("Mul", ["h_next", "C"], ["Ch"]),
             helper.make_node("ReduceSum", ["Ch", "axes"], ["y"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "scan_step", [helper.make_tensor_value_info(k, f, v) for k, v in shapes.items()],
        [helper.make_tensor_value_info("y", f, [R, D]), helper.make_tensor_value_info("h_next", f, [N, R, D])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    rng = np.random.default_rng(0)
    feed = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    feed["dt"], feed["A"] = np.abs(feed["dt"]), -np.abs(feed["A"])
    return model.SerializeToString(), feed, N * R * D


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
    with tempfile.TemporaryDirectory() as tmp:
        convnext = ort.InferenceSession(convnext_file(tmp, args.img_size), options, providers=['CPUExecutionProvider'])
    graph, feed, block = step_graph(args.block_states)
    step = ort.InferenceSession(graph, options, providers=['CPUExecutionProvider'])
    image = {'x': np.random.default_rng(1).standard_normal((1, 3, args.img_size, args.img_size)).astype(np.float32)}
    times = fastest_times({'step': (step, feed), 'convnext_tiny': (convnext, image)}, args.rounds)
    per_state = times['step'] / block
    rows = [dict(model=name, scan_states_m=round(n / 1e6, 2), floor_ms=round(n * per_state * 1e3, 1),
                 floor_x_convnext=round(n * per_state / times['convnext_tiny'], 2)) for name, n in states.items()]
    print(f'onnxruntime, {args.threads} threads: the seven operators of one step take {per_state * 1e9:.3f} ns '
          f'per state; ConvNeXt-T\'s file {times["convnext_tiny"] * 1e3:.1f} ms')
    lines = ['| model | scan states per image (M) | onnxruntime floor of its scans (ms) | floor × ConvNeXt-T |',
             '|---|---|---|---|']
    lines += [f"| {r['model']} | {r['scan_states_m']} | {r['floor_ms']} | {r['floor_x_convnext']} |" for r in rows]
    print('\n'.join(lines))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        record = dict(date=datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'), machine=machine(),
                      commit=args.commit or git_commit(), threads=args.threads, img_size=args.img_size,
                      ns_per_state=round(per_state * 1e9, 4), convnext_tiny_ms=round(times['convnext_tiny'] * 1e3, 2),
                      onnxruntime=ort.__version__, command=' '.join(sys.argv), rows=rows)
        with open(os.path.join(args.out_dir, 'ort_scan_floor.json'), 'w') as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(args.out_dir, 'ort_scan_floor.md'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    run_tool(main)
