"""tools/mm_train.py, tools/mm_test.py and tools/install_mmcv.sh."""
import pathlib
import subprocess
import sys
import tarfile

import pytest

from vmamba_zoo.mm.cli import build_parser, config_from_args

REPO = pathlib.Path(__file__).resolve().parents[2]
UPERNET = REPO / 'configs/mmseg/efficientvmamba/upernet_efficientvmamba-tiny_8xb2-160k_ade20k-512x512.py'

SETUP_PY = """\
import os
cxx = ['-std=c++14']
nvcc = [cuda_args, '-std=c++14'] if cuda_args else ['-std=c++14']
if parse_version(torch.__version__) < parse_version('2.1.0'):
    extra_compile_args['cxx'] = ['-std=c++14']
else:
    extra_compile_args['cxx'] = ['-std=c++17']
msvc = ['/std:c++17']
mlu = ['-Wall', '-std=c++17']
"""


def _fake_sdist(tmp_path, setup_text):
    src = tmp_path / 'pkg' / 'mmcv-2.1.0'
    src.mkdir(parents=True)
    (src / 'setup.py').write_text(setup_text)
    sdist = tmp_path / 'mmcv-2.1.0.tar.gz'
    with tarfile.open(sdist, 'w:gz') as tar:
        tar.add(src, arcname='mmcv-2.1.0')
    return sdist


def _patch(tmp_path, sdist):
    out = tmp_path / 'build'
    return subprocess.run(['bash', str(REPO / 'tools/install_mmcv.sh'), '--patch-only', '--sdist', str(sdist),
                           '--src-dir', str(out)], capture_output=True, text=True), out / 'mmcv-2.1.0' / 'setup.py'


def test_install_mmcv_switches_the_sdist_to_cxx20(tmp_path):
    proc, setup = _patch(tmp_path, _fake_sdist(tmp_path, SETUP_PY))
    assert proc.returncode == 0, proc.stderr
    patched = setup.read_text()
    assert patched == (SETUP_PY.replace('-std=c++14', '-std=c++20').replace('-std=c++17', '-std=c++20')
                       .replace('/std:c++17', '/std:c++20'))


def test_install_mmcv_fails_when_nothing_to_patch(tmp_path):
    proc, _ = _patch(tmp_path, _fake_sdist(tmp_path, "cxx = ['-O2']\n"))
    assert proc.returncode != 0 and 'patching the C++ standard' in proc.stderr


def test_cli_applies_overrides_in_order(tmp_path):
    args = build_parser('train').parse_args([
        str(UPERNET), '--work-dir', str(tmp_path), '--amp', '--resume',
        '--cfg-options', 'train_dataloader.batch_size=4', 'model.backbone.drop_path_rate=0.3'])
    cfg = config_from_args(args)
    assert cfg.work_dir == str(tmp_path) and cfg.launcher == 'none'
    assert cfg.train_dataloader.batch_size == 4 and cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.resume is True and cfg.load_from is None
    args = build_parser('train').parse_args([str(UPERNET), '--resume', 'ckpt.pth', '--launcher', 'pytorch'])
    cfg = config_from_args(args)
    assert cfg.resume is True and cfg.load_from == 'ckpt.pth' and cfg.launcher == 'pytorch'
    assert cfg.work_dir.endswith('upernet_efficientvmamba-tiny_8xb2-160k_ade20k-512x512')
    args = build_parser('test', test=True).parse_args([str(UPERNET), 'model.pth', '--amp'])
    cfg = config_from_args(args)
    assert cfg.load_from == 'model.pth' and cfg.test_cfg.fp16 is True
    with pytest.raises(SystemExit):
        build_parser('train').parse_args([str(UPERNET), '--launcher', 'slurm'])


TINY_RUN = """\
_base_ = ['{base}']
data_root = '{data}'
crop_size = (64, 96)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
model = dict(data_preprocessor=dict(size=crop_size), backbone=dict(init_cfg=None))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2), logger=dict(interval=1))
"""


def test_train_then_test_from_the_command_line(tmp_path):
    from .synthetic import write_ade20k
    data = write_ade20k(str(tmp_path / 'ade'), num_images=2)
    config = tmp_path / 'tiny_upernet.py'
    config.write_text(TINY_RUN.format(base=UPERNET, data=data))
    work = tmp_path / 'work'
    train = subprocess.run([sys.executable, str(REPO / 'tools/mm_train.py'), str(config), '--work-dir', str(work)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    checkpoint = work / 'iter_2.pth'
    assert checkpoint.is_file()
    test = subprocess.run([sys.executable, str(REPO / 'tools/mm_test.py'), str(config), str(checkpoint),
                           '--work-dir', str(work)], capture_output=True, text=True, cwd=tmp_path)
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert 'Load checkpoint from' in test.stdout + test.stderr
    assert 'mIoU:' in test.stdout + test.stderr
