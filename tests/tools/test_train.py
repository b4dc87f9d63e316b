"""tools/train.py end to end on CPU: learning on the embedded digits, exact kill-and-resume, 2-process DDP (gloo),
recipes, and one-line errors for bad arguments."""
import glob
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from .tool_runner import REPO, TOOLS, assert_ok, load_tool, read_jsonl, run_script, run_torchrun, tool_env


def test_embedded_default_learns(digits_run):
    out, proc = digits_run
    rows = read_jsonl(os.path.join(out, 'summary.jsonl'))
    assert [r['epoch'] for r in rows] == [0, 1]
    assert rows[-1]['num_updates'] == 2 * (1438 // 32)
    # 10 balanced classes: chance is ~10%. Two short epochs of a 0.4M-parameter net get far above it.
    assert rows[-1]['val_top1'] > 60.0, rows
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
    assert 'final validation accuracy' in proc.stdout
    assert '[train] epoch 1/2 step 10/44' in proc.stdout and 'img/s' in proc.stdout and 'eta' in proc.stdout
    assert 'CUDA graphs: off (the device is cpu)' in proc.stdout
    with open(os.path.join(out, 'summary.csv')) as f:
        assert f.readline().startswith('epoch,num_updates,train_loss')
        assert len(f.readlines()) == 2
    for name in ('last.pth.tar', 'model_best.pth.tar', 'args.yaml', 'train.log'):
        assert os.path.exists(os.path.join(out, name)), name
    assert not glob.glob(os.path.join(out, '*tmp*')), 'temporary checkpoint files left behind'


def _checkpoint_names(out):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, '*.pth.tar')))


def test_embedded_default_keeps_last_and_best_and_checkpoint_hist_keeps_more(digits_run, tmp_path):
    """The demo (embedded data) keeps two checkpoint files, not one per epoch; --checkpoint-hist (timm's flag)
    keeps numbered epoch checkpoints beside them."""
    out, _ = digits_run
    assert _checkpoint_names(out) == ['last.pth.tar', 'model_best.pth.tar']
    more = run_script('train.py', '--model', 'test_resnet', '--img-size', '16', '--epochs', '2', '--batch-size', '64',
                      '--checkpoint-interval', '0', '--checkpoint-hist', '2', '--output', tmp_path)
    assert_ok(more)
    assert _checkpoint_names(tmp_path) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'last.pth.tar',
                                           'model_best.pth.tar']


def _tensors_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def test_kill_and_resume_continues_exactly(tmp_path):
    # 22 updates/epoch, recovery checkpoints every 4 updates, random augmentation, EMA: killed (SIGKILL) after
    # update 30, the run resumes from update 28 (epoch 2, batch 6) and ends bit-identical to an uninterrupted run.
    common = ['--model', 'test_resnet', '--img-size', '16', '--epochs', '2', '--batch-size', '64',
              '--checkpoint-interval', '4', '--model-ema', '--model-ema-decay', '0.9', '--log-interval', '5']
    ref = run_script('train.py', *common, '--output', tmp_path / 'ref')
    assert_ok(ref)
    killed = run_script('train.py', *common, '--output', tmp_path / 'run', '--debug-kill-after-update', '30')
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / 'run' / 'recovery-*'))) == \
        ['recovery-1-2.pth.tar', 'recovery-1-6.pth.tar']  # epoch-0 recoveries were cleared at the epoch end
    ckpt = torch.load(tmp_path / 'run' / 'recovery-1-6.pth.tar', map_location='cpu', weights_only=True)
    assert (ckpt['next_epoch'], ckpt['next_batch'], ckpt['num_updates']) == (1, 6, 28)

    resumed = run_script('train.py', *common, '--output', tmp_path / 'run', '--resume', 'auto')
    assert_ok(resumed)
    assert 'resumed from' in resumed.stdout and 'epoch 1, batch 6/22, update 28' in resumed.stdout

    # the optimizer state restored on resume is the saved one
    a = torch.load(tmp_path / 'ref' / 'last.pth.tar', map_location='cpu', weights_only=True)
    b = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert a['num_updates'] == b['num_updates'] == 44
    for key in ('state_dict', 'state_dict_ema', 'optimizer', 'scheduler'):
        _tensors_equal(a[key], b[key], key)
    rows_a = read_jsonl(tmp_path / 'ref' / 'summary.jsonl')
    rows_b = read_jsonl(tmp_path / 'run' / 'summary.jsonl')
    assert [r['val_top1'] for r in rows_a] == [r['val_top1'] for r in rows_b]


def test_ddp_two_processes_gloo_agree_and_match_one_process(tmp_path):
    # No batch norm (ConvNeXt), no random augmentation, plain SGD: 2 processes x 8 images must give the weights of
    # 1 process x 16 images, which checks the sampler (each global batch holds the same images) and the effective
    # batch (gradients averaged over the ranks).
    common = ['--model', 'test_convnext', '--img-size', '32', '--epochs', '1', '--batch-size', '16', '--opt', 'sgd',
              '--lr', '0.05', '--weight-decay', '0', '--no-aug', '--smoothing', '0', '--debug-max-updates', '5',
              '--log-interval', '5', '--no-model-ema']
    ddp = run_torchrun(2, 'train.py', *common, '--output', tmp_path / 'ddp', '--debug-dump-weights',
                       tmp_path / 'ddp_w')
    assert_ok(ddp)
    assert ddp.stdout.count('[train] epoch 1/1 step 5/89') == 1, 'progress must be logged by rank 0 only'
    assert 'global batch 16 = 2 x 8 x 1' in ddp.stdout
    single = run_script('train.py', *common, '--output', tmp_path / 'one', '--debug-dump-weights', tmp_path / 'one_w')
    assert_ok(single)
    r0 = torch.load(tmp_path / 'ddp_w' / 'rank0.pt', weights_only=True)
    r1 = torch.load(tmp_path / 'ddp_w' / 'rank1.pt', weights_only=True)
    one = torch.load(tmp_path / 'one_w' / 'rank0.pt', weights_only=True)
    init = load_tool('toolkit.cli').create_model('test_convnext', num_classes=10).state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f'ranks disagree on {k}'
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5, msg=f'DDP != single process for {k}')
    assert any(not torch.equal(one[k], init[k]) for k in one if k in init), 'weights did not move'


def test_configs_one_per_zoo_model_and_resolve(tmp_path):
    cli = load_tool('toolkit.cli')
    models = cli.zoo_model_names()
    configs = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, 'configs', 'imagenet',
                                                                                         '*.yaml'))}
    assert models, 'no zoo models registered'
    assert set(models) <= configs, f'missing recipes: {sorted(set(models) - configs)}'
    train = load_tool('train')
    fake = tmp_path / 'imagenet'
    for split in ('train', 'val'):
        (fake / split / 'n0').mkdir(parents=True)
    for name in sorted(configs):
        path = os.path.join(REPO, 'configs', 'imagenet', f'{name}.yaml')
        with open(path) as f:
            text = f.read()
        assert text.startswith('#') and ('Source:' in text or 'publishes no' in text), f'{name}: cite the source'
        raw = yaml.safe_load(text)
        assert raw['model'] == name and raw['epochs'] == 300 and raw['opt'] == 'adamw'
        args = cli.parse_args_with_config(train.build_parser(), ['--config', path, '--data-dir', str(fake)],
                                          presets=train.presets)
        train.resolve_lr(args)
        # lr follows the global batch: 5e-4 per 512 images in every family's recipe
        assert args.lr == pytest.approx(5e-4 * args.batch_size / 512)
        assert args.min_lr == pytest.approx(args.lr * 1e-2) and args.warmup_lr == pytest.approx(args.lr * 1e-3)
        assert args.aa == 'rand-m9-mstd0.5-inc1' and args.mixup == 0.8 and args.cutmix == 1.0
        assert args.smoothing == 0.1 and args.reprob == 0.25 and args.drop_path is not None
        # command-line flags override the file
        over = cli.parse_args_with_config(train.build_parser(), ['--config', path, '--data-dir', str(fake),
                                                                 '--epochs', '7', '--batch-size', '256'])
        assert over.epochs == 7 and over.batch_size == 256 and over.model == name
    spatial = yaml.safe_load(open(os.path.join(REPO, 'configs', 'imagenet', 'spatialmamba_base.yaml')))
    assert spatial['mesa'] == 2.0 and spatial['drop_path'] == 0.5 and spatial['model_ema'] is True
    group = yaml.safe_load(open(os.path.join(REPO, 'configs', 'imagenet', 'groupmamba_tiny.yaml')))
    assert group['distill_type'] == 'hard' and group['distill_teacher'].startswith('regnety_160')
    plain = yaml.safe_load(open(os.path.join(REPO, 'configs', 'imagenet', 'plainmamba_l1.yaml')))
    assert plain['batch_size'] == 2048 and plain['warmup_prefix'] is False and plain['model_ema'] is False


# ------------------------------------------------------------------------------------------------- bad arguments
def test_bad_argument_is_one_line_exit_2_subprocess():
    proc = run_script('train.py', '--model', 'no_such_model_xyz', '--epochs', '1')
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no_such_model_xyz'" in lines[0], proc.stderr


@pytest.mark.parametrize('argv, env, message', [
    (['--model', 'resnet18', '--data-dir', '/no/such/dir'], {}, 'data directory not found'),
    (['--model', 'resnet18', '--batch-size', '3'], {'WORLD_SIZE': '2'}, 'not divisible by 2 process'),
    (['--model', 'resnet18', '--batch-size', '8', '--grad-accum-steps', '3'], {}, 'not divisible'),
    (['--model', 'resnet18', '--resume', 'auto'], {}, '--resume auto needs --output'),
    (['--model', 'resnet18', '--resume', '/no/such.pth.tar'], {}, 'checkpoint not found'),
    (['--epochs', '1'], {}, '--model is required'),
    (['--model', 'resnet18', '--epochs', 'two'], {}, "invalid int value: 'two'"),
    (['--model', 'resnet18', '--mesa', '1.0', '--no-model-ema'], {}, '--mesa needs --model-ema'),
    (['--model', 'test_resnet', '--img-size', '16', '--device', 'cpu', '--cuda-graphs'], {},
     '--cuda-graphs cannot capture this run: the device is cpu'),
    (['--model', 'resnet18', '--checkpoint-hist', '-1'], {}, '--checkpoint-hist must be 0 or more, got -1'),
])
def test_bad_arguments_in_process(argv, env, message, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    train = load_tool('train')
    assert train.run_tool(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cuda_graphs_are_used_wherever_the_run_allows():
    """The default training run on a GPU replays captured updates; each feature that decides on the host
    mid-update turns them off, and the reason is what the log line shows."""
    train = load_tool('train')
    args = train.build_parser().parse_args(['--model', 'test_resnet'])
    cuda = torch.device('cuda')
    assert train.cuda_graph_blocker(args, cuda, 1) is None
    assert train.cuda_graph_blocker(args, torch.device('cpu'), 1) == 'the device is cpu'
    for change, reason in [({}, 'distributed'), ({'compile': True}, '--compile'),
                           ({'grad_accum_steps': 4}, '--grad-accum-steps 4'), ({'amp': 'fp16'}, '--amp fp16'),
                           ({'nan_policy': 'skip'}, '--nan-policy skip'), ({'mesa': 1.0}, '--mesa'),
                           ({'opt': 'lamb'}, '--opt lamb'), ({'debug_nan_at_update': [3]}, 'NaN is injected')]:
        changed = train.build_parser().parse_args(['--model', 'test_resnet'])
        for k, v in change.items():
            setattr(changed, k, v)
        blocker = train.cuda_graph_blocker(changed, cuda, 2 if not change else 1)
        assert blocker is not None and reason in blocker, (change, blocker)


def test_a_failed_default_capture_trains_eagerly(tmp_path):
    """The default CUDA-graph attempt that fails (here: CPU tensors, which capture refuses) warns once and the run
    trains on eagerly, to the same weights as a run that never tried; an explicit --cuda-graphs raises instead.
    Each run is a fresh process, the attempt made as on a GPU by clearing the blocker."""
    common = ['--model', 'test_resnet', '--img-size', '16', '--epochs', '1', '--batch-size', '64',
              '--debug-max-updates', '3', '--device', 'cpu', '--no-model-ema']
    assert_ok(run_script('train.py', *common, '--debug-dump-weights', tmp_path / 'eager', '--output', tmp_path / 'e'))

    def attempted(*extra):
        code = ('import sys; sys.path.insert(0, sys.argv[1]); import train; '
                'train.cuda_graph_blocker = lambda *a: None; sys.exit(train.run_tool(train.main, sys.argv[2:]))')
        return subprocess.run([sys.executable, '-c', code, TOOLS, *common, *map(str, extra)], capture_output=True,
                              text=True, timeout=300, env=tool_env(), cwd=REPO)

    tried = attempted('--debug-dump-weights', tmp_path / 'tried', '--output', tmp_path / 't')
    assert_ok(tried)
    assert 'CUDA graphs: capture failed (ValueError: CUDA graph capture needs CUDA tensors' in tried.stdout + tried.stderr
    eager = torch.load(tmp_path / 'eager' / 'rank0.pt', weights_only=True)
    fell_back = torch.load(tmp_path / "tried" / "rank0.pt", weights_only=True)
    for k in eager:
        assert torch.equal(eager[k], fell_back[k]), k
    forced = attempted('--output', tmp_path / 'f', '--cuda-graphs')
    assert forced.returncode != 0 and 'needs CUDA tensors' in forced.stderr


def test_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('model: resnet18\nlr_bse: 0.1\n')
    train = load_tool('train')
    assert train.run_tool(train.main, ['--config', str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown option 'lr_bse'" in err and 'did you mean lr_base' in err


def test_recipe_features_run_together(tmp_path):
    """Mixup/CutMix, RandAugment, random erasing, EMA, MESA, distillation and accumulation in one short run."""
    teacher = tmp_path / 'teacher.pth'
    torch.save({'model': load_tool('toolkit.cli').create_model('test_resnet', num_classes=10).state_dict()}, teacher)
    proc = run_script('train.py', '--model', 'test_resnet', '--img-size', '16', '--epochs', '1', '--output',
                      tmp_path / 'run', '--mixup', '0.8', '--cutmix', '1.0', '--aa', 'rand-m9-mstd0.5-inc1',
                      '--reprob', '0.25', '--model-ema', '--mesa', '1.0', '--mesa-start', '0', '--distill-type', 'hard',
                      '--distill-teacher', 'test_resnet', '--distill-teacher-checkpoint', teacher,
                      '--grad-accum-steps', '2', '--batch-size', '64', '--debug-max-updates', '4', '--log-interval', '2')
    assert_ok(proc)
    assert 'global batch 64 = 1 x 32 x 2 accumulation' in proc.stdout and 'ema top1' in proc.stdout


def test_randaugment_zero_bit_posterize_gives_black_image():
    from PIL import Image, ImageOps
    from timm.data import auto_augment
    load_tool('toolkit.image_data').keep_zero_bit_posterize()
    img = Image.frombytes('RGB', (4, 4), bytes(range(48)))
    black = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(img)  # 4 - 4 = 0 bits
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    two_bits = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img)  # 4 - 2 = 2 bits
    assert two_bits.tobytes() == ImageOps.posterize(img, 2).tobytes()


@pytest.mark.parametrize('sched', ['cosine', 'step'])
def test_scheduler_gets_numbers_that_older_timm_needs(sched, monkeypatch):
    """timm 1.0.29-1.0.30 (setup.cfg allows them) multiply decay_epochs by the updates per epoch for every
    schedule, so it must never be None; the resulting schedule must still be the requested one."""
    import timm.scheduler
    train = load_tool('train')
    real = timm.scheduler.create_scheduler_v2
    seen = {}

    def strict(optimizer, **kwargs):
        seen.update(kwargs)
        assert all(v is not None for v in kwargs.values()), {k: v for k, v in kwargs.items() if v is None}
        return real(optimizer, **kwargs)

    monkeypatch.setattr(timm.scheduler, 'create_scheduler_v2', strict)
    args = train.build_parser().parse_args(['--model', 'resnet18', '--sched', sched, '--epochs', '10',
                                            '--warmup-epochs', '2'])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train.build_scheduler(args, optimizer, warmup_lr=0.01, min_lr=0.001, steps_per_epoch=5)
    assert seen['decay_epochs'] == 90 and seen['updates_per_epoch'] == 5
    scheduler.step_update(2 * 5)  # end of warmup: the peak lr
    assert optimizer.param_groups[0]['lr'] == pytest.approx(1.0)
    scheduler.step_update(10 * 5)
    want = 0.001 if sched == 'cosine' else 1.0  # cosine reaches min_lr; a 90-epoch step never decays in 10
    assert optimizer.param_groups[0]['lr'] == pytest.approx(want, rel=1e-6)


FAILING_RANK = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from toolkit import evaluation
import train

class Runtime:  # a rank of a distributed run
    distributed, rank, world_size = True, 0, 2

def fail(*args):
    raise RuntimeError('rank 0 failed')

# NCCL's teardown waits for the peers, which wait in their next collective: it never returns.
dist.is_initialized = lambda: True
dist.destroy_process_group = lambda *args, **kwargs: time.sleep(600)
evaluation.init_runtime = lambda device: Runtime()
train._train = fail
train.run_tool(train.main, ['--model', 'test_convnext', '--epochs', '1'])
"""


def test_failing_rank_exits_without_waiting_for_the_process_group():
    proc = subprocess.run([sys.executable, '-c', FAILING_RANK, TOOLS], capture_output=True, text=True, timeout=60,
                          env=tool_env(), cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'RuntimeError: rank 0 failed' in proc.stderr


def test_ddp_rank_failure_ends_the_job_with_its_traceback(tmp_path):
    """Rank 0 fails writing its first checkpoint (last.pth.tar is a directory) while rank 1 goes on to its next
    collective: the job must end promptly with rank 0's error. (gloo's teardown does not block as NCCL's does:
    the test above covers that.)"""
    out = tmp_path / 'run'
    (out / 'last.pth.tar').mkdir(parents=True)
    start = time.monotonic()
    proc = run_torchrun(2, 'train.py', '--model', 'test_convnext', '--img-size', '32', '--epochs', '2',
                        '--batch-size', '16', '--no-aug', '--debug-max-updates', '2', '--no-model-ema',
                        '--output', out, timeout=240)
    assert proc.returncode != 0
    assert 'last.pth.tar' in proc.stderr and 'Traceback' in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 200
