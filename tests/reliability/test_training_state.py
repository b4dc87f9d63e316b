"""tools/train.py keeps its training state: resume takes the newest readable checkpoint, never erases history, a
corrupt --resume is one line, a NaN/inf loss follows --nan-policy. Tiny in-process runs (2 updates per 'epoch')."""
import json
import os

import torch

from ..tools.tool_runner import read_jsonl


def _epochs(out):
    return [r['epoch'] for r in read_jsonl(out / 'summary.jsonl')]


def _updates(path):
    return torch.load(path, map_location='cpu', weights_only=True)['num_updates']


def test_corrupt_last_resume_auto_takes_newest_readable_and_keeps_history(tmp_path, run_train):
    out = tmp_path / 'run'
    common = ['--epochs', '5', '--output', out, '--val-interval', '1']
    assert run_train(*common, '--debug-max-updates', '2') == (0, '')
    assert run_train(*common, '--resume', 'auto', '--debug-max-updates', '4') == (0, '')
    assert _epochs(out) == [0, 1] and _updates(out / 'checkpoint-1.pth.tar') == 4
    log_before = (out / 'train.log').read_text()
    rows_before = (out / 'summary.jsonl').read_text()

    data = (out / 'last.pth.tar').read_bytes()
    (out / 'last.pth.tar').write_bytes(data[:len(data) // 2])  # torn in place
    code, err = run_train(*common, '--resume', 'auto', '--debug-max-updates', '6')
    assert code == 0, err
    log = (out / 'train.log').read_text()
    assert log.startswith(log_before), 'train.log was truncated'
    warnings = [line for line in log[len(log_before):].splitlines() if 'skipped' in line]
    assert len(warnings) == 1, warnings
    assert 'last.pth.tar (' in warnings[0] and 'resuming from checkpoint-1.pth.tar' in warnings[0]
    assert 'resumed from' in log and 'checkpoint-1.pth.tar: epoch 2, batch 0/22, update 4' in log
    assert (out / 'summary.jsonl').read_text().startswith(rows_before), 'summary.jsonl lost rows'
    assert _epochs(out) == [0, 1, 2]
    assert _updates(out / 'last.pth.tar') == 6  # the torn file was replaced by a whole one


def test_resume_from_an_older_checkpoint_appends_to_history(tmp_path, run_train):
    out = tmp_path / 'run'
    common = ['--epochs', '5', '--output', out, '--val-interval', '9']
    assert run_train(*common, '--debug-max-updates', '2')[0] == 0
    assert run_train(*common, '--resume', 'auto', '--debug-max-updates', '4')[0] == 0
    rows = (out / 'summary.jsonl').read_text()
    csv_lines = (out / 'summary.csv').read_text().splitlines()
    code, err = run_train(*common, '--resume', out / 'checkpoint-0.pth.tar', '--debug-max-updates', '4')
    assert code == 0, err
    assert (out / 'summary.jsonl').read_text().startswith(rows)
    assert _epochs(out) == [0, 1, 1]  # epoch 1 redone: a second row, the first one kept
    new_csv = (out / 'summary.csv').read_text().splitlines()
    assert new_csv[:len(csv_lines)] == csv_lines and len(new_csv) == len(csv_lines) + 1


def test_resume_auto_with_no_readable_checkpoint_stops_instead_of_erasing(tmp_path, run_train):
    out = tmp_path / 'run'
    common = ['--epochs', '5', '--output', out, '--val-interval', '9']
    assert run_train(*common, '--debug-max-updates', '2')[0] == 0
    for name in os.listdir(out):
        if name.endswith('.pth.tar'):
            (out / name).write_bytes(b'not a checkpoint')
    rows = (out / 'summary.jsonl').read_text()
    code, err = run_train(*common, '--resume', 'auto', '--debug-max-updates', '4')
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'no readable checkpoint' in err, err
    assert (out / 'summary.jsonl').read_text() == rows


def test_explicit_corrupt_resume_is_one_line_exit_2(tmp_path, run_train):
    bad = tmp_path / 'last.pth.tar'
    bad.write_bytes(b'PK\x03\x04 torn zip')
    code, err = run_train('--epochs', '1', '--output', tmp_path / 'run', '--resume', bad)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and 'Traceback' not in err, err
    assert f'cannot resume from {bad}' in lines[0]
    other = tmp_path / 'weights.pth'
    torch.save({'model': {'w': torch.ones(1)}}, other)  # readable, but not a training checkpoint
    code, err = run_train('--epochs', '1', '--output', tmp_path / 'run', '--resume', other)
    assert code == 2 and 'not a training checkpoint' in err and len(err.strip().splitlines()) == 1, err


def test_nan_loss_stops_naming_the_step_before_any_checkpoint_holds_it(tmp_path, run_train):
    out = tmp_path / 'run'
    code, err = run_train('--epochs', '2', '--output', out, '--checkpoint-interval', '1', '--debug-nan-at-update',
                          '3', '--debug-max-updates', '5')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert 'loss is not finite' in lines[0] and 'epoch 1/2, step 3/22 (update 3)' in lines[0]
    saved = sorted(name for name in os.listdir(out) if name.endswith('.pth.tar'))
    # update 3's recovery file and the epoch-end checkpoints were never written
    assert saved == ['recovery-0-1.pth.tar', 'recovery-0-2.pth.tar'], saved
    for name in saved:
        weights = torch.load(out / name, map_location='cpu', weights_only=True)['state_dict']
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), name


def test_nan_loss_skip_policy_drops_and_counts_updates(tmp_path, run_train):
    out = tmp_path / 'run'
    code, err = run_train('--epochs', '2', '--output', out, '--nan-policy', 'skip', '--debug-nan-at-update', '2', '4',
                          '--debug-max-updates', '5', '--val-interval', '9')
    assert code == 0, err
    rows = read_jsonl(out / 'summary.jsonl')
    assert rows[-1]['skipped_steps'] == 2 and rows[-1]['num_updates'] == 5
    assert json.dumps(rows[-1]['train_loss']) not in ('NaN', 'Infinity')
    log = (out / 'train.log').read_text()
    assert 'skipped 1 update(s) with a non-finite loss (2 in all)' in log
    last = torch.load(out / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict']
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())
