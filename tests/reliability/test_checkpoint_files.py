"""Checkpoint files: one safe reader everywhere, the same EMA keys everywhere, atomic and independent writes."""
import errno
import os
import pickle

import pytest
import torch

from vmamba_zoo import checkpoint as ckpt

from ..tools.tool_runner import load_tool


# ------------------------------------------------------------------------------------------------- unsafe pickles
class RunsCode:
    """Unpickling this calls os.system: a reader that lets it run creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _timm_pretrained(path, name='efficientvmamba_tiny'):
    import timm

    import vmamba_zoo  # noqa: F401  (registers the models)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _readers():
    """Every way the project reads a checkpoint file: name -> callable(path)."""
    checkpoint_io = load_tool('toolkit.checkpoint_io')
    train = load_tool('train')
    readers = {
        'vmamba_zoo.checkpoint': ckpt.read_checkpoint,
        'tools.checkpoint_io': checkpoint_io.read_checkpoint,
        'tools.checkpoint_io.load_into_model': lambda p: checkpoint_io.load_into_model(torch.nn.Linear(2, 2), p),
        'train --resume FILE': lambda p: train.find_resume_checkpoint(str(p), os.path.dirname(p)),
        'train --resume auto': lambda p: train.find_resume_checkpoint('auto', os.path.dirname(p)),
        'timm.create_model(pretrained=True, file=...)': lambda p: _timm_pretrained(p),
    }
    try:
        from mmengine.runner.checkpoint import CheckpointLoader

        from vmamba_zoo.mm import cli as mm_cli
        from vmamba_zoo.mm import checkpoint as mm_checkpoint
    except ImportError:  # the mm extras are optional
        return readers
    mm_cli.safe_local_checkpoints()
    readers['vmamba_zoo.mm.checkpoint'] = mm_checkpoint.read_checkpoint
    readers['mm tools (mmengine CheckpointLoader)'] = lambda p: CheckpointLoader.load_checkpoint(str(p), 'cpu')
    return readers


@pytest.mark.parametrize('layout', ['nested', 'top_level', 'plain_pickle'])
def test_a_pickle_that_would_run_code_never_runs_in_any_reader(tmp_path, layout):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'last.pth.tar'
    evil = RunsCode(marker)
    if layout == 'nested':  # official-looking: weights plus a pickled object
        torch.save({'model': {'w': torch.ones(2, 2)}, 'config': evil}, path)
    elif layout == 'top_level':
        torch.save(evil, path)
    else:  # not a torch zip file at all
        path.write_bytes(pickle.dumps({'state_dict': evil}))
    assert not marker.exists()
    for name, read in _readers().items():
        try:
            out = read(path)
        except Exception:  # noqa: BLE001  (refusing the file is fine; running its code is not)
            out = None
        assert not marker.exists(), f'{name} ran code from the checkpoint ({layout})'
        if layout == 'nested' and name in ('vmamba_zoo.checkpoint', 'vmamba_zoo.mm.checkpoint'):
            assert isinstance(out['config'], ckpt.InertObject), name  # an inert stand-in, weights intact
            assert torch.equal(out['model']['w'], torch.ones(2, 2)), name


def test_official_objects_are_read_inert_and_mm_history_for_real(tmp_path):
    import argparse

    import numpy as np
    path = tmp_path / 'official.pth'
    torch.save({'model': {'w': torch.arange(4.)}, 'args': argparse.Namespace(lr=1.0), 'epoch': np.int64(3)}, path)
    out = ckpt.read_checkpoint(path)
    assert torch.equal(out['model']['w'], torch.arange(4.))
    assert isinstance(out['args'], ckpt.InertObject) and isinstance(out['epoch'], ckpt.InertObject)
    with pytest.raises(ckpt.CheckpointError, match='cannot read checkpoint'):
        (tmp_path / 'torn.pth').write_bytes(path.read_bytes()[:100])
        ckpt.read_checkpoint(tmp_path / 'torn.pth')
    try:  # mmengine's own checkpoints: the message hub's HistoryBuffer (numpy arrays) is rebuilt for real
        from mmengine.logging import HistoryBuffer
        from mmengine.runner.checkpoint import CheckpointLoader

        from vmamba_zoo.mm.cli import safe_local_checkpoints
    except ImportError:
        return
    history = HistoryBuffer()
    history.update(3.0)
    history.update(np.float64(2.0))
    torch.save({'message_hub': {'log_scalars': {'loss': history}}, 'meta': {'seed': np.int64(1)}}, path)
    safe_local_checkpoints()
    loaded = CheckpointLoader.load_checkpoint(str(path), 'cpu')
    assert isinstance(loaded['message_hub']['log_scalars']['loss'], HistoryBuffer)
    assert loaded['message_hub']['log_scalars']['loss'].mean() == 2.5 and loaded['meta']['seed'] == 1


# --------------------------------------------------------------------------------------------------------- EMA keys
@pytest.mark.parametrize('ema_key', ckpt.EMA_KEYS)
def test_tools_and_mm_accept_the_same_ema_keys(tmp_path, ema_key):
    checkpoint_io = load_tool('toolkit.checkpoint_io')
    model = torch.nn.Linear(3, 2)
    plain = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    ema = {f'module.{k}': torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    path = tmp_path / 'weights.pth'
    torch.save({'model': plain, ema_key: ema}, path)
    got = {}
    checkpoint_io.load_into_model(model, str(path), use_ema=True)
    got['tools'] = model.state_dict()
    got['vmamba_zoo.checkpoint'] = ckpt.select_state_dict(ckpt.read_checkpoint(path), use_ema=True)
    try:
        from vmamba_zoo.mm import checkpoint as mm_checkpoint
        got['mm'] = mm_checkpoint.select_state_dict(mm_checkpoint.read_checkpoint(path), use_ema=True)
    except ImportError:
        pass
    for where, sd in got.items():
        assert set(sd) == {'weight', 'bias'}, where
        assert all(torch.equal(v, torch.full_like(v, 7.0)) for v in sd.values()), f'{where} missed {ema_key}'
        assert not ckpt.select_state_dict(ckpt.read_checkpoint(path))['weight'].any()  # plain weights without EMA


def test_ema_requested_but_absent_is_an_error_everywhere(tmp_path):
    checkpoint_io = load_tool('toolkit.checkpoint_io')
    path = tmp_path / 'weights.pth'
    torch.save({'model': torch.nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(checkpoint_io.UsageError, match='no EMA weights'):
        checkpoint_io.load_into_model(torch.nn.Linear(3, 2), str(path), use_ema=True)
    with pytest.raises(ckpt.CheckpointError, match='no EMA weights'):
        ckpt.select_state_dict(ckpt.read_checkpoint(path), use_ema=True)
    try:
        from vmamba_zoo.mm import checkpoint as mm_checkpoint
    except ImportError:
        return
    with pytest.raises(ValueError, match='no EMA weights'):  # never a silent fall back to the plain weights
        mm_checkpoint.select_state_dict(mm_checkpoint.read_checkpoint(path), use_ema=True)


# ---------------------------------------------------------------------------------------------------------- writing
def _full_disk_after(nbytes):
    """A write that puts ``nbytes`` bytes on disk and then fails as a full disk does."""

    def write(obj, f, *args, **kwargs):
        f.write(b'x' * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_atomic_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'weights.pth'
    ckpt.atomic_save({'w': torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, 'save', _full_disk_after(1000))
    with pytest.raises(OSError) as err:
        ckpt.atomic_save({'w': torch.zeros(3)}, path)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ['weights.pth'], 'temporary file left behind'


def _saver(train, tmp_path, max_history=3):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = train._make_saver_class()(
        model=model, optimizer=optimizer, args={'model': 'linear'}, checkpoint_dir=str(tmp_path),
        recovery_dir=str(tmp_path), max_history=max_history, extra_state=lambda: {'num_updates': 0})
    return model, saver


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_last_checkpoint_n_and_best_are_independent_files(tmp_path):
    train = load_tool('train')
    model, saver = _saver(train, tmp_path)
    saver.save_checkpoint(0, metric=50.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    saver.save_checkpoint(1, metric=60.0)
    names = ['last.pth.tar', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'model_best.pth.tar']
    stats = {n: os.stat(tmp_path / n) for n in names}
    assert all(st.st_nlink == 1 for st in stats.values()), {n: st.st_nlink for n, st in stats.items()}
    assert len({st.st_ino for st in stats.values()}) == len(names)
    (tmp_path / 'last.pth.tar').write_bytes(b'corrupt')  # damage one file in place
    assert _load(tmp_path / 'checkpoint-0.pth.tar')['epoch'] == 0
    for name in ('checkpoint-1.pth.tar', 'model_best.pth.tar'):
        loaded = _load(tmp_path / name)
        assert loaded['epoch'] == 1 and torch.equal(loaded['state_dict']['weight'], model.weight.detach()), name


def test_no_checkpoint_history_keeps_last_and_the_best_epoch(tmp_path):
    """--checkpoint-hist 0 (the demo's): no numbered files; model_best follows the best metric, last the newest."""
    train = load_tool('train')
    model, saver = _saver(train, tmp_path, max_history=0)
    for epoch, metric in enumerate([50.0, 60.0, 40.0, None]):
        with torch.no_grad():
            model.weight.add_(1.0)
        assert saver.save_checkpoint(epoch, metric=metric) == ((60.0, 1) if epoch else (50.0, 0))
        assert sorted(os.listdir(tmp_path)) == ['last.pth.tar', 'model_best.pth.tar'], epoch
        assert _load(tmp_path / 'last.pth.tar')['epoch'] == epoch
        assert _load(tmp_path / 'model_best.pth.tar')['epoch'] == (1 if epoch else 0)


@pytest.mark.parametrize('failing', ['torch.save', 'copy'])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoints(tmp_path, monkeypatch, failing):
    import shutil
    train = load_tool('train')
    model, saver = _saver(train, tmp_path)
    saver.save_checkpoint(0, metric=50.0)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with torch.no_grad():
        model.weight.add_(1.0)
    if failing == 'torch.save':  # writing the new state
        monkeypatch.setattr(torch, 'save', _full_disk_after(4096))
    else:  # copying it to checkpoint-1 / model_best
        def copy(src, dst, *args):
            dst.write(src.read(100))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(shutil, 'copyfileobj', copy)
    with pytest.raises(OSError):
        saver.save_checkpoint(1, metric=60.0)
    for name, data in before.items():
        if failing == 'copy' and name == 'last.pth.tar':
            assert _load(tmp_path / name)['epoch'] == 1  # the new last was complete before the copy failed
        else:
            assert (tmp_path / name).read_bytes() == data, name
    leftovers = set(os.listdir(tmp_path)) - set(before)
    assert not leftovers, f'partial files left behind: {leftovers}'


@pytest.mark.parametrize('ema_key', ckpt.EMA_KEYS)
def test_timm_pretrained_file_prefers_ema_weights_under_every_ema_key(tmp_path, ema_key):
    """timm's own reader knows two EMA keys; a zoo model's ``pretrained=True`` file goes through the project's
    reader and takes the EMA weights under any of :data:`EMA_KEYS`, as the tools and mm do."""
    import timm

    import vmamba_zoo  # noqa: F401
    base = timm.create_model('efficientvmamba_tiny').state_dict()
    path = tmp_path / 'weights.pth'
    torch.save({'model': {k: v + 1 for k, v in base.items()}, ema_key: {k: v + 2 for k, v in base.items()},
                'args': RunsCode(tmp_path / 'code_ran')}, path)
    loaded = _timm_pretrained(path).state_dict()
    assert not (tmp_path / 'code_ran').exists()
    floats = [k for k, v in base.items() if v.is_floating_point()]
    assert floats and all(torch.equal(loaded[k], base[k] + 2) for k in floats), ema_key
