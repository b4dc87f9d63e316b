#!/usr/bin/env python3
"""Parameters and FLOPs of the zoo's models next to the papers' numbers.

Two counts per model, both on one image at ``--img-size``:

- **fvcore, the papers' convention**: ``FlopCountAnalysis(model, x).set_op_handle(**vmamba_kernels.fvcore_handles())``.
  One multiply-add counts 1; a selective scan counts 9·B·L·D·N (+ B·D·L for the D skip); fvcore also counts
  norms, pooling and upsampling its own way.
- **torch.utils.flop_counter** (``FlopCounterMode``): a multiply-add counts 2 for matmuls and convolutions; the scan ops
  are registered there with the same 9·B·L·D·N count; elementwise ops and norms are not counted. Reported as is.

Paper numbers come from ``tests/data/paper/<family>.json``; with ``"params_exclude_head": true`` the parameter
comparison leaves the classifier out, as the paper does.

    python tools/flops.py                          # every registered zoo model at 224x224
    python tools/flops.py --models groupmamba_tiny,resnet50 --img-size 256
    python tools/flops.py --update-cards           # rewrite the tables between the card markers

``--update-cards`` rewrites, in every ``model_cards/<family>.md``, the text between ``<!-- flops-table:start -->`` and
``<!-- flops-table:end -->`` with the table of that family's models (the card's file name is the family module's name).
"""
import argparse
import csv
import glob
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional

import torch

from toolkit.cli import ToolArgumentParser, UsageError, create_model, git_commit, parse_csv_list, run_tool, zoo_families
from toolkit.cli import resolve_models as cli_resolve_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK_START = '<!-- flops-table:start -->'
MARK_END = '<!-- flops-table:end -->'


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', default='zoo',
                   help="comma list of model names; 'zoo' = every registered zoo model; a family name = its models")
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--counters', default='fvcore,torch', help="'fvcore', 'torch' or both")
    p.add_argument('--paper-dir', default=os.path.join(REPO, 'tests', 'data', 'paper'))
    p.add_argument('--csv', default=None, help='also write the table as CSV')
    p.add_argument('--json', default=None, help='also write the rows as JSON')
    p.add_argument('--update-cards', nargs='?', const=os.path.join(REPO, 'model_cards'), default=None,
                   metavar='DIR', help='rewrite the tables between the flops-table markers of DIR/<family>.md')
    return p


# ------------------------------------------------------------------------------------------------------- counting
def fvcore_count(model: torch.nn.Module, x: torch.Tensor):
    """(total, {operator: count}) in the papers' convention."""
    from fvcore.nn import FlopCountAnalysis
    handles = {}
    try:
        import vmamba_kernels
        handles = vmamba_kernels.fvcore_handles()
    except ImportError:
        pass
    analysis = FlopCountAnalysis(model, x).set_op_handle(**handles)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings('none')
    by_op = dict(analysis.by_operator())
    return int(analysis.total()), {k: int(v) for k, v in by_op.items()}


def torch_count(model: torch.nn.Module, x: torch.Tensor):
    """(total, {op name: count}) from torch.utils.flop_counter (multiply-add = 2; scan ops as registered)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts().get('Global', {})
    by_op = {}
    for op, n in counts.items():
        name = str(op)
        # 'aten.convolution' / 'aten.convolution.default' / 'vmamba.selective_scan_2d_fwd.default' -> short names
        parts = name.split('.')
        key = '.'.join(parts[:2]) if len(parts) >= 2 else name
        by_op[key] = by_op.get(key, 0) + int(n)
    return int(counter.get_total_flops()), by_op


def split_counts(fvcore_ops: Dict[str, int], torch_ops: Dict[str, int]) -> Dict[str, int]:
    """Both counts by kind of op, for comparing them.

    - conv: fvcore ``conv`` vs flop_counter ``aten.convolution`` (2x);
    - linear: fvcore ``linear``/``addmm``/``mm`` vs ``aten.addmm``/``aten.mm`` (2x when no 3-D matmul runs);
    - batched: fvcore ``matmul``/``bmm``/``einsum`` vs ``aten.bmm``/``aten.baddbmm``. Not exactly 2x: fvcore prices
      an einsum with numpy's einsum_path, which also counts elementwise (contraction-free) einsums;
    - scan: the ``vmamba`` ops, the same count in both.
    """
    scan_names = {'selective_scan_fwd', 'selective_scan_states_fwd', 'selective_scan_2d_fwd'}
    out = {
        'fvcore_conv': fvcore_ops.get('conv', 0),
        'fvcore_linear': sum(fvcore_ops.get(k, 0) for k in ('linear', 'addmm', 'mm')),
        'fvcore_batched': sum(fvcore_ops.get(k, 0) for k in ('matmul', 'bmm', 'einsum', 'baddbmm')),
        'fvcore_scan': sum(v for k, v in fvcore_ops.items() if k.split('::')[-1] in scan_names),
        'torch_conv': torch_ops.get('aten.convolution', 0),
        'torch_linear': torch_ops.get('aten.addmm', 0) + torch_ops.get('aten.mm', 0),
        'torch_batched': torch_ops.get('aten.bmm', 0) + torch_ops.get('aten.baddbmm', 0),
        'torch_scan': sum(v for k, v in torch_ops.items() if k.startswith('vmamba.')),
    }
    return out


def load_paper_numbers(paper_dir: str) -> Dict[str, dict]:
    table = {}
    for path in sorted(glob.glob(os.path.join(paper_dir, '*.json'))):
        with open(path) as f:
            data = json.load(f)
        for name, row in data.items():
            if isinstance(row, dict):
                table[name] = dict(row, family_file=os.path.basename(path))
    return table


def count_model(name: str, img_size: int, counters: List[str], paper: Optional[dict]) -> dict:
    model = create_model(name, img_size=img_size).eval()
    n_params = sum(p.numel() for p in model.parameters())
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    head_params = sum(p.numel() for p in head.parameters()) if isinstance(head, torch.nn.Module) else 0
    row = {'model': name, 'img_size': img_size, 'params_m': n_params / 1e6,
           'params_no_head_m': (n_params - head_params) / 1e6}
    x = torch.randn(1, 3, img_size, img_size)
    start = time.time()
    fv_ops, t_ops = {}, {}
    with torch.no_grad():
        if 'fvcore' in counters:
            total, fv_ops = fvcore_count(model, x)
            row['gflops_fvcore'] = total / 1e9
        if 'torch' in counters:
            total, t_ops = torch_count(model, x)
            row['gflops_flop_counter'] = total / 1e9
    row.update({f'g{k}': v / 1e9 for k, v in split_counts(fv_ops, t_ops).items()})
    row['count_time_s'] = round(time.time() - start, 2)
    if paper:
        row['paper_params_m'] = paper.get('params_m')
        row['paper_gflops'] = paper.get('gflops')
        row['paper_top1'] = paper.get('top1')
        ours = row['params_no_head_m'] if paper.get('params_exclude_head') else row['params_m']
        row['params_compared'] = 'no head' if paper.get('params_exclude_head') else 'all'
        if paper.get('params_m'):
            row['params_delta_pct'] = 100.0 * (ours - paper['params_m']) / paper['params_m']
        if img_size != paper.get('img_size', 224):  # the papers count at their own input size
            row['paper_gflops'] = None
        elif paper.get('gflops') and 'gflops_fvcore' in row:
            row['gflops_delta_pct'] = 100.0 * (row['gflops_fvcore'] - paper['gflops']) / paper['gflops']
    return row


# ---------------------------------------------------------------------------------------------------------- output
def _f(value, fmt):
    return '' if value is None else format(value, fmt)


def markdown_table(rows: List[dict]) -> str:
    lines = ['| model | params (M) | paper params (M) | Δ params | GFLOPs (fvcore) | paper GFLOPs | Δ FLOPs '
             '| flop_counter GFLOPs (mul+add=2) | paper top-1 |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        params = r['params_no_head_m'] if r.get('params_compared') == 'no head' else r['params_m']
        note = ' (no head)' if r.get('params_compared') == 'no head' else ''
        lines.append(
            f"| {r['model']} | {params:.3f}{note} | {_f(r.get('paper_params_m'), 'g')} | "
            f"{_f(r.get('params_delta_pct'), '+.1f')}{'%' if r.get('params_delta_pct') is not None else ''} | "
            f"{_f(r.get('gflops_fvcore'), '.3f')} | {_f(r.get('paper_gflops'), 'g')} | "
            f"{_f(r.get('gflops_delta_pct'), '+.1f')}{'%' if r.get('gflops_delta_pct') is not None else ''} | "
            f"{_f(r.get('gflops_flop_counter'), '.3f')} | {_f(r.get('paper_top1'), 'g')} |")
    return '\n'.join(lines)


def console_table(rows: List[dict]) -> str:
    header = f"{'model':<28} {'params(M)':>10} {'paper':>7} {'Δ%':>6} {'GFLOPs':>8} {'paper':>7} {'Δ%':>6} " \
             f"{'flop_counter':>12}"
    lines = [header, '-' * len(header)]
    for r in rows:
        params = r['params_no_head_m'] if r.get('params_compared') == 'no head' else r['params_m']
        lines.append(
            f"{r['model']:<28} {params:>10.3f} {_f(r.get('paper_params_m'), 'g'):>7} "
            f"{_f(r.get('params_delta_pct'), '+.1f'):>6} {_f(r.get('gflops_fvcore'), '.3f'):>8} "
            f"{_f(r.get('paper_gflops'), 'g'):>7} {_f(r.get('gflops_delta_pct'), '+.1f'):>6} "
            f"{_f(r.get('gflops_flop_counter'), '.3f'):>12}")
    return '\n'.join(lines)


def replace_between_markers(text: str, table: str, source: str) -> Optional[str]:
    """``text`` with the part between the markers replaced, or None if it has no (well-formed) markers."""
    pattern = re.compile(re.escape(MARK_START) + r'.*?' + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        return None
    block = f'{MARK_START}\n{table}\n\n{source}\n{MARK_END}'
    return pattern.sub(lambda _: block, text, count=1)


def update_cards(card_dir: str, rows: List[dict], command: str, commit: str) -> List[str]:
    families = zoo_families()
    by_name = {r['model']: r for r in rows}
    updated = []
    for path in sorted(glob.glob(os.path.join(card_dir, '*.md'))):
        family = os.path.splitext(os.path.basename(path))[0]
        names = families.get(family)
        if not names:
            continue
        with open(path) as f:
            text = f.read()
        if MARK_START not in text:
            continue
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UsageError(f'{path}: counts missing for {", ".join(missing)} (run with --models zoo)')
        img = {by_name[n]['img_size'] for n in names}
        source = (f'Counted at {"/".join(str(i) for i in sorted(img))}² by `{command}` (commit {commit}): '
                  f'fvcore with `vmamba_kernels.fvcore_handles()`, one multiply-add = 1 FLOP, as the papers count.')
        new = replace_between_markers(text, markdown_table([by_name[n] for n in names]), source)
        if new is not None and new != text:
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.write(new)
            os.replace(tmp, path)
            updated.append(path)
    return updated


def resolve_models(spec: str) -> List[str]:
    return cli_resolve_models(spec, nothing='no models to count (is vmamba_zoo installed? try --models resnet50)')


def main(argv=None):
    args = build_parser().parse_args(argv)
    counters = parse_csv_list(args.counters)
    if not counters or any(c not in ('fvcore', 'torch') for c in counters):
        raise UsageError(f"--counters must list 'fvcore' and/or 'torch', got {args.counters!r}")
    if args.update_cards and 'fvcore' not in counters:
        raise UsageError('--update-cards needs the fvcore count')
    if args.update_cards and not os.path.isdir(args.update_cards):
        raise UsageError(f'model card folder not found: {args.update_cards}')
    names = resolve_models(args.models)
    paper = load_paper_numbers(args.paper_dir)
    commit = git_commit()  # the tree that is counted, before the first card written makes it dirty
    rows = []
    for name in names:
        row = count_model(name, args.img_size, counters, paper.get(name))
        rows.append(row)
        print(f"{name}: {row['params_m']:.3f}M params, "
              + ', '.join(f'{k} {row[k]:.3f}' for k in ('gflops_fvcore', 'gflops_flop_counter') if k in row)
              + f" ({row['count_time_s']}s)", file=sys.stderr, flush=True)
    print(console_table(rows))
    if args.csv:
        keys = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        with open(args.csv, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    if args.update_cards:
        command = 'python tools/flops.py --update-cards' + (
            f' --img-size {args.img_size}' if args.img_size != 224 else '')
        for path in update_cards(args.update_cards, rows, command, commit):
            print(f'updated {os.path.relpath(path)}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
