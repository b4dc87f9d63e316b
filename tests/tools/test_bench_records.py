"""model_cards/benchmarks/: one record file per kind and device, the latest; earlier records in history.json, moved
there whole by ``tools/bench_records.py retire``; the docs name each record where it is, and the plot tool reads a
history entry as it read the file."""
import json
import os
import pathlib
import re

import pytest

from .tool_runner import REPO, load_tool, run_script

BENCH = pathlib.Path(REPO) / 'model_cards' / 'benchmarks'
DOCS = [pathlib.Path(REPO) / 'README.md', *sorted((pathlib.Path(REPO) / 'model_cards').glob('*.md')),
        *sorted(BENCH.glob('*.md'))]
RECORD_NAME = r'[a-z0-9_]+_[a-z0-9]+_[0-9a-f]{7,40}(?:_[a-z0-9_]+)?\.json'


@pytest.fixture(scope='module')
def records():
    return load_tool('toolkit.bench_records')


def _side_by_side(date, infer):
    meta = {'device': 'NVIDIA H100 80GB HBM3', 'date': date, 'batch': 128}
    results = [{'model': 'convnext_tiny', 'infer_bf16_img_s': 7000.0, 'train_bf16_img_s': 2400.0},
               {'model': 'vmamba_t', 'infer_bf16_img_s': 2800.0, 'train_bf16_img_s': 1000.0},
               {'model': 'zoo_vmamba_t', 'config': 'vmamba_tiny_s1l8', 'infer_bf16_img_s': infer,
                'train_bf16_img_s': 1300.0}]
    return {'meta': meta, 'results': results}


def _folder(tmp_path, files, history=None):
    """A records folder: ``files`` {name: record} as files (written as the tools write them), ``history``
    {name: record} as its history.json."""
    for name, record in files.items():
        (tmp_path / name).write_text(json.dumps(record, indent=1) + '\n')
    if history is not None:
        (tmp_path / 'history.json').write_text(json.dumps({'about': 'earlier records', 'records': history}, indent=1))
    return tmp_path


@pytest.mark.parametrize('name,kind,device', [
    ('side_by_side_h100_7098a6c.json', 'side_by_side', 'h100'),
    ('cuda_graphs_h100_5aa1663.json', 'cuda_graphs', 'h100'),
    ('cuda_graphs_all_h100_1d3e58b.json', 'cuda_graphs_all', 'h100'),
    ('cpu_latency_2core_8edc3ab.json', 'cpu_latency', '2core'),
    ('kernels_h200_e947839_s1_s2.json', 'kernels', 'h200'),
])
def test_a_record_name_says_its_kind_and_device(records, name, kind, device):
    assert records.kind_and_device(name) == (kind, device)


def test_only_the_oldest_history_entries_are_named_without_a_commit(records):
    assert records.kind_and_device('kernels_h200.json', with_commit=False) == ('kernels', 'h200')
    with pytest.raises(ValueError, match='not a record name'):
        records.kind_and_device('kernels_h200.json')


@pytest.mark.parametrize('name', ['profile.json', 'side_by_side.json', 'Side_by_side_h100_7098a6c.json',
                                  'side_by_side_h100_7098a6c.md'])
def test_other_names_are_not_record_names(records, name):
    with pytest.raises(ValueError, match='not a record name'):
        records.kind_and_device(name)


def test_a_record_is_dated_by_its_latest_date_at_its_own_precision(records):
    assert records.record_date({'date': '2026-11-29T23:52:20+00:00'}) == '2026-11-29 23:52'
    assert records.record_date({'meta': {'date': '2026-12-07'}}) == '2026-12-07'
    assert records.record_date({'runs': [{'date': '2026-12-06 22:46 UTC'}, {'date': '2026-12-06 22:48 UTC'}]}) == \
        '2026-12-06 22:48'
    assert records.record_date({'meta': {}, 'results': []}) is None
    assert records.is_newer('2026-12-07', '2026-12-06 22:48')
    assert not records.is_newer('2026-12-07', '2026-12-07 04:40') and not records.is_newer('2026-12-07 04:40',
                                                                                           '2026-12-07')
    assert not records.is_newer(None, '2026-12-07') and not records.is_newer('2026-12-07', None)


def test_the_committed_records_keep_one_latest_file_per_kind_and_device(records):
    assert records.rule_violations(str(BENCH)) == []
    proc = run_script('bench_records.py', 'check')
    assert proc.returncode == 0 and 'one record file per kind and device' in proc.stdout
    text = (BENCH / 'history.json').read_text()
    assert text == records.dumps_history(json.loads(text))  # the format retire writes: a retire adds only its record


def test_the_rule_fails_for_two_files_of_a_kind_and_device_and_for_a_newer_history_entry(records, tmp_path):
    old, new = _side_by_side('2026-12-06', 4000.0), _side_by_side('2026-12-07', 4800.0)
    folder = _folder(tmp_path, {'side_by_side_h100_aaaaaaa.json': old, 'side_by_side_h100_bbbbbbb.json': new,
                                'side_by_side_h200_ccccccc.json': old, 'cuda_graphs_all_h100_ddddddd.json': {}},
                     history={})
    problems = records.rule_violations(str(folder))
    assert len(problems) == 1 and 'side_by_side_h100_aaaaaaa.json, side_by_side_h100_bbbbbbb.json' in problems[0]
    proc = run_script('bench_records.py', 'check', '--dir', folder)
    assert proc.returncode == 1 and 'side_by_side_h100_aaaaaaa.json' in proc.stdout

    (tmp_path / 'second').mkdir()
    folder = _folder(tmp_path / 'second', {'side_by_side_h100_aaaaaaa.json': old},
                     history={'side_by_side_h100_bbbbbbb.json': new})
    assert records.rule_violations(str(folder)) == [
        'history.json holds side_by_side_h100_bbbbbbb.json (2026-12-07), newer than the file '
        'side_by_side_h100_aaaaaaa.json (2026-12-06)']


def test_retire_moves_the_older_record_whole_and_refuses_the_latest(records, tmp_path):
    old, new = _side_by_side('2026-12-06', 4000.0), _side_by_side('2026-12-07', 4800.0)
    earlier = {'device': 'NVIDIA H200', 'date': '2026-11-29T15:52:35+00:00', 'rows': [{'ms': 1.5}]}
    folder = _folder(tmp_path, {'side_by_side_h100_aaaaaaa.json': old, 'side_by_side_h100_bbbbbbb.json': new},
                     history={'kernels_h200.json': earlier})
    before = (folder / 'history.json').read_bytes()

    proc = run_script('bench_records.py', 'retire', folder / 'side_by_side_h100_bbbbbbb.json')
    assert proc.returncode == 2 and 'newer than every other side_by_side record of h100' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and 'Traceback' not in proc.stderr
    assert (folder / 'history.json').read_bytes() == before and (folder / 'side_by_side_h100_bbbbbbb.json').exists()

    proc = run_script('bench_records.py', 'retire', folder / 'side_by_side_h100_aaaaaaa.json')
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(folder)) == ['history.json', 'side_by_side_h100_bbbbbbb.json']  # no temporary left
    text = (folder / 'history.json').read_text()
    history = json.loads(text)
    assert history == {'about': 'earlier records',
                       'records': {'kernels_h200.json': earlier, 'side_by_side_h100_aaaaaaa.json': old}}
    assert list(history['records']['side_by_side_h100_aaaaaaa.json']['meta']) == list(old['meta'])  # key order kept
    assert text.startswith('{\n "about": "earlier records",\n "records": {\n  "kernels_h200.json": {\n   "device"')
    assert records.rule_violations(str(folder)) == []


def test_a_second_retire_finishes_an_interrupted_one_and_a_clash_is_refused(records, tmp_path):
    old = _side_by_side('2026-12-06', 4000.0)
    folder = _folder(tmp_path, {'side_by_side_h100_aaaaaaa.json': old},
                     history={'side_by_side_h100_aaaaaaa.json': old})
    assert records.rule_violations(str(folder)) == [
        'side_by_side_h100_aaaaaaa.json is both a file and an entry of history.json']
    assert records.retire(str(folder / 'side_by_side_h100_aaaaaaa.json')) == 'side_by_side_h100_aaaaaaa.json'
    assert sorted(os.listdir(folder)) == ['history.json']

    _folder(folder, {'side_by_side_h100_bbbbbbb.json': _side_by_side('2026-12-07', 4800.0)})
    with pytest.raises(ValueError, match='the only side_by_side record of h100 here'):
        records.retire(str(folder / 'side_by_side_h100_bbbbbbb.json'))
    os.remove(folder / 'side_by_side_h100_bbbbbbb.json')

    _folder(folder, {'side_by_side_h100_aaaaaaa.json': _side_by_side('2026-12-06', 4100.0)})
    before = (folder / 'history.json').read_bytes()
    with pytest.raises(ValueError, match='already holds a different record named side_by_side_h100_aaaaaaa.json'):
        records.retire(str(folder / 'side_by_side_h100_aaaaaaa.json'))
    assert (folder / 'history.json').read_bytes() == before and (folder / 'side_by_side_h100_aaaaaaa.json').exists()


def test_a_failed_write_leaves_the_history_and_the_file_as_they_were(records, tmp_path, monkeypatch):
    folder = _folder(tmp_path, {'side_by_side_h100_aaaaaaa.json': _side_by_side('2026-12-06', 4000.0),
                                'side_by_side_h100_bbbbbbb.json': _side_by_side('2026-12-07', 4800.0)}, history={})
    before = (folder / 'history.json').read_bytes()

    def full_disk(src, dst):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(records.os, 'replace', full_disk)
    with pytest.raises(OSError, match='No space left'):
        records.retire(str(folder / 'side_by_side_h100_aaaaaaa.json'))
    assert sorted(os.listdir(folder)) == ['history.json', 'side_by_side_h100_aaaaaaa.json',
                                          'side_by_side_h100_bbbbbbb.json']  # no temporary left either
    assert (folder / 'history.json').read_bytes() == before


def _latest_side_by_side():
    """The side-by-side record of the H100 that is a file here (the latest of its kind and device)."""
    names = [n for n in os.listdir(BENCH) if n.startswith('side_by_side_h100_') and n.endswith('.json')]
    assert len(names) == 1, names
    return BENCH / names[0]


def test_the_plot_reads_a_history_record_as_the_file_it_came_from(tmp_path, capsys):
    plot = load_tool('plot_benchmarks')
    latest = json.loads(_latest_side_by_side().read_text())
    folder = _folder(tmp_path, {'side_by_side_h100_aaaaaaa.json': latest,
                                'side_by_side_h100_bbbbbbb.json': _side_by_side('2099-01-01', 1.0)},
                     history={})
    as_file = plot.read_points(str(folder / 'side_by_side_h100_aaaaaaa.json'))
    assert len(as_file) == len(latest['results']) > 0
    assert run_script('bench_records.py', 'retire', folder / 'side_by_side_h100_aaaaaaa.json').returncode == 0
    spec = f'{folder / "history.json"}:side_by_side_h100_aaaaaaa.json'
    assert plot.read_points(spec) == as_file
    assert plot.merge([spec]) == plot.merge([str(_latest_side_by_side())])

    out = tmp_path / 'plot.png'
    assert plot.run_tool(plot.main, [spec, '--out', str(out)]) == 0
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    proc = run_script('plot_benchmarks.py', f'{folder / "history.json"}:side_by_side_h100_zzzzzzz.json',
                      '--out', tmp_path / 'x.png')
    assert proc.returncode == 2 and 'holds no record' in proc.stderr and 'Traceback' not in proc.stderr


def _plot_command(text):
    block = re.search(r'```bash\n(python tools/plot_benchmarks\.py .*?)\n```', text, re.S).group(1)
    return [arg for arg in block.replace('\\\n', ' ').split() if arg.startswith('model_cards/benchmarks/')]


def test_the_plot_command_of_side_by_side_md_reads_every_record_it_names():
    plot = load_tool('plot_benchmarks')
    inputs = _plot_command((BENCH / 'side_by_side.md').read_text())
    assert len(inputs) >= 2
    table = plot.merge([os.path.join(REPO, spec) for spec in inputs])
    zoo = {model for model, impl in table if impl == 'vmamba_zoo'}
    assert {'vmamba_tiny_s1l8', 'groupmamba_tiny', 'efficientvmamba_tiny', 'spatialmamba_tiny', 'plainmamba_l1',
            'vim2_tiny'} <= zoo


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_each_record_where_it_is(doc):
    """A link or path to a record names a file of the folder, ``history.json:NAME`` an entry of the history, and a
    record named otherwise ("`NAME.json` in `history.json`") is one or the other."""
    files = set(os.listdir(BENCH))
    history = set(json.loads((BENCH / 'history.json').read_text())['records'])
    text = doc.read_text()
    checked = 0
    for match in re.finditer(rf'(history\.json:|benchmarks/|\]\()?({RECORD_NAME}|[a-z0-9_]+_h\d00\.json)', text):
        prefix, name = match.groups()
        where = f'{doc.name}: {match.group(0)}'
        if prefix == 'history.json:':
            assert name in history, where
        elif prefix:
            assert name in files, f'{where}: not a file of model_cards/benchmarks (retired into history.json?)'
        else:
            assert name in files or name in history, where
        checked += 1
    if doc.name in {'side_by_side.md', 'kernels.md', 'models_h200.md'}:
        assert checked, f'{doc.name} names no record: the pattern no longer finds them'
