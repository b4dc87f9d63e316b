"""Checkpoint files for the whole project: one safe reader, one way to find the weights, one atomic writer.

Reading never runs code from the file:

1. ``torch.load(weights_only=True)``: tensors, containers and the few types torch allows;
2. if that refuses the file (official checkpoints pickle argparse namespaces, numpy scalars, yacs configs), a
   restricted unpickler: torch's allowed types plus the classes the caller names in ``trusted`` are rebuilt, every
   other class becomes an inert :class:`InertObject` (a plain dict that keeps nothing callable). No ``__reduce__``
   of the file is ever called, so a file that would run ``os.system`` when unpickled is refused or made inert.

Finding the weights is written once for the tools, the mm backbones and the families' filters:
``select_state_dict`` looks for EMA weights under :data:`EMA_KEYS` (when asked) and plain weights under
:data:`PLAIN_KEYS`; ``module.`` prefixes are dropped, ``strip_prefix`` keeps one sub-model (``backbone.``).

Writing goes through a temporary file in the destination folder, flushed and fsynced, then renamed: a crash or a full
disk leaves either the previous file or the new one, never a torn one.

This module imports torch (and safetensors when a ``.safetensors`` file is read) only: it sits below the models and
mm in the import arrows.
"""
import contextlib
import os
import pickle
import shutil
import types
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

__all__ = [
    'TRAIN_FORMAT', 'EMA_KEYS', 'PLAIN_KEYS', 'CheckpointError', 'InertObject', 'read_checkpoint',
    'is_training_checkpoint', 'select_state_dict', 'strip_prefix', 'clean_keys', 'atomic_write', 'atomic_save',
    'atomic_copy', 'numpy_trusted',
]

TRAIN_FORMAT = 'vmamba_zoo.train'

# Where checkpoints keep their EMA weights: tools/train.py and timm ('state_dict_ema'), Swin-style official files
# ('model_ema'), EfficientVMamba ('ema_model') and a few others ('ema').
EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema_model', 'ema')
# Where they keep their plain weights, in the order looked at.
PLAIN_KEYS = ('state_dict', 'model', 'module')


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely, or that holds no usable weights."""


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


def _global_name(obj) -> str:
    return f'{obj.__module__}.{getattr(obj, "__qualname__", obj.__name__)}'


def _trusted_table(trusted: Iterable) -> Dict[str, Any]:
    """``trusted`` entries are classes/functions or ``(obj, 'module.name')`` pairs (for objects pickled under another
    module path than their own, e.g. numpy 1 files read by numpy 2)."""
    table = {}
    for entry in trusted:
        if isinstance(entry, tuple):
            obj, name = entry
        else:
            obj, name = entry, _global_name(entry)
        table[name] = obj
    return table


def _inert_pickle_module(trusted: Dict[str, Any]) -> types.ModuleType:
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(getattr(wou, '_get_user_allowed_globals', lambda: {})())
    allowed.update(trusted)
    trusted_classes = tuple(v for v in trusted.values() if isinstance(v, type))

    def class_attribute(owner, name):
        # Files pickle methods as getattr(class, name) (mmengine's HistoryBuffer.statistics_methods). A free getattr
        # would reach any object's globals: only public attributes of trusted classes are given, others are inert.
        if isinstance(owner, type) and owner in trusted_classes and isinstance(name, str) and \
                not name.startswith('_'):
            return getattr(owner, name)
        return InertObject()

    allowed['builtins.getattr'] = allowed['__builtin__.getattr'] = class_attribute
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

    module = types.ModuleType('inert_pickle')
    module.Unpickler = InertUnpickler
    module.load = load
    for name in ('UnpicklingError', 'HIGHEST_PROTOCOL', 'Pickler', 'dump', 'dumps', 'loads'):
        setattr(module, name, getattr(pickle, name))
    return module


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0]}' if text else type(error).__name__


def _download(url: str) -> str:
    """A URL's file in torch hub's cache (downloaded once); the file is then read like a local one."""
    from urllib.parse import urlparse
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.basename(urlparse(url).path))
    if not os.path.exists(path):
        torch.hub.download_url_to_file(url, path, progress=False)
    return path


def check_pretrained_source(model_name: str, pretrained: bool, kwargs: Dict[str, Any],
                            default_cfg: Optional[Dict[str, Any]] = None) -> None:
    """Fail at once, with one line, when ``pretrained=True`` cannot be honoured (called before the model is built).

    ``kwargs``: the model's keyword arguments (``pretrained_cfg_overlay=dict(file=...)`` or ``pretrained_cfg``);
    ``default_cfg``: the model's pretrained cfg as a dict (``url``, ``hf_hub_id``, ``notes``).
    A local file that does not exist raises FileNotFoundError naming the path (timm would raise an empty one); one
    that exists is read here with :func:`read_checkpoint` (no code runs from it; :data:`EMA_KEYS` preferred) and
    its weights replace it in ``kwargs['pretrained_cfg_overlay']``, so timm loads them through the family's filter. A cfg
    with nothing downloadable and no file given raises ValueError naming where to get the weights (``notes``)
    instead of silently keeping random weights.
    """
    if not pretrained:
        return
    sources = {}
    for given in (kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')):
        if given is not None and not isinstance(given, str):
            sources.update({k: v for k, v in (given if isinstance(given, dict) else vars(given)).items()
                            if v not in (None, '')})
    if sources.get('state_dict') is not None:
        return
    file = sources.get('file')
    if file is not None:
        if not os.path.isfile(file):
            raise FileNotFoundError(f'{model_name}: pretrained file not found: {file}')
        # timm would read the file itself (plain torch.load, its own two EMA keys): read it here instead, with the
        # project's one reader, and hand timm the weights (its highest-priority source). Like timm, EMA weights are
        # preferred where the file has them; the family's checkpoint_filter_fn still maps official layouts.
        checkpoint = read_checkpoint(file)
        use_ema = isinstance(checkpoint, dict) and ema_weights(checkpoint) is not None
        overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
        overlay['state_dict'] = select_state_dict(checkpoint, use_ema=use_ema)
        kwargs['pretrained_cfg_overlay'] = overlay
        return
    merged = {**(default_cfg or {}), **sources}
    if not (merged.get('url') or merged.get('hf_hub_id')):
        notes = ' '.join(merged.get('notes') or ()) or 'this model has no published weights'
        raise ValueError(f'{model_name} has no downloadable weights: {notes}')


def read_checkpoint(path, map_location='cpu', trusted: Iterable = (), mmap: bool = False) -> Any:
    """The content of a checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.ckpt``, ``.bin``) or http(s) URL,
    read without running code from it.

    ``trusted``: classes the caller knows to be harmless and wants rebuilt for real (e.g. mmengine's HistoryBuffer);
    every other class outside torch's allow-list becomes an :class:`InertObject`.
    Raises FileNotFoundError for a missing file and :class:`CheckpointError` (one line: the file and why) for a file
    that cannot be read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path or URL string, got {type(path).__name__}')
    path = str(path)
    if path.startswith(('http://', 'https://')):
        if path.endswith('.safetensors'):
            raise ValueError(f'download {path} first: safetensors are read from local files only')
        path = _download(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        import safetensors.torch
        try:
            return safetensors.torch.load_file(path, device=str(map_location))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f'cannot read checkpoint {path}: {_first_line(e)}') from e
    table = _trusted_table(trusted)
    objects = [obj if name == _global_name(obj) else (obj, name) for name, obj in table.items()]
    guard = torch.serialization.safe_globals(objects) if objects else contextlib.nullcontext()
    kwargs = dict(map_location=map_location, mmap=True) if mmap else dict(map_location=map_location)
    with guard:
        try:
            return torch.load(path, weights_only=True, **kwargs)
        except Exception as first_error:  # noqa: BLE001  (UnpicklingError or RuntimeError depending on torch)
            try:
                return torch.load(path, weights_only=False, pickle_module=_inert_pickle_module(table), **kwargs)
            except Exception as e:  # noqa: BLE001
                reason = first_error if _is_corrupt(first_error) else e
                raise CheckpointError(f'cannot read checkpoint {path}: {_first_line(reason)}') from first_error


def _is_corrupt(error: BaseException) -> bool:
    """An error about the file's bytes (truncated zip, bad magic number), as opposed to its pickled classes."""
    text = str(error)
    return 'Weights only load failed' not in text and 'Unsupported global' not in text


def numpy_trusted() -> Tuple:
    """numpy arrays, scalars and dtypes, rebuilt for real (for mmengine checkpoints, whose message hub holds
    arrays); listed under both module paths numpy pickles them with (numpy 1: ``numpy.core``, 2: ``numpy._core``)."""
    import numpy as np
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    out = [np.ndarray, np.dtype]
    for fn in ('_reconstruct', 'scalar'):
        obj = getattr(multiarray, fn)
        out += [(obj, f'numpy.core.multiarray.{fn}'), (obj, f'numpy._core.multiarray.{fn}')]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return tuple(out)


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get('format') == TRAIN_FORMAT


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def clean_keys(state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of ``state_dict``, with the ``module.`` prefixes of (Distributed)DataParallel dropped."""
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out


def ema_weights(checkpoint: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(key, weights)`` of the EMA weights a checkpoint holds, or None."""
    if isinstance(checkpoint, dict):
        for key in EMA_KEYS:
            if isinstance(checkpoint.get(key), dict) and checkpoint[key]:
                return key, checkpoint[key]
    return None


def select_state_dict(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: ``{'model': ...}``, ``{'state_dict': ...}``, ``{'module': ...}``, a bare dict
    of tensors, or with ``use_ema`` the EMA weights (:data:`EMA_KEYS`; a checkpoint without them is an error, never a
    silent fall back to the plain weights). ``module.`` prefixes are dropped."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'checkpoint holds a {type(checkpoint).__name__}, expected a dict of tensors')
    if use_ema:
        found = ema_weights(checkpoint)
        if found is None:
            raise CheckpointError(f'checkpoint has no EMA weights (looked for {list(EMA_KEYS)}); '
                                  f'top-level keys are {sorted(map(str, checkpoint))[:20]}')
        return clean_keys(found[1])
    for key in PLAIN_KEYS:
        if _is_state_dict(checkpoint.get(key)):
            return clean_keys(checkpoint[key])
    if _is_state_dict(checkpoint):
        return clean_keys(checkpoint)
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(checkpoint) // 2:
        # A bare state dict with a few non-tensor extras (e.g. an 'epoch' entry).
        return clean_keys(tensors)
    raise CheckpointError(
        f'no state dict found in checkpoint; looked for {list(PLAIN_KEYS)} or a bare dict of tensors, '
        f'top-level keys are {sorted(map(str, checkpoint))[:20]}')


def unwrap(checkpoint: Dict[str, Any], wrappers: Sequence[str]) -> Dict[str, Any]:
    """The dict under the first of ``wrappers`` that holds one, else ``checkpoint`` itself. The order is the
    caller's: each family's official files decide which weights it prefers (plain or EMA)."""
    for wrapper in wrappers:
        if isinstance(checkpoint.get(wrapper), dict):
            return checkpoint[wrapper]
    return checkpoint


def without_wrapper_prefix(key: str) -> str:
    """``key`` without a leading ``module.`` (DataParallel), then without a leading ``backbone.`` (mm models)."""
    for prefix in ('module.', 'backbone.'):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def backbone_weights(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` without its ``module.`` prefixes; of a detection or segmentation checkpoint (keys under
    ``backbone.``) only the backbone's weights, unprefixed."""
    has_backbone = any(k.startswith('backbone.') for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        while k.startswith('module.'):
            k = k[len('module.'):]
        if has_backbone:
            if not k.startswith('backbone.'):
                continue
            k = k[len('backbone.'):]
        out[k] = v
    return out


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: Optional[str]) -> Dict[str, torch.Tensor]:
    """Keep only keys under ``prefix`` (e.g. 'backbone.') and drop it, like mmengine's Pretrained(prefix=...)."""
    if not prefix:
        return dict(state_dict)
    if not prefix.endswith('.'):
        prefix += '.'
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(f'no key in the checkpoint starts with prefix {prefix!r}; '
                              f'first keys: {list(state_dict)[:10]}')
    return out


# ------------------------------------------------------------------------------------------------------- writing
def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    Any error (a full disk included) removes the temporary file and leaves ``path`` as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src, dst) -> None:
    """An independent copy of ``src`` at ``dst`` (never a hard link: damage to one file must not reach the other),
    written atomically."""
    def write(f):
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f, 1 << 20)
    atomic_write(dst, write)
