#!/usr/bin/env python3
"""Paper top-1 against measured throughput: the picture for choosing a backbone.

Reads committed benchmark records, in either of the two formats this repository writes, each given as a JSON file
or as an entry of ``model_cards/benchmarks/history.json`` (``PATH/history.json:NAME``, NAME the file name the record
was committed as; see tools/bench_records.py):

- the side-by-side harness (``{"meta": ..., "results": [{"model": "zoo_vmamba_t", "config": "vmamba_tiny_s1l8",
  "infer_bf16_img_s": ..., "train_bf16_img_s": ...}, ...]}``, official implementations included);
- ``tools/benchmark.py`` (``{"rows": [{"model": ..., "precision": "bf16", "infer_img_s": ...}]}``, or a
  ``{"runs": [{"rows": [...]}]}`` record of several runs).

and draws two panels, inference and training img/s (x) against ImageNet-1k top-1 from the papers (y), one
point per zoo model and baseline, with each family's official code where the record has it. Later records win
where two give the same model.

    python tools/plot_benchmarks.py model_cards/benchmarks/side_by_side_h100_abc1234.json \
        --out model_cards/throughput_accuracy.png
    python tools/plot_benchmarks.py model_cards/benchmarks/history.json:side_by_side_h100_ff64ae9.json \
        model_cards/benchmarks/side_by_side_h100_abc1234.json    # an earlier record, then the latest
    python tools/plot_benchmarks.py A.json --markdown        # also print the table behind the plot
    python tools/plot_benchmarks.py A.json --superseded plainmamba_l1,vim2_tiny   # hollow: code since replaced
"""
import argparse
import glob
import json
import os
import sys

from toolkit.bench_records import load_record, split_spec
from toolkit.cli import ToolArgumentParser, UsageError, run_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_DIR = os.path.join(REPO, 'tests', 'data', 'paper')
# ImageNet-1k top-1 of the baselines at 224², as their papers report them (ConvNeXt arXiv 2201.03545, Table 1;
# Swin arXiv 2103.14030, Table 1a).
BASELINE_TOP1 = {'convnext_tiny': 82.1, 'swin_tiny_patch4_window7_224': 81.3}
# The harness's names of the official implementations, and the zoo model each one is.
OFFICIAL = {'vmamba_t': 'vmamba_tiny_s1l8', 'groupmamba_t': 'groupmamba_tiny',
            'efficientvmamba_t': 'efficientvmamba_tiny', 'spatialmamba_t': 'spatialmamba_tiny'}
FAMILY_COLORS = {'vmamba': 'tab:blue', 'groupmamba': 'tab:green', 'efficientvmamba': 'tab:orange',
                 'spatialmamba': 'tab:red', 'plainmamba': 'tab:purple', 'vim2': 'tab:brown'}
# Short names on the plot; a model not listed is labelled by its registry name.
DISPLAY = {'vmamba_tiny_s1l8': 'VMamba-T', 'groupmamba_tiny': 'GroupMamba-T', 'efficientvmamba_tiny': 'EffVMamba-T',
           'spatialmamba_tiny': 'Spatial-Mamba-T', 'plainmamba_l1': 'PlainMamba-L1', 'vim2_tiny': 'ViM2-T',
           'convnext_tiny': 'ConvNeXt-T', 'swin_tiny_patch4_window7_224': 'Swin-T'}
# Families whose T models sit close together (83.3 and 83.5 top-1): labels above and below the point.
LABEL_OFFSET = {'spatialmamba': (6, 5), 'groupmamba': (6, -11)}


def paper_top1(paper_dir=PAPER_DIR):
    """Model name -> the paper's top-1, from the per-family JSON the tests check the models against."""
    top1 = dict(BASELINE_TOP1)
    for path in sorted(glob.glob(os.path.join(paper_dir, '*.json'))):
        with open(path) as f:
            for name, entry in json.load(f).items():
                if entry.get('top1') is not None:
                    top1[name] = float(entry['top1'])
    return top1


def read_points(path):
    """[(model, implementation, infer img/s or None, train img/s or None)] from one benchmark record: a file, or
    ``HISTORY.json:NAME``."""
    try:
        data = load_record(path)
    except KeyError as e:
        raise UsageError(e.args[0]) from e
    except (OSError, ValueError) as e:
        raise UsageError(f'cannot read benchmark JSON {path}: {e}') from e
    points = []
    if isinstance(data, dict) and 'results' in data:  # side-by-side harness
        for rec in data['results']:
            name = rec.get('model', '')
            if name.startswith('zoo_'):
                model, impl = rec.get('config') or name[4:], 'vmamba_zoo'
            elif name in OFFICIAL:
                model, impl = OFFICIAL[name], 'official'
            else:
                model, impl = name, 'timm'
            points.append((model, impl, rec.get('infer_bf16_img_s'), rec.get('train_bf16_img_s')))
        return points
    rows = []
    if isinstance(data, dict) and 'rows' in data:
        rows = data['rows']
    elif isinstance(data, dict) and 'runs' in data:
        rows = [r for run in data['runs'] for r in run.get('rows', [])]
    else:
        raise UsageError(f'{path} is neither a side-by-side harness file (results) nor a tools/benchmark.py file '
                         f'(rows or runs)')
    for r in rows:
        if r.get('precision', 'bf16') != 'bf16' or r.get('memory_format', 'contiguous') != 'contiguous':
            continue
        impl = 'timm' if r['model'] in BASELINE_TOP1 else 'vmamba_zoo'
        points.append((r['model'], impl, r.get('infer_img_s'), r.get('train_img_s')))
    return points


def record_name(spec):
    """The file name a record was committed as: ``side_by_side_h100_ff64ae9.json`` for the file or the history entry."""
    path, name = split_spec(spec)
    return name or os.path.basename(path)


def merge(paths):
    """(model, implementation) -> [infer, train]; later records win, value by value."""
    table = {}
    for path in paths:
        for model, impl, infer, train in read_points(path):
            cell = table.setdefault((model, impl), [None, None])
            for i, v in enumerate((infer, train)):
                if v is not None:
                    cell[i] = float(v)
    return table


def family(model):
    for prefix in FAMILY_COLORS:
        if model.startswith(prefix):
            return prefix
    return None


def markdown(table, top1, superseded=()):
    lines = ['| model | implementation | paper top-1 | infer img/s | train img/s |', '|---|---|---|---|---|']
    for (model, impl), (infer, train) in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        fmt = lambda v: '' if v is None else f'{v:.0f}'  # noqa: E731
        mark = ' (superseded)' if impl == 'vmamba_zoo' and model in superseded else ''
        lines.append(f'| {model} | {impl}{mark} | {top1.get(model, "")} | {fmt(infer)} | {fmt(train)} |')
    return '\n'.join(lines) + '\n'


def plot(table, top1, out, title, superseded=(), superseded_label='measured with kernels since replaced'):
    """Zoo points filled (hollow where ``superseded``), official code as crosses joined to the zoo point of the
    same model, timm baselines as squares; one colour per family."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    superseded = set(superseded)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    drawn = 0
    for ax, index, label in ((axes[0], 0, 'inference'), (axes[1], 1, 'training')):
        for (model, impl), values in sorted(table.items()):
            speed = values[index]
            if speed is None or model not in top1:
                continue
            color = FAMILY_COLORS.get(family(model), 'black')
            y = top1[model]
            if impl == 'official':
                ax.scatter(speed, y, c=color, marker='x', s=70)
                zoo = table.get((model, 'vmamba_zoo'), [None, None])[index]
                if zoo is not None:
                    ax.annotate('', (zoo, y), xytext=(speed, y),
                                arrowprops=dict(arrowstyle='->', color=color, lw=0.8, alpha=0.6))
            else:
                hollow = impl == 'vmamba_zoo' and model in superseded
                ax.scatter(speed, y, marker='o' if impl == 'vmamba_zoo' else 's', s=55,
                           facecolors='none' if hollow else color, edgecolors=color, linewidths=1.5)
                ax.annotate(DISPLAY.get(model, model), (speed, y), textcoords='offset points',
                            xytext=LABEL_OFFSET.get(family(model), (6, 4)), fontsize=8)
            drawn += 1
        ax.set_xlabel(f'{label} img/s (bf16, batch 128, 224², log scale)')
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:.0f}'))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f'{v:.0f}' if str(int(v))[0] in '25' else ''))
        ax.tick_params(axis='x', which='minor', labelsize=7)
        ax.grid(True, which='both', alpha=0.3)
        ax.set_title(label)
        ax.margins(x=0.12, y=0.08)
    axes[0].set_ylabel('ImageNet-1k top-1 (%, paper)')
    handles = [plt.Line2D([], [], ls='', marker='o', color='gray', label='vmamba_zoo'),
               plt.Line2D([], [], ls='', marker='x', color='gray', label='official code (arrow: to vmamba_zoo)'),
               plt.Line2D([], [], ls='', marker='s', color='black', label='timm baseline')]
    if superseded & {m for m, impl in table if impl == 'vmamba_zoo'}:
        handles.append(plt.Line2D([], [], ls='', marker='o', markerfacecolor='none', color='gray',
                                  label=f'vmamba_zoo, {superseded_label}'))
    fig.legend(handles=handles, loc='lower center', ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    if drawn == 0:
        raise UsageError('no model in the benchmark files has both a throughput and a paper top-1')
    tmp = out + '.tmp.png'
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return drawn


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('inputs', nargs='+', metavar='RECORD',
                   help='benchmark records (side-by-side harness or tools/benchmark.py): JSON files, or entries of a '
                        'history as PATH/history.json:NAME (model_cards/benchmarks/history.json:'
                        'side_by_side_h100_ff64ae9.json); later records win')
    p.add_argument('--out', default=os.path.join(REPO, 'model_cards', 'throughput_accuracy.png'))
    p.add_argument('--paper-dir', default=PAPER_DIR, help="folder of the papers' numbers (<family>.json)")
    p.add_argument('--title', default=None)
    p.add_argument('--markdown', action='store_true', help='print the table behind the plot')
    p.add_argument('--superseded', default='', metavar='MODELS',
                   help='comma-separated zoo models whose numbers came from code that is no longer the default: '
                        'drawn hollow, marked in the table')
    p.add_argument('--superseded-label', default='measured with kernels since replaced',
                   help='legend text for the hollow points')
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    table = merge(args.inputs)
    top1 = paper_top1(args.paper_dir)
    title = args.title or 'Top-1 against throughput; data: ' + ', '.join(record_name(p) for p in args.inputs)
    superseded = [m for m in args.superseded.split(',') if m]
    unknown = sorted(set(superseded) - {m for m, impl in table if impl == 'vmamba_zoo'})
    if unknown:
        raise UsageError(f'--superseded names models with no zoo row in the inputs: {", ".join(unknown)}')
    drawn = plot(table, top1, args.out, title, superseded, args.superseded_label)
    missing = sorted({m for m, _ in table if m not in top1})
    print(f'wrote {args.out}: {drawn} points' + (f'; no paper top-1 for {", ".join(missing)}' if missing else ''))
    if args.markdown:
        print(markdown(table, top1, superseded))
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
