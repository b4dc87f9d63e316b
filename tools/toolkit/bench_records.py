"""The benchmark records of ``model_cards/benchmarks/``: the latest record of each kind per device is a JSON file of
its own; every earlier one is an entry of ``history.json`` beside it, under the name of the file it was committed as
(``{"about": ..., "records": {"<file name>": <record>}}``).

A record's file name says what it is: ``<kind>_<device>_<commit>[_<note>].json`` (``side_by_side_h100_7098a6c.json``,
``cuda_graphs_all_h100_1d3e58b.json``: kind ``cuda_graphs_all``, device ``h100``); only the oldest entries of the
history carry no commit (``kernels_h200.json``). A record is named on the command line as its file's path, or as
``<history.json path>:<file name>`` for an entry of the history.
"""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(REPO, 'model_cards', 'benchmarks')
HISTORY = 'history.json'
ABOUT = ('Earlier benchmark records, each under the name of the file it was committed as. The latest record of each '
         'kind per device is a file of its own beside this one; the README, the model cards and the tables here cite '
         'these entries as "`NAME.json` in `history.json`". `python tools/bench_records.py retire FILE` moves a '
         'record file here once a newer one of its kind and device is committed.')

_WITH_COMMIT = re.compile(
    r'(?P<kind>[a-z0-9_]+?)_(?P<device>[a-z0-9]+)_(?P<commit>[0-9a-f]{7,40})(?:_[a-z0-9_]+)?\.json')
_WITHOUT_COMMIT = re.compile(r'(?P<kind>[a-z0-9_]+)_(?P<device>[a-z0-9]+)\.json')
_DATE = re.compile(r'(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}))?')


def kind_and_device(name: str, with_commit: bool = True) -> Tuple[str, str]:
    """(kind, device) of a record's file name; ValueError for a name that does not follow the pattern. The oldest
    entries of the history, named before records carried their commit, pass with ``with_commit=False``."""
    if not isinstance(name, str):
        raise TypeError(f'a record name is a str, got {type(name).__name__}')
    match = _WITH_COMMIT.fullmatch(name) or (None if with_commit else _WITHOUT_COMMIT.fullmatch(name))
    if match is None:
        raise ValueError(f'{name!r} is not a record name: expected <kind>_<device>_<commit>[_<note>].json, e.g. '
                         f'side_by_side_h100_7098a6c.json')
    return match['kind'], match['device']


def record_date(record) -> Optional[str]:
    """When the record was measured, ``YYYY-MM-DD HH:MM`` or ``YYYY-MM-DD`` (UTC): the latest of its ``date``, its
    ``meta``'s and its ``runs``' dates; None where it has none."""
    found = []
    if isinstance(record, dict):
        holders = [record, record.get('meta')] + list(record.get('runs') or [])
        for holder in holders:
            match = _DATE.match(str(holder.get('date', ''))) if isinstance(holder, dict) else None
            if match:
                found.append(match[1] + (f' {match[2]}' if match[2] else ''))
    return max(found) if found else None


def is_newer(date: Optional[str], than: Optional[str]) -> bool:
    """Whether ``date`` is later than ``than`` at the precision both have (one day against a day and a time compares
    days only); False where either is unknown."""
    if date is None or than is None:
        return False
    n = min(len(date), len(than))
    return date[:n] > than[:n]


def read_history(path: str) -> Dict[str, object]:
    with open(path) as f:
        history = json.load(f)
    if not isinstance(history, dict) or not isinstance(history.get('records'), dict):
        raise ValueError(f'{path} is not a record history: expected {{"about": ..., "records": {{NAME: record}}}}')
    return history


def dumps_history(history: Dict[str, object]) -> str:
    """The history's text: ``about`` first, the records by name, each record's keys in their own order, one space
    of indentation (as every record file is written)."""
    ordered = {'about': history.get('about', ABOUT), 'records': dict(sorted(history['records'].items()))}
    return json.dumps(ordered, indent=1, ensure_ascii=False) + '\n'


def write_history(path: str, history: Dict[str, object]) -> None:
    """Write atomically: a reader sees the old history or the new one, never a part."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(dumps_history(history))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``history.json:NAME`` -> (path of the history, NAME); a plain path -> (path, None)."""
    path, sep, name = spec.rpartition(':')
    if sep and path.endswith('.json') and name:
        return path, name
    return spec, None


def load_record(spec: str):
    """The record a file holds, or that a history holds under a name (``model_cards/benchmarks/history.json:
    side_by_side_h100_ff64ae9.json``). OSError / ValueError (KeyError for a name the history lacks) say why not."""
    path, name = split_spec(spec)
    if name is None:
        with open(path) as f:
            return json.load(f)
    records = read_history(path)['records']
    if name not in records:
        raise KeyError(f'{path} holds no record {name!r}; it holds {", ".join(sorted(records))}')
    return records[name]


def record_files(folder: str = BENCH_DIR) -> List[str]:
    """The names of the record files beside the history (every JSON file of the folder but the history)."""
    return sorted(n for n in os.listdir(folder) if n.endswith('.json') and n != HISTORY)


def rule_violations(folder: str = BENCH_DIR) -> List[str]:
    """What breaks the rule "one file, the latest, per kind and device; earlier records in the history", a line
    each."""
    problems, by_key, dates = [], {}, {}
    for name in record_files(folder):
        try:
            by_key.setdefault(kind_and_device(name), []).append(name)
        except ValueError as e:
            problems.append(str(e))
            continue
        with open(os.path.join(folder, name)) as f:
            dates[name] = record_date(json.load(f))
    for (kind, device), names in sorted(by_key.items()):
        if len(names) > 1:
            problems.append(f'{len(names)} {kind} records of {device} as files ({", ".join(names)}): keep the latest '
                            f'and move the others into {HISTORY} (tools/bench_records.py retire FILE)')
    history_path = os.path.join(folder, HISTORY)
    records = read_history(history_path)['records'] if os.path.exists(history_path) else {}
    for old, record in sorted(records.items()):
        if old in dates:
            problems.append(f'{old} is both a file and an entry of {HISTORY}')
            continue
        try:
            key = kind_and_device(old, with_commit=False)
        except ValueError as e:
            problems.append(f'{HISTORY}: {e}')
            continue
        for name in by_key.get(key, []):
            if is_newer(record_date(record), dates[name]):
                problems.append(f'{HISTORY} holds {old} ({record_date(record)}), newer than the file {name} '
                                f'({dates[name]})')
    return problems


def retire(path: str) -> str:
    """Move the record file ``path`` into the ``history.json`` beside it under its file name and remove the file; the
    history is rewritten atomically first, so an interrupted retire leaves the file, which a second retire of the
    same record then removes. Refuses the latest record of its kind and device (the only file of them, or one newer
    by "date" than every other), and a name the history already holds with other content. Returns the name."""
    folder, name = os.path.split(os.path.abspath(path))
    key = kind_and_device(name)
    with open(path) as f:
        record = json.load(f)
    history_path = os.path.join(folder, HISTORY)
    history = read_history(history_path) if os.path.exists(history_path) else {'about': ABOUT, 'records': {}}
    if name in history['records'] and history['records'][name] != record:
        raise ValueError(f'{history_path} already holds a different record named {name}')
    others = {}
    for other in record_files(folder):
        if other != name and _WITH_COMMIT.fullmatch(other) and kind_and_device(other) == key:
            with open(os.path.join(folder, other)) as f:
                others[other] = record_date(json.load(f))
    if not others and name not in history['records']:
        raise ValueError(f'{name} is the only {key[0]} record of {key[1]} here: commit the record that replaces it, '
                         f'then retire this one')
    if others and all(is_newer(record_date(record), date) for date in others.values()):
        raise ValueError(f'{name} ({record_date(record)}) is newer than every other {key[0]} record of {key[1]} '
                         f'({", ".join(f"{n}: {d}" for n, d in sorted(others.items()))}): the latest stays a file')
    history['records'][name] = record
    write_history(history_path, history)
    os.remove(path)
    return name
