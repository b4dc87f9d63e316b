"""Reading and writing checkpoints for the tools.

Formats read:
- zoo training checkpoints written by tools/train.py (``format: vmamba_zoo.train``: ``state_dict``,
  ``state_dict_ema``, optimizer, scheduler, ... );
- zoo weights: a plain state dict in ``.safetensors`` or ``.pth``;
- official checkpoints of each family (``{'model': ...}``, ``{'model', 'model_ema'}``, ``{'meta', 'state_dict'}``,
  ``backbone.``/``module.`` prefixes): handed raw to the family's ``checkpoint_filter_fn``, exactly as timm does
  for pretrained weights.

Official files often pickle non-tensor objects (yacs configs, argparse namespaces, numpy scalars). They are read with
``torch.load(weights_only=True)``, the classes it refuses being replaced by inert stand-ins: no code from the file
runs and no third-party package is needed.
"""
import os
from typing import Any, Dict, Optional, Tuple

import torch

from cli_common import UsageError, family_module

__all__ = [
    'TRAIN_FORMAT', 'read_checkpoint', 'is_training_checkpoint', 'extract_state_dict', 'load_into_model',
    'atomic_torch_save', 'save_weights', 'InertObject',
]

TRAIN_FORMAT = 'vmamba_zoo.train'


class InertObject(dict):
    """Stand-in for a class a foreign checkpoint pickles but that is not needed to read its tensors."""

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.__dict__['pickled_args'] = args

    def __setstate__(self, state):
        self.__dict__['pickled_state'] = state

    def __reduce__(self):  # never re-pickled under the original name
        return dict, (dict(self),)


def _make_inert_unpickler():
    import pickle
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(getattr(wou, '_get_user_allowed_globals', lambda: {})())
    stand_ins: Dict[str, type] = {}

    class InertUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            key = f'{module}.{name}'
            if key in allowed:
                return allowed[key]
            if key not in stand_ins:
                stand_ins[key] = type(name, (InertObject,), {'__module__': module, '__qualname__': name})
            return stand_ins[key]

    def load(file, **kwargs):
        return InertUnpickler(file, **kwargs).load()

    module = type(pickle)('inert_pickle')
    module.Unpickler = InertUnpickler
    module.load = load
    module.__dict__.update({k: getattr(pickle, k) for k in ('UnpicklingError', 'HIGHEST_PROTOCOL', 'Pickler',
                                                                'dump', 'dumps', 'loads')})
    return module


def read_checkpoint(path: str, map_location='cpu') -> Any:
    """The raw content of a ``.safetensors``/``.pth``/``.pt``/``.ckpt``/``.bin`` file, read without running its code."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint not found: {path}')
    if str(path).endswith('.safetensors'):
        import safetensors.torch
        return safetensors.torch.load_file(path, device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first_error:  # noqa: BLE001  (UnpicklingError or RuntimeError depending on torch)
        try:
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=_make_inert_unpickler())
        except Exception as e:  # noqa: BLE001
            raise UsageError(f'cannot read checkpoint {path}: {str(e).splitlines()[0]}') from first_error


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get('format') == TRAIN_FORMAT


def _strip_wrappers(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    from timm.models import clean_state_dict
    return clean_state_dict({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})


def extract_state_dict(obj: Any, model: Optional[torch.nn.Module] = None, use_ema: bool = False,
                       ) -> Tuple[Dict[str, torch.Tensor], str]:
    """A state dict for ``model`` from a raw checkpoint, and a word on how it was found.

    Zoo training checkpoints give ``state_dict`` (``state_dict_ema`` with ``use_ema``). Anything else goes through the
    family's ``checkpoint_filter_fn(state_dict, model)`` when the model's module defines one (official formats),
    otherwise timm's convention applies (``state_dict_ema``/``model_ema`` with ``use_ema``, ``state_dict``, ``model``).
    """
    if is_training_checkpoint(obj):
        key = 'state_dict_ema' if use_ema else 'state_dict'
        if obj.get(key) is None:
            raise UsageError(f"training checkpoint has no '{key}'" + (' (trained without EMA)' if use_ema else ''))
        return _strip_wrappers(obj[key]), f'zoo training checkpoint [{key}]'
    if not isinstance(obj, dict):
        raise UsageError(f'checkpoint holds a {type(obj).__name__}, expected a dict of tensors')
    if use_ema:
        for key in ('state_dict_ema', 'model_ema', 'ema'):
            if isinstance(obj.get(key), dict):
                obj = {'model': obj[key]}
                break
        else:
            raise UsageError('checkpoint has no EMA weights (state_dict_ema / model_ema)')
    module = family_module(model) if model is not None else None
    filter_fn = getattr(module, 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        state_dict = filter_fn(obj, model)
        return _strip_wrappers(state_dict), f'{module.__name__}.checkpoint_filter_fn'
    for key in ('state_dict', 'model'):
        if isinstance(obj.get(key), dict):
            return _strip_wrappers(obj[key]), f"timm convention ['{key}']"
    return _strip_wrappers(obj), 'plain state dict'


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
        try:
            safetensors.torch.save_file(out, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        atomic_torch_save(tensors, path)
