#!/usr/bin/env python3
"""Top-1/top-5 accuracy of a zoo or timm model on an ImageFolder split or the embedded digits dataset.

Weights: ``--checkpoint`` in any of the zoo's formats (a tools/train.py checkpoint, plain ``.safetensors``/``.pth``
weights) or an official checkpoint of the model's family (converted on the fly by the family's
``checkpoint_filter_fn``, then loaded strictly); ``--pretrained`` for timm's pretrained_cfg weights.

    python tools/validate.py --checkpoint output/train/<run>/model_best.pth.tar          # settings of that run
    python tools/validate.py --model groupmamba_tiny --checkpoint groupmamba_tiny_ema.pth --data-dir /imagenet
    torchrun --nproc-per-node 8 tools/validate.py --model plainmamba_l1 --checkpoint l1.pth --data-dir /imagenet

Under torchrun every image is evaluated exactly once across the processes and the counts are summed.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from toolkit.cli import (
    ToolArgumentParser, UsageError, create_model, import_zoo, parse_args_with_config, parse_key_values, run_tool,
)

# What tools/train.py uses for the embedded digits (keep in step with its DIGITS_PRESET).
DIGITS_EVAL = dict(img_size=32, crop_pct=1.0)
FROM_TRAINING_RUN = ('img_size', 'crop_pct', 'interpolation', 'mean', 'std')


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', '-m', default=None, help='model name (default: the one of a training checkpoint)')
    p.add_argument('--checkpoint', default=None, help='weights: zoo (training or plain) or official format')
    p.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=False,
                   help='evaluate the EMA weights of the checkpoint')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                   help="timm pretrained_cfg weights (when no --checkpoint)")
    p.add_argument('--num-classes', type=int, default=None, help='default: the number of classes of the data')
    p.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE')
    p.add_argument('--data-dir', '--data', default=None,
                   help='ImageFolder root; omitted: the training run data, else the embedded digits')
    p.add_argument('--split', default='val')
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--interpolation', default=None)
    p.add_argument('--mean', type=float, nargs=3, default=None)
    p.add_argument('--std', type=float, nargs=3, default=None)
    p.add_argument('--batch-size', '-b', type=int, default=128, help='per process')
    p.add_argument('--workers', '-j', type=int, default=None, help='default 8 (0 for the embedded dataset)')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'])
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    p.add_argument('--device', default='auto')
    p.add_argument('--results-file', default=None, help='write the result as JSON')
    return p


def main(argv=None):
    args = parse_args_with_config(build_parser(), argv)
    import_zoo()
    from toolkit.checkpoint_io import extract_state_dict, is_training_checkpoint, read_checkpoint
    from toolkit.evaluation import evaluate, init_runtime, world_from_env
    from toolkit.image_data import EmbeddedDigits, ShardedEvalSampler, build_datasets
    from timm.data import create_transform, resolve_data_config

    raw, train_args = None, {}
    if args.checkpoint:
        raw = read_checkpoint(args.checkpoint)
        if is_training_checkpoint(raw):
            train_args = dict(raw.get('args') or {})
    model_name = args.model or train_args.get('model')
    if not model_name:
        raise UsageError('--model is required (the checkpoint does not name one)')
    data_dir = args.data_dir if args.data_dir is not None else train_args.get('data_dir')
    if data_dir and not os.path.isdir(os.path.join(data_dir, args.split)):
        raise UsageError(f"no '{args.split}/' folder under data directory {data_dir}")
    for key in FROM_TRAINING_RUN:  # evaluate as the training run did, unless told otherwise
        if getattr(args, key) is None:
            value = train_args.get(key)
            if value is None and not data_dir:
                value = DIGITS_EVAL.get(key)
            setattr(args, key, value)

    if data_dir:
        root = os.path.join(data_dir, args.split)
        data_classes = sum(1 for d in os.scandir(root) if d.is_dir())
    else:
        data_classes = EmbeddedDigits.num_classes
    num_classes = args.num_classes or train_args.get('num_classes') or data_classes
    model_kwargs = parse_key_values(args.model_kwargs if args.model_kwargs is not None
                                    else train_args.get('model_kwargs') or [])
    model = create_model(model_name, img_size=args.img_size, pretrained=args.pretrained and raw is None,
                         num_classes=num_classes, **model_kwargs)
    how = 'pretrained_cfg' if args.pretrained and raw is None else 'random init'
    if raw is not None:
        state_dict, how = extract_state_dict(raw, model, use_ema=args.use_ema)
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            from toolkit.checkpoint_io import StrictLoadError
            raise StrictLoadError(args.checkpoint, result.missing_keys, result.unexpected_keys)
        del raw, state_dict

    overrides = {}
    if args.img_size:
        overrides['input_size'] = (3, args.img_size, args.img_size)
    for key in ('crop_pct', 'interpolation', 'mean', 'std'):
        if getattr(args, key) is not None:
            overrides[key] = tuple(getattr(args, key)) if key in ('mean', 'std') else getattr(args, key)
    data_config = resolve_data_config(overrides, model=model)
    transform = create_transform(input_size=data_config['input_size'], is_training=False,
                                 interpolation=data_config['interpolation'], mean=data_config['mean'],
                                 std=data_config['std'], crop_pct=data_config['crop_pct'])
    _, val_set, _, data_desc = build_datasets(data_dir, 'train', args.split, data_config['input_size'][-1],
                                              eval_transform=transform, need_train=False)

    world = world_from_env()
    rt = init_runtime(args.device)
    try:
        model.to(rt.device).eval()
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        workers = args.workers if args.workers is not None else (8 if data_dir else 0)
        loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=workers,
                                             sampler=ShardedEvalSampler(val_set, world.world_size, world.rank),
                                             pin_memory=rt.device.type == 'cuda')
        start = time.time()
        m = evaluate(model, loader, rt, amp=args.amp, channels_last=args.channels_last)
        elapsed = time.time() - start
        result = {
            'model': model_name, 'checkpoint': args.checkpoint, 'weights': how, 'ema': bool(args.use_ema),
            'data': data_desc, 'split': args.split, 'images': m['count'],
            'top1': round(m['top1'], 4), 'top5': round(m['top5'], 4), 'loss': round(m['loss'], 6),
            'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
            'interpolation': data_config['interpolation'], 'amp': args.amp,
            'img_per_s': round(m['count'] / max(elapsed, 1e-9), 1),
        }
        if rt.is_main:
            print(f"{model_name} [{how}] on {data_desc} {args.split} ({m['count']} images, "
                  f"{result['img_size']}px, crop {result['crop_pct']}): top-1 {m['top1']:.2f}% "
                  f"top-5 {m['top5']:.2f}% loss {m['loss']:.4f}", flush=True)
            print(json.dumps(result), flush=True)
            if args.results_file:
                with open(args.results_file, 'w') as f:
                    json.dump(result, f, indent=2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
