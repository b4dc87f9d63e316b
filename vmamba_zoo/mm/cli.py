"""Command-line plumbing shared by tools/mm_train.py and tools/mm_test.py."""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.runner.checkpoint import CheckpointLoader


def safe_local_checkpoints():
    """Let mmengine load local checkpoints that hold more than tensors, without running code from them.

    mmengine's own checkpoints store its message hub (HistoryBuffer objects holding numpy arrays) and numpy
    values, which torch's ``weights_only=True`` default refuses, so neither ``--resume`` nor testing a trained
    model would work. They are read by :func:`vmamba_zoo.checkpoint.read_checkpoint` with those classes rebuilt
    for real; any other class a file pickles becomes inert, so a downloaded file cannot run code.
    """
    from mmengine.logging import HistoryBuffer

    from ..checkpoint import numpy_trusted, read_checkpoint

    trusted = (HistoryBuffer,) + numpy_trusted()

    def load_from_local(filename, map_location):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return read_checkpoint(filename, map_location=map_location, trusted=trusted)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def build_parser(description: str, test: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config', help='mmdet or mmseg config file')
    if test:
        parser.add_argument('checkpoint', help='checkpoint of the whole detector/segmentor to evaluate')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: ./work_dirs/<config name>)')
    if not test:
        parser.add_argument(
            '--resume', nargs='?', type=str, const='auto',
            help='resume from this checkpoint, or without a value from the latest one in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, e.g. model.backbone.init_cfg.checkpoint=weights.pth '
             'train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch'], default='none',
                        help="'pytorch' when started by torchrun")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line overrides in mmdet's/mmseg's order."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    safe_local_checkpoints()
    import vmamba_zoo.mm  # noqa: F401  registers the backbones even where a config lacks custom_imports

    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if getattr(args, 'checkpoint', None) is not None:
        cfg.load_from = args.checkpoint
    if args.amp:
        if getattr(args, 'checkpoint', None) is not None:
            cfg.test_cfg = dict(cfg.get('test_cfg') or {}, fp16=True)
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    resume = getattr(args, 'resume', None)
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        cfg.resume, cfg.load_from = True, resume
    return cfg
