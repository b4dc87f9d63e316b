#!/usr/bin/env python3
"""Convert an official checkpoint of a family to the zoo's format (``.safetensors`` and/or ``.pth``).

The official file is read without running its code, converted by the family's ``checkpoint_filter_fn`` (the one
timm uses for pretrained weights), loaded STRICTLY into the zoo model, and the model's full state dict is written.
Each output is then read back into a fresh model, strictly, and compared tensor by tensor and on a forward pass.

    python tools/convert_checkpoint.py --model groupmamba_tiny --src groupmamba_tiny_ema.pth \\
        --out weights/groupmamba_tiny.safetensors --out weights/groupmamba_tiny.pth
    python tools/convert_checkpoint.py --model spatialmamba_tiny --src spatialmamba_t.pth --use-ema --out t.safetensors

A tools/train.py checkpoint is accepted too (its ``state_dict``, or ``state_dict_ema`` with ``--use-ema``).
"""
import argparse
import hashlib
import os
import sys

import torch

from toolkit.cli import ToolArgumentParser, UsageError, create_model, import_zoo, require_model, run_tool


def build_parser():
    p = ToolArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', '-m', required=True, help='zoo model name, e.g. groupmamba_tiny')
    p.add_argument('--src', required=True, help='official (or zoo training) checkpoint')
    p.add_argument('--out', action='append', default=None,
                   help='output file, .safetensors or .pth (repeat for both); default: <model>.safetensors beside src')
    p.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=False,
                   help="take the EMA weights ('model_ema' / 'state_dict_ema') of the source")
    p.add_argument('--num-classes', type=int, default=None, help='default: the model default (1000)')
    p.add_argument('--img-size', type=int, default=None, help='model input size, if the model takes one')
    p.add_argument('--no-verify', action='store_true', help='skip reading the outputs back')
    return p


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def convert(model_name, src, outs, use_ema=False, num_classes=None, img_size=None, verify=True, log=print):
    from toolkit.checkpoint_io import StrictLoadError, extract_state_dict, read_checkpoint, save_weights
    kwargs = {} if num_classes is None else {'num_classes': num_classes}
    model = create_model(model_name, img_size=img_size, **kwargs).eval()
    raw = read_checkpoint(src)
    state_dict, how = extract_state_dict(raw, model, use_ema=use_ema)
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise UsageError(f'{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}'
                             + (' (set --num-classes)' if k in _classifier_keys(model) else ''))
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise StrictLoadError(src, result.missing_keys, result.unexpected_keys)
    log(f'{src}: {len(state_dict)} tensors via {how}; strict load into {model_name} OK')

    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {'format': 'pt', 'model': model_name, 'converted_from': os.path.basename(src),
                'weights': 'ema' if use_ema else 'model'}
    for out in outs:
        if not out.endswith(('.safetensors', '.pth', '.pt', '.bin')):
            raise UsageError(f'--out {out}: use a .safetensors or .pth file name')
        save_weights(weights, out, metadata=metadata if out.endswith('.safetensors') else None)

    if verify:
        torch.manual_seed(0)
        size = img_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            expected = model(x)
        for out in outs:
            fresh = create_model(model_name, img_size=img_size, **kwargs).eval()
            loaded = read_checkpoint(out)
            fresh.load_state_dict(loaded, strict=True)
            for k, v in fresh.state_dict().items():
                if not torch.equal(v, weights[k]):
                    raise RuntimeError(f'{out}: tensor {k} differs after reading back')
            with torch.no_grad():
                got = fresh(x)
            # same weights, but memory layouts may differ (e.g. a transposed view in the source): allow rounding
            err = (got - expected).abs().max().item()
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise RuntimeError(f'{out}: forward pass differs after reading back (max abs diff {err:.3g})')
            log(f'{out}: {len(weights)} tensors, strict re-load OK, forward max diff {err:.2g}, sha256 {_sha256(out)[:16]}')
    return weights


def _classifier_keys(model):
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ''
    return {f'{name}.weight', f'{name}.bias'}


def main(argv=None):
    args = build_parser().parse_args(argv)
    import_zoo()
    require_model(args.model)
    if not os.path.isfile(args.src):
        raise UsageError(f'source checkpoint not found: {args.src}')
    outs = args.out or [os.path.join(os.path.dirname(os.path.abspath(args.src)), f'{args.model}.safetensors')]
    for out in outs:
        if os.path.abspath(out) == os.path.abspath(args.src):
            raise UsageError(f'--out {out} would overwrite the source')
    convert(args.model, args.src, outs, use_ema=args.use_ema, num_classes=args.num_classes, img_size=args.img_size,
            verify=not args.no_verify)
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
