"""Reading and writing checkpoints for the tools.

Formats read:
- zoo training checkpoints written by tools/train.py (``format: vmamba_zoo.train``: ``state_dict``,
  ``state_dict_ema``, optimizer, scheduler, ... );
- zoo weights: a plain state dict in ``.safetensors`` or ``.pth``;
- official checkpoints of each family (``{'model': ...}``, ``{'model', 'model_ema'}``, ``{'meta', 'state_dict'}``,
  ``backbone.``/``module.`` prefixes): handed raw to the family's ``checkpoint_filter_fn``, exactly as timm does
  for pretrained weights.

Reading, the EMA keys and atomic writing are :mod:`vmamba_zoo.checkpoint`'s (the project's one checkpoint module);
this file adds what the tools need on top: one-line usage errors, the family filter, strict loading, weight export.
"""
from typing import Any, Dict, Optional, Tuple

import torch

from .cli import UsageError, family_module
from vmamba_zoo import checkpoint as _ckpt
from vmamba_zoo.checkpoint import TRAIN_FORMAT, InertObject, is_training_checkpoint  # noqa: F401  (re-exported)

__all__ = [
    'TRAIN_FORMAT', 'read_checkpoint', 'is_training_checkpoint', 'extract_state_dict', 'load_into_model',
    'atomic_torch_save', 'save_weights', 'InertObject',
]


def read_checkpoint(path: str, map_location='cpu') -> Any:
    """The raw content of a checkpoint file, read by :func:`vmamba_zoo.checkpoint.read_checkpoint` (no code from the
    file runs); a missing or unreadable file is a one-line usage error."""
    try:
        return _ckpt.read_checkpoint(path, map_location=map_location)
    except FileNotFoundError:
        raise UsageError(f'checkpoint not found: {path}') from None
    except _ckpt.CheckpointError as e:
        raise UsageError(str(e)) from e


def extract_state_dict(obj: Any, model: Optional[torch.nn.Module] = None, use_ema: bool = False,
                       ) -> Tuple[Dict[str, torch.Tensor], str]:
    """A state dict for ``model`` from a raw checkpoint, and a word on how it was found.

    Zoo training checkpoints give ``state_dict`` (``state_dict_ema`` with ``use_ema``). With ``use_ema`` any other
    checkpoint gives its EMA weights (``vmamba_zoo.checkpoint.EMA_KEYS``, as everywhere in the project). The result
    goes through the family's ``checkpoint_filter_fn(state_dict, model)`` when the model's module defines one
    (official formats, handed the raw checkpoint exactly as timm's pretrained path does), otherwise the plain weights
    are found as ``vmamba_zoo.checkpoint.select_state_dict`` finds them.
    """
    if is_training_checkpoint(obj):
        key = 'state_dict_ema' if use_ema else 'state_dict'
        if obj.get(key) is None:
            raise UsageError(f"training checkpoint has no '{key}'" + (' (trained without EMA)' if use_ema else ''))
        return _ckpt.clean_keys(obj[key]), f'zoo training checkpoint [{key}]'
    if not isinstance(obj, dict):
        raise UsageError(f'checkpoint holds a {type(obj).__name__}, expected a dict of tensors')
    how = None
    if use_ema:
        found = _ckpt.ema_weights(obj)
        if found is None:
            raise UsageError(f'checkpoint has no EMA weights ({" / ".join(_ckpt.EMA_KEYS)})')
        obj, how = found[1], f"['{found[0]}']"
    module = family_module(model) if model is not None else None
    filter_fn = getattr(module, 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        state_dict = filter_fn(obj, model)
        return _ckpt.clean_keys(state_dict), f'{module.__name__}.checkpoint_filter_fn' + (f' of {how}' if how else '')
    try:
        return _ckpt.select_state_dict(obj), how or 'plain weights'
    except _ckpt.CheckpointError as e:
        raise UsageError(str(e)) from e


def load_into_model(model: torch.nn.Module, path: str, use_ema: bool = False, strict: bool = True) -> str:
    """Load any supported checkpoint into ``model`` (strict by default). Returns how the weights were found."""
    obj = read_checkpoint(path)
    state_dict, how = extract_state_dict(obj, model, use_ema=use_ema)
    result = model.load_state_dict(state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise StrictLoadError(path, result.missing_keys, result.unexpected_keys)
    _check_shapes(model, state_dict)
    return how


class StrictLoadError(UsageError):
    def __init__(self, path, missing, unexpected):
        self.missing, self.unexpected = list(missing), list(unexpected)
        show = lambda keys: ', '.join(keys[:5]) + (f' ... (+{len(keys) - 5})' if len(keys) > 5 else '')  # noqa: E731
        parts = []
        if self.missing:
            parts.append(f'{len(self.missing)} missing keys [{show(self.missing)}]')
        if self.unexpected:
            parts.append(f'{len(self.unexpected)} unexpected keys [{show(self.unexpected)}]')
        super().__init__(f'strict load of {path} failed: ' + '; '.join(parts))


def _check_shapes(model, state_dict):
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise UsageError(f'shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}')


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to ``path`` through a temporary file in the same folder, flushed to disk, then renamed."""
    _ckpt.atomic_save(obj, path)


def save_weights(state_dict: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Save plain weights atomically as ``.safetensors`` (by extension) or ``.pth``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if str(path).endswith('.safetensors'):
        import safetensors.torch
        # safetensors refuses tensors sharing storage: give each its own
        seen, out = set(), {}
        for k, v in tensors.items():
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
            out[k] = v.clone() if ptr in seen else v
            if ptr is not None:
                seen.add(ptr)
        data = safetensors.torch.save(out, metadata=metadata)
        _ckpt.atomic_write(path, lambda f: f.write(data))
    else:
        atomic_torch_save(tensors, path)
