"""Reading ImageNet and dense-prediction checkpoints for the mm backbones.

mmengine's own loader cannot be used for the zoo's checkpoints: it reads neither
safetensors nor EMA weights, it trips on torch's ``weights_only=True`` default for
checkpoints holding numpy or config objects, and it cannot rename official keys.
Loading here goes through each family's timm ``checkpoint_filter_fn`` instead.
"""
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from timm.models import clean_state_dict

__all__ = [
    'read_checkpoint', 'select_state_dict', 'strip_prefix', 'family_filter_fn',
    'format_key_mismatch', 'convert_dense_checkpoint', 'official_weights_location',
]

_EMA_KEYS = ('state_dict_ema', 'model_ema')
_PLAIN_KEYS = ('state_dict', 'model', 'module')


def read_checkpoint(path: str) -> Any:
    """Load a checkpoint file or URL to CPU, whatever objects it holds besides tensors."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path or URL string, got {type(path).__name__}')
    path = str(path)
    if path.startswith(('http://', 'https://')):
        if path.endswith('.safetensors'):
            raise ValueError(f'download {path} first: safetensors are read from local files only')
        return torch.hub.load_state_dict_from_url(path, map_location='cpu', weights_only=False, check_hash=False)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if path.endswith('.safetensors'):
        import safetensors.torch
        return safetensors.torch.load_file(path, device='cpu')
    # Official checkpoints hold argparse namespaces, numpy scalars and configs next to the weights.
    return torch.load(path, map_location='cpu', weights_only=False)


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
    raise ValueError(f'{model_name} has no official ImageNet weights: set init_cfg.checkpoint to a zoo '
                     f'checkpoint, or init_cfg=None to train from scratch')


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Pick the weights out of a checkpoint wrapper ({'model': ...}, {'state_dict': ...}, EMA, bare)."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f'checkpoint must hold a dict, got {type(checkpoint).__name__}')
    keys = (_EMA_KEYS + _PLAIN_KEYS) if use_ema else _PLAIN_KEYS
    for key in keys:
        if _is_state_dict(checkpoint.get(key)):
            return clean_state_dict(checkpoint[key])
    if _is_state_dict(checkpoint):
        return clean_state_dict(checkpoint)
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(checkpoint) // 2:
        # A bare state dict with a few non-tensor extras (e.g. an 'epoch' entry).
        return clean_state_dict(tensors)
    raise ValueError(
        f'no state dict found in checkpoint; looked for {list(keys)} or a bare dict of tensors, '
        f'top-level keys are {sorted(checkpoint)[:20]}')


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    """Keep only keys under ``prefix`` (e.g. 'backbone.') and drop it, like mmengine's Pretrained(prefix=...)."""
    if not prefix:
        return dict(state_dict)
    if not prefix.endswith('.'):
        prefix += '.'
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f'no key in the checkpoint starts with prefix {prefix!r}; '
                         f'first keys: {list(state_dict)[:10]}')
    return out


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
