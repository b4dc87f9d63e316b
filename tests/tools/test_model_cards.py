"""The model cards' params/FLOPs figures are what tools/flops.py counts now.

Each card's generated table (between the flops-table markers, written by ``tools/flops.py --update-cards``) has one
row per model of its family; the cheapest models' rows are recounted here with the tool's own functions and must
read the same to the character, and the "ours" params/FLOPs columns written by hand elsewhere in a card must agree
with its generated table.
"""
import pathlib
import re

import pytest

from .tool_runner import REPO, load_tool

CARDS = pathlib.Path(REPO) / 'model_cards'
# Building a model and counting both FLOPs at 224² takes about 10 s for the smallest model on 2 loaded cores, and
# up to minutes for others (PlainMamba, ViM2): one model's row is recounted in full.
RECOUNTED = ['efficientvmamba_tiny']
# The other families' smallest models: their parameter columns (building the model takes a second or two).
PARAMS_ONLY = ['plainmamba_l1', 'spatialmamba_tiny', 'groupmamba_tiny', 'vim2_tiny', 'vmamba_tiny_s1l8']


@pytest.fixture(scope='module')
def flops():
    return load_tool('flops')


@pytest.fixture(scope='module')
def paper(flops):
    return flops.load_paper_numbers(str(pathlib.Path(REPO) / 'tests' / 'data' / 'paper'))


def _cells(line):
    return [c.strip() for c in line.strip().strip('|').split('|')]


def _generated_rows(flops, family):
    """{model: its row's line} from the generated table of ``model_cards/<family>.md``."""
    text = (CARDS / f'{family}.md').read_text()
    block = text[text.index(flops.MARK_START):text.index(flops.MARK_END)]
    rows = [line for line in block.splitlines() if line.startswith('| ') and not line.startswith('| model ')]
    return {_cells(line)[0]: line for line in rows}


def _family_of(flops, name):
    return next(family for family, names in flops.zoo_families().items() if name in names)


def test_every_card_has_a_generated_row_for_each_model_of_its_family(flops):
    families = flops.zoo_families()
    assert sorted(families) == sorted(p.stem for p in CARDS.glob('*.md'))
    for family, names in families.items():
        assert sorted(_generated_rows(flops, family)) == sorted(names), family


@pytest.mark.parametrize('name', RECOUNTED)
def test_card_row_is_what_flops_counts_now(flops, paper, name):
    row = flops.count_model(name, 224, ['fvcore', 'torch'], paper.get(name))
    recounted = flops.markdown_table([row]).splitlines()[-1]
    assert _generated_rows(flops, _family_of(flops, name))[name] == recounted


@pytest.mark.parametrize('name', PARAMS_ONLY)
def test_card_params_are_what_flops_counts_now(flops, paper, name):
    row = flops.count_model(name, 224, [], paper.get(name))  # no counter: parameters only
    params_cells = _cells(flops.markdown_table([row]).splitlines()[-1])[1:4]  # params, paper params, Δ params
    assert _cells(_generated_rows(flops, _family_of(flops, name))[name])[1:4] == params_cells


def _tables(text):
    """(header cells, [row cells]) of every markdown table in ``text``."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].startswith('|') and re.fullmatch(r'\|(\s*:?-+:?\s*\|)+', lines[i + 1].strip()):
            body = []
            for line in lines[i + 2:]:
                if not line.startswith('|'):
                    break
                body.append(_cells(line))
            yield _cells(lines[i]), body


@pytest.mark.parametrize('family', ['efficientvmamba', 'groupmamba', 'mambamixer', 'plainmamba', 'spatialmamba',
                                    'vmamba'])
def test_hand_written_ours_columns_agree_with_the_generated_table(flops, family):
    """A "params (ours)" / "GFLOPs (ours)" cell quotes the generated figure to its own precision (training-mode
    FLOPs, which the tool does not count, are left out)."""
    generated = {name: _cells(line) for name, line in _generated_rows(flops, family).items()}
    text = (CARDS / f'{family}.md').read_text()
    outside = text[:text.index(flops.MARK_START)] + text[text.index(flops.MARK_END):]
    checked = 0
    for header, rows in _tables(outside):
        for col, head in enumerate(header):
            head = head.lower()
            if 'ours' not in head or 'train' in head or not ('param' in head or 'gflop' in head):
                continue
            for row in rows:
                model = row[0].strip('*` ')
                if model not in generated:
                    continue
                quoted = re.search(r'\d+\.\d+', row[col]).group()
                counted = float(generated[model][1].split()[0] if 'param' in head else generated[model][4])
                decimals = len(quoted.split('.')[1])
                tolerance = 0.5 * 10 ** -decimals + 0.5e-3 + 1e-9  # the quote's rounding and the table's
                assert abs(float(quoted) - counted) <= tolerance, (family, model, header[col], quoted, counted)
                checked += 1
    assert checked >= 2 * len(generated), f'{family}: the card has no params and GFLOPs "ours" columns'
