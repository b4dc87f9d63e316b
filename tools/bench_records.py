#!/usr/bin/env python3
"""The benchmark records of model_cards/benchmarks/: the latest of each kind per device as its own file, the earlier
ones in history.json under the names of the files they were committed as.

After committing a new record (say side_by_side_h100_<new>.json), move the one it replaces into the history:

    python tools/bench_records.py retire model_cards/benchmarks/side_by_side_h100_ec46954.json
    python tools/bench_records.py check        # one file per kind and device, none older than the history's
    python tools/bench_records.py show model_cards/benchmarks/history.json:side_by_side_h100_ff64ae9.json

``retire`` rewrites history.json atomically (a temporary file, then os.replace) before it removes the file; it
refuses the latest record of its kind and device (the only file of them, or one newer by its "date" than every
other), and a name the history already holds with other content. The docs then cite the record as
"`NAME.json` in `history.json`".
"""
import argparse
import json
import sys

from toolkit.bench_records import BENCH_DIR, load_record, retire, rule_violations
from toolkit.cli import ToolArgumentParser, UsageError, run_tool


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=__doc__.split('\n\n', 1)[1])
    sub = p.add_subparsers(dest='command', required=True)
    r = sub.add_parser('retire', help='move record files into the history.json beside them')
    r.add_argument('files', nargs='+', metavar='FILE')
    c = sub.add_parser('check', help='list what breaks the one-latest-file-per-kind-and-device rule (exit 1 if any)')
    c.add_argument('--dir', default=BENCH_DIR, help='the records folder')
    s = sub.add_parser('show', help='print a record: a file, or HISTORY.json:NAME')
    s.add_argument('spec', metavar='RECORD')
    for parser in (r, c, s):
        parser.error = p.error  # one-line usage errors from the subcommands too
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'retire':
            for path in args.files:
                print(f'{path}: moved into history.json as {retire(path)}')
            return 0
        if args.command == 'show':
            record = load_record(args.spec)
        else:
            problems = rule_violations(args.dir)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(str(e.args[0] if isinstance(e, KeyError) else e)) from e
    if args.command == 'show':
        print(json.dumps(record, indent=1, ensure_ascii=False))
        return 0
    print('\n'.join(problems) if problems else f'{args.dir}: one record file per kind and device')
    return 1 if problems else 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
