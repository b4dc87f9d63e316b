"""Reading ImageNet and dense-prediction checkpoints for the mm backbones.

mmengine's own loader cannot be used for the zoo's checkpoints: it reads neither
safetensors nor EMA weights, it trips on torch's ``weights_only=True`` default for
checkpoints holding numpy or config objects, and it cannot rename official keys.
Reading and finding the weights are :mod:`vmamba_zoo.checkpoint`'s (safe: no code from the
file runs; the same EMA keys as the tools); loading goes through each family's timm
``checkpoint_filter_fn``.
"""
import sys
from typing import Callable, Dict, Iterable, List, Tuple

import torch

from ..checkpoint import read_checkpoint, select_state_dict, strip_prefix

__all__ = [
    'read_checkpoint', 'select_state_dict', 'strip_prefix', 'family_filter_fn',
    'format_key_mismatch', 'convert_dense_checkpoint', 'official_weights_location',
]


def official_weights_location(model_name: str) -> str:
    """Local path or URL of the official weights a zoo model's pretrained_cfg names.

    Hugging Face Hub files are downloaded (cached) here; the official files are read by
    ``read_checkpoint`` rather than by timm, since they hold more than tensors.
    """
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f'{model_name} has no pretrained_cfg')
    if cfg.hf_hub_id and cfg.hf_hub_filename:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(cfg.hf_hub_id, cfg.hf_hub_filename)
    url = cfg.url or ''
    if url.startswith(('http://', 'https://')) and 'drive.google.com' not in url:
        return url
    if url:
        raise ValueError(f'the official weights of {model_name} are on {url}, which cannot be fetched '
                         f'automatically: download the file and set init_cfg.checkpoint to its path')
    notes = ' '.join(cfg.notes or ())
    if notes:  # weights published where nothing can fetch them (e.g. a Google Drive page), named in the notes
        raise ValueError(f'{model_name}: {notes}; download the file and set init_cfg.checkpoint to its path')
    raise ValueError(f'{model_name} has no official ImageNet weights: set init_cfg.checkpoint to a zoo '
                     f'checkpoint, or init_cfg=None to train from scratch')


def family_filter_fn(model: torch.nn.Module) -> Callable[[Dict[str, torch.Tensor], torch.nn.Module], Dict]:
    """The ``checkpoint_filter_fn`` of the timm module that defines ``model``'s class (identity if none)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, 'checkpoint_filter_fn', None)
    if fn is None:
        return lambda state_dict, model: state_dict
    return fn


def _preview(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f' ... (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def format_key_mismatch(
        what: str,
        missing: List[str],
        unexpected: List[str],
        mismatched: List[Tuple[str, tuple, tuple]],
) -> str:
    lines = [f'{what} does not match the model:']
    if missing:
        lines.append(f'  missing keys ({len(missing)}): {_preview(missing)}')
    if unexpected:
        lines.append(f'  unexpected keys ({len(unexpected)}): {_preview(unexpected)}')
    if mismatched:
        shown = '; '.join(f'{k}: checkpoint {tuple(a)} vs model {tuple(b)}' for k, a, b in mismatched[:8])
        lines.append(f'  shape mismatches ({len(mismatched)}): {shown}')
    return '\n'.join(lines)


def convert_dense_checkpoint(
        state_dict: Dict[str, torch.Tensor],
        backbone: torch.nn.Module,
        prefix: str = 'backbone.',
) -> Dict[str, torch.Tensor]:
    """Convert an official detector/segmentor state dict to one for a model holding ``backbone``.

    Keys under ``prefix`` go through the family's filter fn (the official dense-prediction backbones
    use their classification names plus ``outnorm{i}``); neck and head keys pass unchanged.
    ``backbone`` is a ``TimmVMamba``.
    """
    if not prefix.endswith('.'):
        prefix += '.'
    backbone_sd = strip_prefix(state_dict, prefix)
    converted = backbone.convert_state_dict(backbone_sd)
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in converted.items()})
    return out
