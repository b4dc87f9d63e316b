#!/usr/bin/env python3
"""Train an image classifier (any zoo or timm model) with timm's components.

Quick start, no data to download (scikit-learn's handwritten digits, CPU is enough)::

    python tools/train.py --model groupmamba_tiny --epochs 2      # ~96% top-1, a few minutes on one CPU core

ImageNet with a family's published recipe (``--batch-size`` is the GLOBAL batch: processes x per-process batch x
gradient accumulation; the learning rate is scaled from ``lr_base`` by batch / ``lr_base_size``)::

    torchrun --nproc-per-node 8 tools/train.py --config configs/imagenet/groupmamba_tiny.yaml --data-dir /imagenet
    python tools/train.py --config configs/imagenet/groupmamba_tiny.yaml --data-dir /imagenet --grad-accum-steps 8

Option precedence: built-in defaults < defaults for the embedded dataset < ``--config`` YAML < command line.
The built-in defaults are the recipe shared by the zoo's families (Swin-style: AdamW, lr 5e-4 per 512 images,
weight decay 0.05, 20 warmup epochs, cosine, RandAugment, Mixup/CutMix, random erasing, label smoothing, EMA,
gradient clipping); the configs spell each family's recipe out with its source.

On a GPU each update (forward, loss, backward, gradient clipping, optimizer step) is captured once as a CUDA graph
and then replayed, one launch instead of thousands, which is where host-bound models gain (``--no-cuda-graphs``
trains eagerly). A run that decides on the host in mid-update trains eagerly instead, and its ``CUDA graphs:`` log
line says why: DDP, gradient accumulation, fp16 loss scaling, ``--nan-policy skip``, MESA, ``--compile``, or an
optimizer other than adam/adamw. A capture that fails warns and the run trains on eagerly.

Interrupted runs: ``--resume auto`` (with the same ``--output``) continues from the newest checkpoint, epoch-end or
mid-epoch (every ``--checkpoint-interval`` updates): model, optimizer, scheduler, EMA, AMP scaler, epoch, position
in the epoch and random states. The data order is a function of (seed, epoch) alone, so the resumed run sees the
same batches; with ``--workers 0`` (the embedded dataset's default) it reproduces the uninterrupted run bit for bit,
while loader processes re-draw their augmentations.

Training state is kept safe (README, "Guarantees"):
- every checkpoint is written to a temporary file, fsynced, then renamed: a crash or a full disk leaves the previous
  file intact; ``last``, ``checkpoint-N`` and ``model_best`` are independent copies, never hard links;
- ``--resume auto`` takes the newest checkpoint that reads back whole, and names in one warning line each file it
  skipped and why; if none reads, it stops rather than start afresh over the run's history;
- an explicit ``--resume FILE`` that cannot be read is a one-line error (exit 2);
- summary.jsonl, summary.csv and train.log are only ever appended to: an epoch redone after a resume gets a second
  row, the later one counts;
- a NaN or inf loss follows ``--nan-policy``: ``stop`` (default) ends the run with one line naming the epoch, step
  and update, before any checkpoint holds the damaged weights; ``skip`` drops that update (no optimizer step, no EMA
  update) and counts the skipped updates in the progress lines and in summary.jsonl (``skipped_steps``).
"""
import argparse
import csv
import glob
import json
import logging
import math
import os
import random
import signal
import sys
import time
import traceback
from datetime import datetime, timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from toolkit.cli import (
    ToolArgumentParser, UsageError, create_model, import_zoo, parse_args_with_config, parse_key_values,
    require_model, run_tool,
)

_logger = logging.getLogger('train')

DIGITS_PRESET = dict(
    # Small grey digits: no flips (a mirrored 2 is not a 2), mild crops, no colour or mixing augmentations, a short
    # schedule with no warmup and no EMA (0.9999 would not move in a few hundred steps), single-process loading.
    img_size=32, crop_pct=1.0, hflip=0.0, scale=[0.7, 1.0], color_jitter=0.0, aa=None, reprob=0.0,
    mixup=0.0, cutmix=0.0, epochs=5, warmup_epochs=0.0, batch_size=32, lr_base=1e-3, lr_base_size=32,
    model_ema=False, workers=0, log_interval=10, drop_path=0.0,
    checkpoint_hist=0,  # a demo keeps ``last`` and ``model_best`` only (each a full copy with optimizer state)
)


def build_parser() -> argparse.ArgumentParser:
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', '-m', default=None, help='zoo or timm model name (e.g. groupmamba_tiny, resnet50)')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                   help='start from the pretrained_cfg weights (fine-tuning; the classifier is reset if needed)')
    g.add_argument('--initial-checkpoint', default=None, help='start from these weights (zoo or official format)')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of classes of the data')
    g.add_argument('--drop', type=float, default=None, help='classifier dropout (default: the model default)')
    g.add_argument('--drop-path', type=float, default=None, help='stochastic depth rate (default: the model default)')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE', help='extra model constructor args')
    g.add_argument('--grad-checkpointing', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the model')
    g.add_argument('--cuda-graphs', action=argparse.BooleanOptionalAction, default=None,
                   help='replay each update (forward, backward, clipping, optimizer step) as one captured CUDA graph. '
                        'Default: on wherever the run allows it (the log says which and why not); --cuda-graphs '
                        'makes a run that does not allow it an error')
    g.add_argument('--sync-bn', action=argparse.BooleanOptionalAction, default=False)

    g = p.add_argument_group('data')
    g.add_argument('--data-dir', '--data', default=None,
                   help='ImageFolder root with train/ and val/; omitted: the embedded digits dataset')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val')
    g.add_argument('--img-size', type=int, default=None, help='default: the model pretrained_cfg input size')
    g.add_argument('--crop-pct', type=float, default=None, help='validation center-crop fraction')
    g.add_argument('--interpolation', default=None, help='default: the model pretrained_cfg interpolation')
    g.add_argument('--mean', type=float, nargs=3, default=None)
    g.add_argument('--std', type=float, nargs=3, default=None)
    g.add_argument('--workers', '-j', type=int, default=8, help='data loading processes per training process')
    g.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=True)

    g = p.add_argument_group('augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', default=False,
                   help='train on resize + center crop only (deterministic data)')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='RandomResizedCrop area range')
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='RandomResizedCrop aspect range')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="RandAugment/AutoAugment policy, 'none' to disable")
    g.add_argument('--train-interpolation', default='random', help="training resize interpolation ('random' = timm)")
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0 = off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0 = off)')
    g.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')

    g = p.add_argument_group('optimization')
    g.add_argument('--epochs', type=int, default=300, help='total epochs, warmup included')
    g.add_argument('--batch-size', '-b', type=int, default=1024,
                   help='GLOBAL batch per optimizer update (processes x per-process batch x accumulation)')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--val-batch-size', type=int, default=None, help='per process; default: the per-process batch')
    g.add_argument('--opt', default='adamw')
    g.add_argument('--opt-eps', type=float, default=1e-8)
    g.add_argument('--opt-betas', type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--clip-grad', type=float, default=5.0, help='0 or negative = off')
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'])
    g.add_argument('--lr', type=float, default=None, help='absolute peak lr (overrides lr_base scaling)')
    g.add_argument('--lr-base', type=float, default=5e-4, help='peak lr for a global batch of lr_base_size')
    g.add_argument('--lr-base-size', type=int, default=512)
    g.add_argument('--lr-base-scale', default='linear', choices=['linear', 'sqrt'])
    g.add_argument('--sched', default='cosine')
    g.add_argument('--warmup-epochs', type=float, default=20)
    g.add_argument('--warmup-prefix', action=argparse.BooleanOptionalAction, default=True,
                   help='the cosine starts after the warmup and ends at --epochs (Swin); else it spans all epochs')
    g.add_argument('--warmup-lr', type=float, default=None, help='absolute; default lr x warmup_lr_ratio')
    g.add_argument('--warmup-lr-ratio', type=float, default=1e-3)
    g.add_argument('--min-lr', type=float, default=None, help='absolute; default lr x min_lr_ratio')
    g.add_argument('--min-lr-ratio', type=float, default=1e-2)
    g.add_argument('--decay-epochs', type=float, default=None, help='step schedules')
    g.add_argument('--decay-rate', type=float, default=0.1)

    g = p.add_argument_group('EMA, self-distillation (MESA) and distillation')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True)
    g.add_argument('--model-ema-decay', type=float, default=0.9999)
    g.add_argument('--model-ema-warmup', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--model-ema-force-cpu', action=argparse.BooleanOptionalAction, default=False)
    g.add_argument('--mesa', type=float, default=0.0,
                   help='weight of the loss towards the EMA model predictions (Spatial-Mamba); needs --model-ema')
    g.add_argument('--mesa-start', type=float, default=0.25, help='fraction of the epochs after which MESA starts')
    g.add_argument('--distill-teacher', default=None,
                   help='timm teacher (e.g. regnety_160.deit_in1k, GroupMamba/DeiT); pretrained weights are loaded')
    g.add_argument('--distill-teacher-checkpoint', default=None, help='teacher weights file instead of pretrained')
    g.add_argument('--distill-type', default='none', choices=['none', 'soft', 'hard'])
    g.add_argument('--distill-alpha', type=float, default=0.5)
    g.add_argument('--distill-tau', type=float, default=1.0)

    g = p.add_argument_group('run')
    g.add_argument('--output', '-o', default=None, help='run folder (default output/train/<time>-<model>)')
    g.add_argument('--resume', default=None, help="checkpoint to resume, or 'auto': the newest in --output (if any)")
    g.add_argument('--checkpoint-interval', type=int, default=500,
                   help='also checkpoint every N updates within an epoch (0 = only at epoch ends)')
    g.add_argument('--checkpoint-hist', '--keep-checkpoints', type=int, default=3,
                   help='numbered epoch checkpoints kept (best metric first) beside last and model_best; 0 = none')
    g.add_argument('--nan-policy', default='stop', choices=['stop', 'skip'],
                   help="a NaN/inf loss: 'stop' ends the run naming the epoch and step (no checkpoint holds the "
                        "damaged weights); 'skip' drops that update and counts the skipped updates in the log")
    g.add_argument('--val-interval', type=int, default=1, help='validate every N epochs (and after the last)')
    g.add_argument('--log-interval', type=int, default=50, help='progress line every N updates')
    g.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'], help='autocast dtype')
    g.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cuda' or 'cpu'")
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--print-config', action='store_true',
                   help='print the resolved options (defaults < dataset defaults < config < flags) as YAML and exit')
    # test hooks (not shown in --help)
    g.add_argument('--debug-kill-after-update', type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument('--debug-dump-weights', default=None, help=argparse.SUPPRESS)
    g.add_argument('--debug-max-updates', type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument('--debug-nan-at-update', type=int, nargs='*', default=None, help=argparse.SUPPRESS)
    return p


def presets(known) -> dict:
    return dict(DIGITS_PRESET) if not known.get('data_dir') else {}


# --------------------------------------------------------------------------------------------------------- losses
class DistillationLoss(nn.Module):
    """DeiT's distillation objective (GroupMamba): (1 - alpha) * base + alpha * teacher term.

    A model returning (class logits, distillation logits) in training (timm's ``set_distilled_training``) is taught by
    the teacher through its distillation head; a model with one output is taught through that output.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float):
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, inputs, outputs, targets):
        outputs_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base(outputs, targets)
        if outputs_kd is None:
            outputs_kd = outputs
        with torch.no_grad():
            teacher_out = self.teacher(inputs).float()
        outputs_kd = outputs_kd.float()
        if self.kind == 'soft':
            t = self.tau
            kd = F.kl_div(F.log_softmax(outputs_kd / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                          reduction='sum', log_target=True) * (t * t) / outputs_kd.numel()
        else:
            kd = F.cross_entropy(outputs_kd, teacher_out.argmax(dim=1))
        return base_loss * (1 - self.alpha) + kd * self.alpha


class BaseLoss(nn.Module):
    """The classification loss; several heads (a tuple of logits) share it equally."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion = criterion

    def forward(self, inputs, outputs, targets):
        if isinstance(outputs, (tuple, list)):
            return sum(self.criterion(o, targets) for o in outputs) / len(outputs)
        return self.criterion(outputs, targets)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _make_saver_class():
    """The checkpoint saver class (timm imported on first use); an internal the reliability tests build too."""
    from timm.utils import CheckpointSaver
    from timm.utils.model import get_state_dict

    from vmamba_zoo.checkpoint import TRAIN_FORMAT, atomic_copy, atomic_save

    class TrainingCheckpointSaver(CheckpointSaver):
        """timm's CheckpointSaver (ranked epoch checkpoints, ``last``, ``model_best``, recovery files), writing in
        addition what an exact resume needs: scheduler, position in the epoch, update count, random states.

        Every file is written atomically (temporary file, fsync, rename) and ``last`` / ``checkpoint-N`` /
        ``model_best`` are independent copies: timm hard-links them, so one damaged file would damage all three.
        """

        def __init__(self, *args, extra_state, max_history=10, **kwargs):
            super().__init__(*args, max_history=max(max_history, 1), **kwargs)  # timm's saver wants 1 or more
            self.numbered = max_history > 0
            self.extra_state = extra_state  # callable -> dict, evaluated at save time

        def save_checkpoint(self, epoch, metric=None):
            best = super().save_checkpoint(epoch, metric)
            if not self.numbered:  # timm wrote ``model_best`` from ``last`` where due; its numbered copy goes
                for path, _ in self.checkpoint_files:
                    os.remove(path)
                self.checkpoint_files = []
            return best

        def _save(self, save_path, epoch, metric=None):
            state = {
                'format': TRAIN_FORMAT,
                'version': 2,
                'epoch': epoch,
                'arch': self.args['model'],
                'args': self.args,
                'state_dict': get_state_dict(self.model, self.unwrap_fn),
                'optimizer': self.optimizer.state_dict(),
            }
            if self.model_ema is not None:
                state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
            if self.amp_scaler is not None:
                state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
            if metric is not None:
                state['metric'] = metric
            state['saver'] = self.state_dict(epoch, metric)
            state.update(self.extra_state())
            atomic_save(state, save_path)  # save_path is itself a temporary name that the caller renames

        def _replace(self, src, dst):
            # timm unlinks dst first (for Windows), which leaves no ``last`` at all if the process dies in between
            os.replace(src, dst)

        def _duplicate(self, src, dst):
            atomic_copy(src, dst)

        # timm 1.0.31 keeps the checkpoint ranking across a resume (state_dict/load_state_dict); older savers
        # (setup.cfg allows timm >= 1.0.29) have the same fields, which these fallbacks save and restore.
        def state_dict(self, epoch=None, metric=None):
            if hasattr(CheckpointSaver, 'state_dict'):
                return super().state_dict(epoch, metric)
            return {'checkpoint_files': [(os.path.basename(f), m) for f, m in self.checkpoint_files],
                    'best_epoch': self.best_epoch, 'best_metric': self.best_metric, 'pending': (epoch, metric)}

        def load_state_dict(self, state_dict):
            if hasattr(CheckpointSaver, 'load_state_dict'):
                return super().load_state_dict(state_dict)
            files = [(os.path.join(self.checkpoint_dir, f), m) for f, m in state_dict.get('checkpoint_files', [])]
            epoch, metric = state_dict.get('pending', (None, None))
            if epoch is not None:  # the checkpoint this state was written into, if it was kept
                files.append((os.path.join(self.checkpoint_dir, f'{self.save_prefix}-{epoch}{self.extension}'), metric))
            kept = {}  # path -> metric, first entry of each file still on disk
            for path, m in files:
                if os.path.exists(path):
                    kept.setdefault(path, m)
            self.checkpoint_files = sorted(kept.items(), key=lambda x: x[1], reverse=not self.decreasing)
            self.best_epoch, self.best_metric = state_dict.get('best_epoch'), state_dict.get('best_metric')

        def remove_recovery_files(self):
            for path in glob.glob(os.path.join(self.recovery_dir, self.recovery_prefix + '-*' + self.extension)):
                os.remove(path)
            self.curr_recovery_file = self.prev_recovery_file = ''

    return TrainingCheckpointSaver


_RESUME_CANDIDATES = ('last.pth.tar', 'recovery-*.pth.tar', 'checkpoint-*.pth.tar', 'model_best.pth.tar')


def _read_training_checkpoint(path: str, mmap: bool = False):
    """A checkpoint of tools/train.py, read safely; CheckpointError (one line) if it is unreadable or another kind."""
    from vmamba_zoo.checkpoint import CheckpointError, is_training_checkpoint, read_checkpoint
    ckpt = read_checkpoint(path, mmap=mmap)
    if not is_training_checkpoint(ckpt):
        raise CheckpointError(f'{path} is not a training checkpoint of tools/train.py')
    if not isinstance(ckpt.get('num_updates'), int) or not isinstance(ckpt.get('state_dict'), dict):
        raise CheckpointError(f'{path} is incomplete (no num_updates / state_dict)')
    return ckpt


def find_resume_checkpoint(resume: str, output_dir: str, warn=None):
    """``(path, checkpoint)`` to resume: the named file, or for 'auto' the newest checkpoint in ``output_dir`` that
    reads back whole (most updates; ``last``, ``recovery-*``, ``checkpoint-*``, ``model_best``), or ``(None, None)``
    when the folder holds none. Files skipped on the way are named, with the reason, in one ``warn`` line.
    """
    from vmamba_zoo.checkpoint import CheckpointError

    if resume != 'auto':
        if not os.path.isfile(resume):
            raise UsageError(f'--resume checkpoint not found: {resume}')
        try:
            return resume, _read_training_checkpoint(resume)
        except CheckpointError as e:
            raise UsageError(f'cannot resume from {resume}: {_reason(e, resume)}') from None
    paths = []
    for pattern in _RESUME_CANDIDATES:
        paths += sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern)))
    skipped, ranked = [], []
    for order, path in enumerate(paths):
        try:  # the metadata only (tensors memory-mapped): cheap, and it orders the candidates
            updates = _read_training_checkpoint(path, mmap=True)['num_updates']
        except CheckpointError as e:
            skipped.append((path, _reason(e, path)))
            continue
        ranked.append((-updates, order, path))
    found = (None, None)
    for _, _, path in sorted(ranked):
        try:
            found = path, _read_training_checkpoint(path)
            break
        except CheckpointError as e:
            skipped.append((path, _reason(e, path)))
    if skipped and warn is not None:
        names = '; '.join(f'{os.path.basename(p)} ({why})' for p, why in skipped)
        target = f'resuming from {os.path.basename(found[0])}' if found[0] else 'no readable checkpoint left'
        warn(f'--resume auto: skipped {names}; {target}')
    if found[0] is None and skipped:
        raise UsageError(f'--resume auto: no readable checkpoint in {output_dir} (skipped '
                         f'{", ".join(os.path.basename(p) for p, _ in skipped)}); starting afresh would run over '
                         f'its history: move the run folder or its checkpoints away first')
    return found


def _reason(error: Exception, path: str) -> str:
    """The one-line reason of a CheckpointError, without the path it already names."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    for prefix in (f'cannot read checkpoint {path}: ', f'{path} '):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _rng_state():
    """Random states as plain Python values (picklable everywhere, loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        'torch': torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state):
    random.setstate(_tuplify(state['python']))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state['torch'], dtype=torch.uint8))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state['cuda'], dtype=torch.uint8))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------- setup
def _setup_logging(rt, output_dir):
    level = logging.INFO if rt.is_main else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if rt.is_main:
        handlers.append(logging.FileHandler(os.path.join(output_dir, 'train.log')))
    fmt = logging.Formatter('%(message)s')
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger('timm').setLevel(logging.WARNING)


def _validate_args(args, world_size):
    """Every check that can fail without touching data or devices, before any process group exists."""
    if not args.model:
        raise UsageError('--model is required (on the command line or as model: in --config)')
    require_model(args.model)
    if args.epochs < 1:
        raise UsageError(f'--epochs must be >= 1, got {args.epochs}')
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise UsageError('--batch-size and --grad-accum-steps must be >= 1')
    if args.batch_size % (world_size * args.grad_accum_steps):
        raise UsageError(f'--batch-size {args.batch_size} (global) is not divisible by {world_size} process(es) x '
                         f'{args.grad_accum_steps} accumulation step(s)')
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UsageError(f'data directory not found: {args.data_dir}')
    if args.data_dir:
        for split in (args.train_split, args.val_split):
            if not os.path.isdir(os.path.join(args.data_dir, split)):
                raise UsageError(f"data directory {args.data_dir} has no '{split}/' folder")
    if args.mesa > 0 and not args.model_ema:
        raise UsageError('--mesa needs --model-ema (it distils from the EMA model)')
    if args.distill_type != 'none' and not args.distill_teacher:
        raise UsageError(f'--distill-type {args.distill_type} needs --distill-teacher')
    if args.resume == 'auto' and not args.output:
        raise UsageError("--resume auto needs --output (the run folder to look in)")
    if args.resume and args.resume != 'auto' and not os.path.isfile(args.resume):
        raise UsageError(f'--resume checkpoint not found: {args.resume}')
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise UsageError(f'--initial-checkpoint not found: {args.initial_checkpoint}')
    if args.checkpoint_hist < 0:
        raise UsageError(f'--checkpoint-hist must be 0 or more, got {args.checkpoint_hist}')
    if args.amp == 'fp16' and args.device == 'cpu':
        _logger.warning('fp16 autocast on CPU is slow; bf16 is the usual CPU choice')


CAPTURABLE_OPTIMIZERS = ('adam', 'adamw')  # torch's, which keep their step counts on the device when capturable


def cuda_graph_blocker(args, device: torch.device, world_size: int):
    """Why the updates of this run cannot replay as one captured CUDA graph each, or None when they can.
    A captured update is one fixed sequence of kernels: anything that decides on the host mid-update rules it out."""
    if device.type != 'cuda':
        return f'the device is {device.type}'
    if world_size > 1:
        return 'distributed training (DDP synchronises gradients outside the graph)'
    if args.compile:
        return '--compile (torch.compile(mode="reduce-overhead") captures graphs of its own)'
    if args.grad_accum_steps > 1:
        return f'--grad-accum-steps {args.grad_accum_steps} (one update is several forward/backward passes)'
    if args.amp == 'fp16':
        return '--amp fp16 (the loss scaler checks for inf gradients on the host)'
    if args.nan_policy == 'skip':
        return '--nan-policy skip (each loss is checked on the host before its backward)'
    if args.mesa > 0:
        return '--mesa (the EMA teacher changes from epoch to epoch)'
    if args.opt.lower() not in CAPTURABLE_OPTIMIZERS:
        return f'--opt {args.opt} (capturable optimizers: {", ".join(CAPTURABLE_OPTIMIZERS)})'
    if args.debug_nan_at_update:
        return 'a NaN is injected into chosen updates'
    return None


def set_capturable(optimizer, capturable: bool):
    """Switch the param groups that have the option (Adam-style) between device-side step counts (needed inside
    a captured update) and host ones."""
    for group in optimizer.param_groups:
        if 'capturable' in group:
            group['capturable'] = capturable


def resolve_lr(args) -> str:
    """Fill args.lr / warmup_lr / min_lr from the global batch; returns how lr was obtained."""
    if args.lr is None:
        ratio = args.batch_size / args.lr_base_size
        args.lr = args.lr_base * (math.sqrt(ratio) if args.lr_base_scale == 'sqrt' else ratio)
        note = f'lr {args.lr:.3g} = {args.lr_base:g} x {args.batch_size}/{args.lr_base_size} ({args.lr_base_scale})'
    else:
        note = f'lr {args.lr:.3g} (absolute)'
    if args.warmup_lr is None:
        args.warmup_lr = args.lr * args.warmup_lr_ratio
    if args.min_lr is None:
        args.min_lr = args.lr * args.min_lr_ratio
    return note


def _mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def _build_model(args, num_classes):
    kwargs = parse_key_values(args.model_kwargs)
    if args.drop is not None:
        kwargs['drop_rate'] = args.drop
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    model = create_model(args.model, img_size=args.img_size, pretrained=args.pretrained, num_classes=num_classes,
                         **kwargs)
    if args.initial_checkpoint:
        from toolkit.checkpoint_io import extract_state_dict, read_checkpoint
        state_dict, how = extract_state_dict(read_checkpoint(args.initial_checkpoint), model)
        own = model.state_dict()
        dropped = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        for k in dropped:  # a classifier for another number of classes: keep the fresh one
            del state_dict[k]
        result = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if k not in dropped]
        if missing or result.unexpected_keys:
            raise UsageError(f'--initial-checkpoint does not fit {args.model}: missing {missing[:5]}, '
                             f'unexpected {result.unexpected_keys[:5]}')
        _logger.info(f'initial weights: {args.initial_checkpoint} ({how}); re-initialised: {dropped or "none"}')
    return model


def _data_config(args, model):
    from timm.data import resolve_data_config
    overrides = {}
    if args.img_size is not None:
        overrides['input_size'] = (3, args.img_size, args.img_size)
    for key in ('crop_pct', 'interpolation', 'mean', 'std'):
        if getattr(args, key) is not None:
            overrides[key] = tuple(getattr(args, key)) if key in ('mean', 'std') else getattr(args, key)
    return resolve_data_config(overrides, model=model)


def _build_transforms(args, data_config):
    from timm.data import create_transform

    from toolkit.image_data import keep_zero_bit_posterize
    keep_zero_bit_posterize()
    train_tf = create_transform(
        input_size=data_config['input_size'], is_training=True, no_aug=args.no_aug,
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter if args.color_jitter > 0 else None,
        auto_augment=None if (args.aa in (None, 'none', '')) else args.aa,
        interpolation=args.train_interpolation if not args.no_aug else data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
    )
    eval_tf = create_transform(
        input_size=data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
    )
    return train_tf, eval_tf


def _fmt_time(seconds):
    return str(timedelta(seconds=int(max(seconds, 0))))


class EpochLog:
    """summary.jsonl and summary.csv: one row per epoch, only ever appended to.

    A resumed run keeps every earlier row, even of epochs it redoes (the later row of an epoch is the one that
    counts): a resume from an older checkpoint never erases history. summary.jsonl is appended line by line (a line
    torn by a crash is closed and skipped); summary.csv is rebuilt from it through a temporary file.
    """

    def __init__(self, output_dir):
        self.csv_path = os.path.join(output_dir, 'summary.csv')
        self.json_path = os.path.join(output_dir, 'summary.jsonl')
        self.rows = []
        if os.path.exists(self.json_path):
            with open(self.json_path, 'rb') as f:
                data = f.read()
            for line in data.decode('utf-8', 'replace').splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    self.rows.append(row)
            if data and not data.endswith(b'\n'):
                with open(self.json_path, 'ab') as f:
                    f.write(b'\n')

    def append(self, row):
        self.rows.append(row)
        with open(self.json_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
            f.flush()
            os.fsync(f.fileno())
        keys = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        with open(self.csv_path + '.tmp', 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(self.csv_path + '.tmp', self.csv_path)


# ----------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = build_parser()
    args = parse_args_with_config(parser, argv, presets=presets)
    import_zoo()

    from toolkit.evaluation import autocast_context, evaluate, init_runtime, world_from_env
    env = world_from_env()
    _validate_args(args, env.world_size)
    if args.print_config:
        import yaml
        resolve_lr(args)
        print(yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                              if not k.startswith('debug_') and k != 'print_config'}, sort_keys=False), end='')
        return 0

    rt = init_runtime(args.device)
    try:
        result = _train(args, rt, autocast_context, evaluate)
    except BaseException as e:
        if rt.distributed:
            _leave_after_failure(e)
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


class NonFiniteLossError(UsageError):
    """A NaN/inf loss under ``--nan-policy stop``: reported as one line (exit status 2), like a usage error."""

    def __init__(self, update: int, steps_per_epoch: int, epochs: int):
        epoch, step = (update - 1) // steps_per_epoch, (update - 1) % steps_per_epoch + 1
        self.update, self.epoch, self.step = update, epoch, step
        super().__init__(
            f'loss is not finite (nan or inf) at epoch {epoch + 1}/{epochs}, step {step}/{steps_per_epoch} '
            f'(update {update}); stopped under --nan-policy stop before any checkpoint held the damaged weights: '
            f'--resume auto continues from the newest checkpoint (consider a lower --lr, or --nan-policy skip)')


def _leave_after_failure(error: BaseException):
    """A rank that fails reports and exits at once, so that torchrun stops the others: tearing down an NCCL
    group waits for the peers, which sit in their next collective, and the job would hang."""
    if isinstance(error, UsageError):
        print(f'train.py: error: {error}', file=sys.stderr)
        code = 2
    else:
        traceback.print_exception(error)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def build_scheduler(args, optimizer, warmup_lr, min_lr, steps_per_epoch):
    """timm's scheduler, stepped per update. Every number is passed explicitly: timm 1.0.29-1.0.30 multiplies
    decay_epochs by the updates per epoch even for schedules that ignore it, so None breaks them."""
    from timm.scheduler import create_scheduler_v2

    cosine_epochs = args.epochs - (args.warmup_epochs if args.warmup_prefix else 0)
    decay_epochs = args.decay_epochs
    if decay_epochs is None:  # timm's own defaults
        decay_epochs = 0.2 if args.sched in ('wsd', 'rsqrt') else 90
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=cosine_epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=warmup_lr, min_lr=min_lr, warmup_prefix=args.warmup_prefix, decay_epochs=decay_epochs,
        decay_rate=args.decay_rate, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return lr_scheduler


def _train(args, rt, autocast_context, evaluate):
    return _TrainingRun(args, rt, autocast_context, evaluate).run()


class _TrainingRun:
    """One training run, built in steps (run folder, data and model, optimizer, loaders, schedule, losses,
    checkpoints and resume, the module the steps call), then trained epoch by epoch, update by update."""

    def __init__(self, args, rt, autocast_context, evaluate):
        self.args, self.rt, self.autocast_context, self.evaluate = args, rt, autocast_context, evaluate
        self.output_dir = self._make_output_dir()
        _setup_logging(rt, self.output_dir)
        _seed_everything(args.seed + rt.rank)
        self._build_data_and_model()
        self._build_optimizer()
        self._build_loaders()
        self.lr_scheduler = build_scheduler(args, self.optimizer, self.warmup_lr, self.min_lr, self.steps_per_epoch)
        self._build_losses()
        self._build_saver()
        self._resume()
        self._wrap_model()
        self._log_setup()
        self._init_nonfinite_checks()

    # ------------------------------------------------------------------------------------------------- setup steps
    def _make_output_dir(self):
        """The run folder, the same on every rank."""
        args, rt = self.args, self.rt
        output_dir = args.output or os.path.join(
            'output', 'train', f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.model.replace('/', '_')}")
        if rt.distributed:
            holder = [output_dir]
            dist.broadcast_object_list(holder, src=0)
            output_dir = holder[0]
        if rt.is_main:
            os.makedirs(output_dir, exist_ok=True)
        if rt.distributed:
            dist.barrier()
        return output_dir

    def _num_classes(self):
        args = self.args
        if args.data_dir:  # ImageFolder: one class per sub-folder
            root = os.path.join(args.data_dir, args.train_split)
            data_classes = sum(1 for d in os.scandir(root) if d.is_dir())
        else:
            from toolkit.image_data import EmbeddedDigits
            data_classes = EmbeddedDigits.num_classes
        if args.num_classes is None:
            return data_classes
        if args.num_classes < data_classes:
            raise UsageError(f'--num-classes {args.num_classes} is smaller than the {data_classes} classes of the data')
        return args.num_classes

    def _build_data_and_model(self):
        from timm.layers import convert_sync_batchnorm

        from toolkit.image_data import build_datasets
        args, rt = self.args, self.rt
        self.per_rank_batch = args.batch_size // rt.world_size
        self.micro_batch = self.per_rank_batch // args.grad_accum_steps
        if _mixup_active(args) and self.micro_batch % 2:
            raise UsageError(f'mixup/cutmix need an even per-process micro-batch, got {self.micro_batch}')
        args.num_classes = self.num_classes = self._num_classes()
        model = _build_model(args, self.num_classes)
        data_config = _data_config(args, model)
        self.img_size = data_config['input_size'][-1]
        train_tf, eval_tf = _build_transforms(args, data_config)
        self.train_set, self.val_set, _, self.data_desc = build_datasets(
            args.data_dir, args.train_split, args.val_split, self.img_size, train_transform=train_tf,
            eval_transform=eval_tf)

        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if args.distill_type != 'none' and hasattr(model, 'set_distilled_training'):
            model.set_distilled_training(True)
        model.to(rt.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.sync_bn and rt.distributed:
            model = convert_sync_batchnorm(model)
        self.model = model

    def _build_optimizer(self):
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3, NativeScaler
        args, rt = self.args, self.rt
        self.lr_note = resolve_lr(args)
        self.warmup_lr, self.min_lr = args.warmup_lr, args.min_lr

        self.graph_blocker = cuda_graph_blocker(args, rt.device, rt.world_size)
        if args.cuda_graphs and self.graph_blocker:
            raise UsageError(f'--cuda-graphs cannot capture this run: {self.graph_blocker}')
        self.use_graphs = args.cuda_graphs is not False and self.graph_blocker is None
        opt_kwargs = {}
        if self.use_graphs:
            opt_kwargs['capturable'] = True
        if args.opt.lower().endswith(('adam', 'adamw', 'lamb', 'lion', 'nadamw')):
            opt_kwargs.update(eps=args.opt_eps, betas=tuple(args.opt_betas))
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)

        self.loss_scaler = NativeScaler(device=rt.device.type) if args.amp == 'fp16' else None
        self.model_ema = None
        if args.model_ema:
            self.model_ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                        device=torch.device('cpu') if args.model_ema_force_cpu else None)

    def _build_loaders(self):
        from toolkit.image_data import GlobalBatchSampler, ShardedEvalSampler
        args, rt = self.args, self.rt
        self.sampler = GlobalBatchSampler(self.train_set, args.batch_size, num_replicas=rt.world_size, rank=rt.rank,
                                          shuffle=True, seed=args.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        loader_kwargs = dict(num_workers=args.workers, pin_memory=args.pin_mem and rt.device.type == 'cuda',
                             persistent_workers=args.workers > 0)
        self.train_loader = torch.utils.data.DataLoader(self.train_set, batch_size=self.micro_batch,
                                                        sampler=self.sampler, drop_last=True, **loader_kwargs)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=args.val_batch_size or self.per_rank_batch,
            sampler=ShardedEvalSampler(self.val_set, rt.world_size, rt.rank), **loader_kwargs)

    def _build_losses(self):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        args = self.args
        self.mixup_fn = None
        if _mixup_active(args):
            self.mixup_fn = Mixup(
                mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=self.num_classes)
            criterion = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        self.train_loss_fn = BaseLoss(criterion)
        if args.distill_type != 'none':
            teacher = create_model(args.distill_teacher, pretrained=args.distill_teacher_checkpoint is None,
                                   num_classes=self.num_classes)
            if args.distill_teacher_checkpoint:
                from toolkit.checkpoint_io import load_into_model
                load_into_model(teacher, args.distill_teacher_checkpoint)
            teacher.to(self.rt.device).eval().requires_grad_(False)
            self.train_loss_fn = DistillationLoss(criterion, teacher, args.distill_type, args.distill_alpha,
                                                  args.distill_tau)
        self.soft_ce = SoftTargetCrossEntropy()

    def _extra_state(self):
        """What a checkpoint holds beyond timm's saver: the schedule and the position in the run."""
        position = self.position
        return {
            'scheduler': self.lr_scheduler.state_dict(),
            'next_epoch': position['next_epoch'], 'next_batch': position['next_batch'],
            'num_updates': position['num_updates'], 'steps_per_epoch': self.steps_per_epoch,
            'global_batch': self.args.batch_size, 'world_size': self.rt.world_size, 'rng': position['rng'],
            'best_metric': position['best_metric'], 'best_epoch': position['best_epoch'],
        }

    def _build_saver(self):
        self.position = {'next_epoch': 0, 'next_batch': 0, 'num_updates': 0, 'best_metric': None,
                         'best_epoch': None, 'rng': None}
        self.args_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()}
        self.saver = None
        if self.rt.is_main:
            self.saver = _make_saver_class()(
                model=self.model, optimizer=self.optimizer, args=self.args_dict, model_ema=self.model_ema,
                amp_scaler=self.loss_scaler, checkpoint_dir=self.output_dir, recovery_dir=self.output_dir,
                max_history=self.args.checkpoint_hist, extra_state=self._extra_state)

    def _resume(self):
        args, rt = self.args, self.rt
        self.start_epoch, self.start_batch, self.num_updates = 0, 0, 0
        self.resume_rng = None
        resume_path, ckpt = None, None
        if args.resume:
            resume_path, ckpt = find_resume_checkpoint(args.resume, self.output_dir,
                                                       warn=_logger.warning if rt.is_main else None)
        if resume_path:
            self._load_resume_checkpoint(resume_path, ckpt)
        elif args.resume == 'auto':
            _logger.info(f'--resume auto: no checkpoint in {self.output_dir}, starting from scratch')

    def _load_resume_checkpoint(self, resume_path, ckpt):
        args, rt = self.args, self.rt
        if ckpt['arch'] != args.model:
            raise UsageError(f"{resume_path} is a {ckpt['arch']} run, not {args.model}")
        if ckpt['global_batch'] != args.batch_size or ckpt['steps_per_epoch'] != self.steps_per_epoch:
            raise UsageError(f"{resume_path} was written with global batch {ckpt['global_batch']} "
                             f"({ckpt['steps_per_epoch']} updates/epoch); resume with the same --batch-size")
        self.model.load_state_dict(ckpt['state_dict'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        set_capturable(self.optimizer, self.use_graphs)  # the saving run's choice must not carry over (CPU has none)
        self.lr_scheduler.load_state_dict(ckpt['scheduler'])
        if self.model_ema is not None:
            if ckpt.get('state_dict_ema') is None:
                raise UsageError(f'{resume_path} has no EMA weights; resume with --no-model-ema')
            self.model_ema.module.load_state_dict(ckpt['state_dict_ema'])
        if self.loss_scaler is not None and self.loss_scaler.state_dict_key in ckpt:
            self.loss_scaler.load_state_dict(ckpt[self.loss_scaler.state_dict_key])
        self.start_epoch, self.start_batch = ckpt['next_epoch'], ckpt['next_batch']
        self.num_updates = ckpt['num_updates']
        self.position.update(best_metric=ckpt.get('best_metric'), best_epoch=ckpt.get('best_epoch'))
        rng = ckpt.get('rng')
        self.resume_rng = rng[rt.rank] if rng is not None and len(rng) == rt.world_size else None
        if self.resume_rng is None:  # another number of processes: fresh, deterministic streams
            _seed_everything(args.seed + rt.rank + 1000003 * self.num_updates)
        if self.saver is not None and ckpt.get('saver') is not None:
            self.saver.load_state_dict(ckpt['saver'])
        self.lr_scheduler.step_update(num_updates=self.num_updates)
        _logger.info(f'resumed from {resume_path}: epoch {self.start_epoch}, batch {self.start_batch}/'
                     f'{self.steps_per_epoch}, update {self.num_updates}')

    def _wrap_model(self):
        """``model`` stays the plain module (EMA, evaluation, checkpoints); ``train_model`` is what the steps call."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        args, rt = self.args, self.rt
        self.ddp_model = DDP(self.model, device_ids=[rt.device] if rt.device.type == 'cuda' else None) \
            if rt.distributed else None
        self.train_model = self.ddp_model if self.ddp_model is not None else self.model
        if args.compile:
            self.train_model = torch.compile(self.train_model)
        self.params_for_clip = [p for p in self.model.parameters() if p.requires_grad]
        self.graphed_update = None  # captured on the first batch, when the shapes are known

    def _log_setup(self):
        args, rt = self.args, self.rt
        n_params = sum(p.numel() for p in self.model.parameters())
        _logger.info(f'model {args.model}: {n_params / 1e6:.2f}M params, {self.num_classes} classes, '
                     f'input {self.img_size}px')
        _logger.info(f'data {self.data_desc}: {len(self.train_set)} train / {len(self.val_set)} val images')
        _logger.info(f'{rt.world_size} process(es) on {rt.device.type}; global batch {args.batch_size} = '
                     f'{rt.world_size} x {self.micro_batch} x {args.grad_accum_steps} accumulation; '
                     f'{self.steps_per_epoch} updates/epoch; {self.lr_note}; warmup {args.warmup_epochs:g} epochs; '
                     f'amp {args.amp}')
        _logger.info('CUDA graphs: ' + ('on (each update replays one captured graph)' if self.use_graphs else
                                        'off (--no-cuda-graphs)' if args.cuda_graphs is False else
                                        f'off ({self.graph_blocker})'))
        _logger.info(f'output {self.output_dir}')
        if rt.is_main:
            import yaml
            with open(os.path.join(self.output_dir, 'args.yaml'), 'w') as f:
                yaml.safe_dump(self.args_dict, f, sort_keys=False)
        self.epoch_log = EpochLog(self.output_dir) if rt.is_main else None
        self.total_updates = args.epochs * self.steps_per_epoch
        self.run_start, self.run_start_updates = time.time(), self.num_updates
        self.last_metrics = None

    def _init_nonfinite_checks(self):
        """A NaN/inf loss. 'stop': the first bad update is kept on the device (no host sync per step) and checked
        where the loop syncs anyway (progress lines) and before every checkpoint, so no checkpoint holds damaged
        weights. 'skip': each micro-batch's loss is checked at once (one sync per micro-batch, all ranks agree)
        and a bad one drops the whole update."""
        self.no_bad_update = 2 ** 62
        self.first_bad_update = torch.full((), self.no_bad_update, device=self.rt.device, dtype=torch.int64)
        self.skipped_total = 0
        self.nan_at = set(self.args.debug_nan_at_update or ())

    def stop_if_nonfinite(self):
        if self.args.nan_policy != 'stop':
            return
        first = self.first_bad_update.clone()
        if self.rt.distributed:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first.item())
        if first != self.no_bad_update:
            raise NonFiniteLossError(first, self.steps_per_epoch, self.args.epochs)

    def any_rank_nonfinite(self, value):
        bad = (~torch.isfinite(value)).to(torch.int32)
        if self.rt.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def mean_over_ranks(self, total, count):
        """The mean loss of all ranks' micro-batches, from each rank's sum (on the device) and count."""
        stats = torch.stack([total, torch.tensor(float(count), device=self.rt.device, dtype=torch.float64)])
        if self.rt.distributed:
            dist.all_reduce(stats)
        return (stats[0] / stats[1].clamp(min=1)).item()

    def gather_rng(self):
        state = _rng_state()
        if not self.rt.distributed:
            return [state]
        states = [None] * self.rt.world_size
        dist.all_gather_object(states, state)
        return states

    # ------------------------------------------------------------------------------------------ CUDA-graph update
    def graph_update(self, static_images, static_targets):
        """One whole update as the captured graph runs it (the eager steps below do the same)."""
        from timm.utils import dispatch_clip_grad
        args = self.args
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast_context(self.rt.device, args.amp):
            loss = self.train_loss_fn(static_images, self.train_model(static_images), static_targets)
        loss.backward()
        if args.clip_grad > 0:
            dispatch_clip_grad(self.params_for_clip, args.clip_grad, mode=args.clip_mode)
        self.optimizer.step()
        return loss.detach()

    def capture_update(self, images, targets):
        """The captured update, or None (and eager training from here) when the default capture fails: a model
        with an operation CUDA graphs cannot hold still trains. An explicit --cuda-graphs makes it an error."""
        from toolkit.cuda_graphs import capture_train_step
        try:
            return capture_train_step(self.graph_update, self.train_model, self.optimizer, images, targets,
                                      undo_warmup=True)
        except Exception as e:  # noqa: BLE001  (any capture failure: report it and train eagerly)
            if self.args.cuda_graphs:
                raise
            self.use_graphs = False
            self.optimizer.zero_grad(set_to_none=True)
            set_capturable(self.optimizer, False)  # the eager step needs no device-side step counts
            reason = (str(e).splitlines() or [''])[0][:200]
            _logger.warning(f'CUDA graphs: capture failed ({type(e).__name__}: {reason}); '
                            f'training eagerly (--no-cuda-graphs skips the attempt)')
            return None

    # ------------------------------------------------------------------------------------------------- training
    def run(self):
        for epoch in range(self.start_epoch, self.args.epochs):
            first_batch, epoch_start = self.train_epoch(epoch)
            self.end_epoch(epoch, first_batch, epoch_start)
            self.start_batch = 0
            if self._reached_max_updates():
                break
        return self._finish()

    def _reached_max_updates(self):
        return self.args.debug_max_updates is not None and self.num_updates >= self.args.debug_max_updates

    def _start_epoch(self, epoch):
        """Position the sampler, zero the epoch's sums, restore a resumed run's random states; the data iterator."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(self.start_batch if epoch == self.start_epoch else 0)
        self.train_model.train()
        self.loss_sum = torch.zeros((), device=self.rt.device, dtype=torch.float64)
        self.loss_count = 0
        self.window_loss = torch.zeros((), device=self.rt.device, dtype=torch.float64)
        self.window_count, self.window_start = 0, time.time()
        self.skipped_epoch = self.window_skipped = 0
        # Random states are restored where the interrupted run saved them: before the epoch's loader iterator
        # (which draws a seed) for an epoch-end checkpoint, after it for a mid-epoch one.
        if self.resume_rng is not None and self.sampler.start_batch == 0:
            _set_rng_state(self.resume_rng)
            self.resume_rng = None
        data_iter = iter(self.train_loader)
        if self.resume_rng is not None:
            _set_rng_state(self.resume_rng)
            self.resume_rng = None
        return data_iter

    def train_epoch(self, epoch):
        """The epoch's updates (with progress lines and mid-epoch checkpoints); its first batch and start time."""
        args = self.args
        use_mesa = args.mesa > 0 and self.model_ema is not None and epoch >= int(args.mesa_start * args.epochs)
        epoch_start = time.time()
        data_iter = self._start_epoch(epoch)
        first_batch = self.sampler.start_batch
        for batch_idx in range(first_batch, self.steps_per_epoch):
            update_skipped = self.update(data_iter, use_mesa)
            if not self.use_graphs:  # a captured update zeroes the gradients it owns itself
                self.optimizer.zero_grad(set_to_none=True)
            self.num_updates += 1
            if update_skipped:
                self.skipped_epoch += 1
                self.window_skipped += 1
                self.skipped_total += 1
            elif self.model_ema is not None:
                self.model_ema.update(self.model, step=self.num_updates)
            self.lr_scheduler.step_update(num_updates=self.num_updates)
            self.position.update(next_epoch=epoch, next_batch=batch_idx + 1, num_updates=self.num_updates)

            last_in_epoch = batch_idx + 1 == self.steps_per_epoch
            if (batch_idx + 1) % args.log_interval == 0 or last_in_epoch:
                self._log_progress(epoch, batch_idx)
            if args.checkpoint_interval > 0 and self.num_updates % args.checkpoint_interval == 0 \
                    and not last_in_epoch:
                self.stop_if_nonfinite()
                self.position['rng'] = self.gather_rng()
                if self.saver is not None:
                    self.saver.save_recovery(epoch, batch_idx + 1)
            if args.debug_kill_after_update is not None and self.num_updates == args.debug_kill_after_update:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if self._reached_max_updates():
                break
        return first_batch, epoch_start

    def update(self, data_iter, use_mesa):
        """One optimizer update over ``grad_accum_steps`` micro-batches; whether it was skipped (non-finite loss)."""
        args, rt = self.args, self.rt
        update_skipped = False
        for micro in range(args.grad_accum_steps):
            images, targets = next(data_iter)
            images = images.to(rt.device, non_blocking=True)
            targets = targets.to(rt.device, non_blocking=True)
            if self.mixup_fn is not None:
                images, targets = self.mixup_fn(images, targets)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.use_graphs and self.graphed_update is None:  # the whole update replays as one graph
                self.graphed_update = self.capture_update(images, targets)
            if self.graphed_update is not None:
                loss_value = self.graphed_update(images, targets).clone()  # the next replay overwrites its output
            else:
                loss = self._eager_loss(images, targets, use_mesa)
                loss_value = loss.detach()
                if args.nan_policy == 'skip':
                    update_skipped = update_skipped or self.any_rank_nonfinite(loss_value)
                    if update_skipped:  # no backward: the update is dropped on every rank
                        continue
                self._backward(loss / args.grad_accum_steps, last_micro=micro == args.grad_accum_steps - 1)
            if args.nan_policy == 'stop':
                self.first_bad_update = torch.where(torch.isfinite(loss_value), self.first_bad_update,
                                                    self.first_bad_update.clamp(max=self.num_updates + 1))
            self.loss_sum += loss_value
            self.window_loss += loss_value
            self.loss_count += 1
            self.window_count += 1
        return update_skipped

    def _eager_loss(self, images, targets, use_mesa):
        args = self.args
        with self.autocast_context(self.rt.device, args.amp):
            outputs = self.train_model(images)
            loss = self.train_loss_fn(images, outputs, targets)
            if use_mesa:
                with torch.no_grad():
                    ema_out = self.model_ema.module(images)
                main_out = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
                loss = loss + args.mesa * self.soft_ce(main_out, ema_out.float().softmax(dim=-1))
        if self.num_updates + 1 in self.nan_at:
            loss = loss * float('nan')
        return loss

    def _backward(self, loss, last_micro):
        """Backward of one micro-batch; the last one of an update also clips and steps (DDP syncs only then)."""
        if self.rt.distributed and not last_micro:
            with self.ddp_model.no_sync():
                self._backward_and_step(loss, last_micro)
        else:
            self._backward_and_step(loss, last_micro)

    def _backward_and_step(self, loss, last_micro):
        from timm.utils import dispatch_clip_grad
        args = self.args
        if self.loss_scaler is not None:
            self.loss_scaler(loss, self.optimizer, clip_grad=args.clip_grad if args.clip_grad > 0 else None,
                             clip_mode=args.clip_mode, parameters=self.params_for_clip, need_update=last_micro)
        else:
            loss.backward()
            if last_micro:
                if args.clip_grad > 0:
                    dispatch_clip_grad(self.params_for_clip, args.clip_grad, mode=args.clip_mode)
                self.optimizer.step()

    def _log_progress(self, epoch, batch_idx):
        args = self.args
        self.stop_if_nonfinite()
        avg = self.mean_over_ranks(self.window_loss, self.window_count)
        now = time.time()
        done_this_run = self.num_updates - self.run_start_updates
        sec_per_update = (now - self.run_start) / max(done_this_run, 1)
        imgs_per_s = self.window_count / args.grad_accum_steps * args.batch_size / max(now - self.window_start, 1e-9)
        _logger.info(
            f'[train] epoch {epoch + 1}/{args.epochs} step {batch_idx + 1}/{self.steps_per_epoch} '
            f'loss {avg:.4f} lr {self.optimizer.param_groups[0]["lr"]:.3e} {imgs_per_s:.1f} img/s '
            f'eta epoch {_fmt_time((self.steps_per_epoch - batch_idx - 1) * sec_per_update)} '
            f'total {_fmt_time((self.total_updates - self.num_updates) * sec_per_update)}'
            + (f' | skipped {self.window_skipped} update(s) with a non-finite loss ({self.skipped_total} in all)'
               if self.window_skipped else ''))
        self.window_loss.zero_()
        self.window_count, self.window_start, self.window_skipped = 0, time.time(), 0

    # --------------------------------------------------------------------------------------------- end of epoch
    def end_epoch(self, epoch, first_batch, epoch_start):
        """Validate, log, checkpoint."""
        args, rt = self.args, self.rt
        self.stop_if_nonfinite()
        train_loss = self.mean_over_ranks(self.loss_sum, self.loss_count)
        epoch_time = time.time() - epoch_start
        row = {'epoch': epoch, 'num_updates': self.num_updates, 'train_loss': round(train_loss, 6),
               'lr': self.optimizer.param_groups[0]['lr'], 'epoch_time_s': round(epoch_time, 2),
               'img_per_s': round((self.steps_per_epoch - first_batch) * args.batch_size / max(epoch_time, 1e-9), 2)}
        if args.nan_policy == 'skip':
            row['skipped_steps'] = self.skipped_epoch
        metric, msg = None, 'no validation this epoch'
        if (epoch + 1) % args.val_interval == 0 or epoch + 1 == args.epochs:
            metric, msg = self._validate(epoch, row)
        self.lr_scheduler.step(epoch + 1)
        _logger.info(f'[epoch {epoch + 1}/{args.epochs}] train loss {train_loss:.4f} | {msg} | '
                     f'{_fmt_time(epoch_time)}, {row["img_per_s"]:.1f} img/s')
        self.position.update(next_epoch=epoch + 1, next_batch=0, num_updates=self.num_updates,
                             rng=self.gather_rng())
        if rt.is_main:
            self.epoch_log.append(row)
            self.saver.save_checkpoint(epoch, metric=metric)
            self.saver.remove_recovery_files()

    def _validate(self, epoch, row):
        """Evaluate the model (and its EMA) into ``row``; the checkpoint metric and the log message."""
        args = self.args
        m = self.evaluate(self.model, self.val_loader, self.rt, amp=args.amp, channels_last=args.channels_last)
        row.update(val_top1=round(m['top1'], 4), val_top5=round(m['top5'], 4), val_loss=round(m['loss'], 6))
        metric = m['top1']
        msg = f'val top1 {m["top1"]:.2f} top5 {m["top5"]:.2f} loss {m["loss"]:.4f}'
        if self.model_ema is not None:
            e = self.evaluate(self.model_ema.module, self.val_loader, self.rt, amp=args.amp,
                              channels_last=args.channels_last)
            row.update(ema_top1=round(e['top1'], 4), ema_top5=round(e['top5'], 4), ema_loss=round(e['loss'], 6))
            metric = max(metric, e['top1'])
            msg += f' | ema top1 {e["top1"]:.2f} top5 {e["top5"]:.2f}'
        self.last_metrics = row
        if self.position['best_metric'] is None or metric > self.position['best_metric']:
            self.position.update(best_metric=metric, best_epoch=epoch)
        return metric, msg

    def _finish(self):
        args, rt = self.args, self.rt
        if args.debug_dump_weights:
            os.makedirs(args.debug_dump_weights, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                       os.path.join(args.debug_dump_weights, f'rank{rt.rank}.pt'))
        if rt.distributed:
            dist.barrier()
        last = self.last_metrics
        if last is not None and 'val_top1' in last:
            best = self.position['best_metric']
            _logger.info(f'[done] final validation accuracy: top-1 {last["val_top1"]:.2f}% '
                         f'top-5 {last["val_top5"]:.2f}% (best top-1 {best:.2f}% at epoch '
                         f'{self.position["best_epoch"] + 1}); checkpoints and logs in {self.output_dir}')
        else:
            _logger.info(f'[done] checkpoints and logs in {self.output_dir}')
        return 0

if __name__ == '__main__':
    sys.exit(run_tool(main))
