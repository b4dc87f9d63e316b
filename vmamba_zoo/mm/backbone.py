"""Any timm-registered zoo model as an MMDetection / MMSegmentation backbone.

The backbone wraps ``timm.create_model(name, features_only=True, feature_cls='getter')``: the
timm model itself (not a copy) runs ``forward_intermediates``. On top it adds what the
official dense-prediction code of the families adds:

* ``outnorm{i}``: a LayerNorm over channels on each returned stage, named as in VMamba's,
  EfficientVMamba's and Spatial-Mamba's ``Backbone_*`` classes so their detection and
  segmentation checkpoints convert key for key;
* ``pyramid``: for plain (single-scale) models such as PlainMamba, a ViTDet-style simple
  feature pyramid (transposed convs up, max-pool down) from the stride-16 map.

It registers in mmengine's root ``MODELS`` registry; mmdet's and mmseg's registries are its
children and find it from their configs without this module importing either package.
"""
import logging
from typing import Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .checkpoint import (family_filter_fn, format_key_mismatch, official_weights_location, read_checkpoint,
                         select_state_dict, strip_prefix)

__all__ = [
    'TimmVMamba', 'SimplePyramidLevel', 'VMambaBackbone', 'SpatialMambaBackbone', 'EfficientVMambaBackbone',
    'GroupMambaBackbone', 'ViM2Backbone', 'PlainMambaBackbone',
]

_ADAPTER_PREFIXES = ('outnorm', 'pyramid.')
_ZOO_MODULES = ['plainmamba', 'efficientvmamba', 'spatialmamba', 'groupmamba', 'mambamixer', 'vmamba']


class SimplePyramidLevel(nn.Sequential):
    """One level of a ViTDet simple feature pyramid: rescale a map by ``scale`` (a power of 2).

    Up-sampling halves the channels per factor of 2 (transposed conv 2x2 s2, with LayerNorm and
    GELU between two of them), as ViTDet does; down-sampling max-pools and keeps the channels.
    """

    def __init__(self, in_chs: int, scale: float):
        log2 = torch.tensor(float(scale)).log2().item()
        if scale <= 0 or log2 != round(log2) or not -3 <= log2 <= 3:
            raise ValueError(f'pyramid scale must be a power of 2 in [1/8, 8], got {scale}')
        layers, chs, ups = [], in_chs, int(round(log2))
        for i in range(max(ups, 0)):
            if i > 0:
                layers += [LayerNorm2d(chs), nn.GELU()]
            if chs % 2:
                raise ValueError(f'cannot up-sample {in_chs} channels by {scale}: odd channel count {chs}')
            layers.append(nn.ConvTranspose2d(chs, chs // 2, kernel_size=2, stride=2))
            chs //= 2
        if ups < 0:
            layers.append(nn.MaxPool2d(kernel_size=2 ** -ups, stride=2 ** -ups))
        super().__init__(*layers)
        self.scale = float(scale)
        self.out_chs = chs


@MODELS.register_module()
class TimmVMamba(BaseModule):
    """A timm-registered model as a dense-prediction backbone returning a tuple of NCHW maps.

    Args:
        model_name: timm name, e.g. 'vmamba_tiny_s1l8', 'groupmamba_tiny', 'plainmamba_l1'.
        out_indices: feature (stage) indices to return, as for timm's ``features_only``; for
            plain models they index blocks.
        frozen_stages: -1 trains everything; k >= 0 freezes the stem and the first k stages
            (and keeps them in eval mode).
        norm_eval: keep the backbone's BatchNorm layers in eval mode while training.
        drop_path_rate: stochastic depth of the timm model (None keeps the model's default).
        with_cp: gradient checkpointing through the model's ``set_grad_checkpointing``.
        out_norms: add ``outnorm{i}`` (LayerNorm over channels, eps 1e-5) for each returned index.
        pyramid_scales: for single-scale models, the scales of a ViTDet simple feature pyramid
            built from the returned map(s), e.g. (4, 2, 1, 0.5); one map feeds every level, or
            one map per level. None returns the stage maps as they are.
        model_kwargs: further keyword arguments for ``timm.create_model``.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix=None, use_ema=False)``
            loads an ImageNet checkpoint in official or zoo format (``.pth``/``.ckpt``/
            ``.safetensors``) through the family's ``checkpoint_filter_fn``, or with
            ``prefix='backbone.'`` the backbone of a detection/segmentation checkpoint.
            ``checkpoint='official'`` fetches the official weights the timm pretrained_cfg names.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            with_cp: bool = False,
            out_norms: bool = True,
            pyramid_scales: Optional[Sequence[float]] = None,
            model_kwargs: Optional[dict] = None,
            init_cfg: Optional[dict] = None,
    ):
        super().__init__(init_cfg=init_cfg)
        import vmamba_zoo.models  # noqa: F401  registers the zoo's models with timm

        if not isinstance(model_name, str):
            raise TypeError(f'model_name must be a str, got {type(model_name).__name__}')
        if not timm.is_model(model_name):
            raise ValueError(f'{model_name!r} is not a registered timm model; '
                             f'zoo models: {timm.list_models(module=_ZOO_MODULES)}')
        if not isinstance(frozen_stages, int) or frozen_stages < -1:
            raise ValueError(f'frozen_stages must be an int >= -1, got {frozen_stages!r}')
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            self.model_kwargs['drop_path_rate'] = drop_path_rate
        if isinstance(out_indices, (list, tuple)):
            out_indices = tuple(out_indices)
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=out_indices,
            feature_cls='getter', **self.model_kwargs)
        self.out_indices = tuple(int(i) for i in self.body.feature_info.out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if with_cp:
            if not hasattr(self.body.model, 'set_grad_checkpointing'):
                raise ValueError(f'{model_name} does not support gradient checkpointing')
            self.body.model.set_grad_checkpointing(True)

        chs = self.body.feature_info.channels()
        reductions = self.body.feature_info.reduction()
        self.out_norms = out_norms
        if out_norms:
            for i, c in zip(self.out_indices, chs):
                self.add_module(f'outnorm{i}', LayerNorm2d(c, eps=1e-5))

        if pyramid_scales is not None:
            scales = tuple(pyramid_scales)
            if len(chs) not in (1, len(scales)):
                raise ValueError(f'pyramid_scales {scales} needs one feature map or one per level, '
                                 f'got {len(chs)} (out_indices {self.out_indices})')
            src = list(chs) if len(chs) == len(scales) else [chs[0]] * len(scales)
            self.pyramid = nn.ModuleList(SimplePyramidLevel(c, s) for c, s in zip(src, scales))
            self.out_channels = tuple(level.out_chs for level in self.pyramid)
            src_red = list(reductions) if len(chs) == len(scales) else [reductions[0]] * len(scales)
            self.out_strides = tuple(int(r / s) for r, s in zip(src_red, scales))
        else:
            self.pyramid = None
            self.out_channels = tuple(chs)
            self.out_strides = tuple(reductions)
        self._stage_of_param = self._assign_stages()
        self._freeze_stages()

    # ------------------------------------------------------------------ structure
    def _assign_stages(self) -> Dict[str, int]:
        """Stage index of each parameter of the timm model (-1 = stem), from feature_info modules.

        A parameter outside every stage module belongs to the stem if it comes before the first
        stage in registration order, else to the stage registered just before it.
        """
        modules = [info['module'] for info in self.body.feature_info.info]
        stage_of, current = {}, -1
        for name, _ in self.body.model.named_parameters():
            owner = next((j for j, m in enumerate(modules) if name == m or name.startswith(m + '.')), None)
            if owner is not None:
                current = owner
            stage_of[name] = current if owner is None else owner
        return stage_of

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        for name, p in self.body.model.named_parameters():
            if self._stage_of_param[name] < self.frozen_stages:
                p.requires_grad = False
        for i in self.out_indices:
            if i < self.frozen_stages and self.out_norms:
                getattr(self, f'outnorm{i}').requires_grad_(False)

    def _frozen_modules(self):
        modules = [info['module'] for info in self.body.feature_info.info][:max(self.frozen_stages, 0)]
        for name, m in self.body.model.named_modules():
            params = list(m.parameters(recurse=True))
            if params and all(not p.requires_grad for p in params):
                yield m
            elif any(name == s or name.startswith(s + '.') for s in modules):
                yield m

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_stages >= 0:
            for m in self._frozen_modules():
                m.eval()
        if mode and self.norm_eval:
            for m in self.body.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if x.ndim != 4:
            raise ValueError(f'expected an image batch (B, C, H, W), got shape {tuple(x.shape)}')
        feats = self.body(x)
        if self.out_norms:
            feats = [getattr(self, f'outnorm{i}')(f) for i, f in zip(self.out_indices, feats)]
        if self.pyramid is not None:
            if len(feats) == 1:
                feats = [level(feats[0]) for level in self.pyramid]
            else:
                feats = [level(f) for level, f in zip(self.pyramid, feats)]
        return tuple(f.contiguous() for f in feats)

    # ------------------------------------------------------------------ checkpoints
    def convert_state_dict(self, state_dict: Dict[str, torch.Tensor], what: str = 'checkpoint') -> Dict[str, torch.Tensor]:
        """Official/zoo backbone weights (+ ``outnorm{i}``/``pyramid.*``) -> this module's keys.

        Raises ValueError naming every missing, unexpected or mis-shaped key of the timm model.
        Adapter keys (outnorms, pyramid) may be absent: ImageNet checkpoints have none.
        """
        adapter = {k: v for k, v in state_dict.items() if k.startswith(_ADAPTER_PREFIXES)}
        weights = {k: v for k, v in state_dict.items() if not k.startswith(_ADAPTER_PREFIXES)}
        full = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
        weights = family_filter_fn(full)(weights, full)
        full_keys = full.state_dict()
        body_keys = self.body.model.state_dict()
        own = self.state_dict()
        missing = [k for k in body_keys if k not in weights]
        # Keys the features model pruned (head, final norm, later stages) are expected and dropped.
        unexpected = [k for k in weights if k not in full_keys]
        unexpected += [k for k in adapter if k not in own]
        mismatched = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in body_keys.items()
                      if k in weights and weights[k].shape != v.shape]
        mismatched += [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in adapter.items()
                       if k in own and v.shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(format_key_mismatch(f'{what} (for {self.model_name})', missing, unexpected, mismatched))
        out = {f'body.model.{k}': weights[k] for k in body_keys}
        out.update(adapter)
        return out

    def load_checkpoint(self, checkpoint: str, prefix: Optional[str] = None, use_ema: bool = False):
        """Load backbone weights; ``checkpoint='official'`` fetches the official ImageNet weights named
        by the model's timm pretrained_cfg (Hugging Face Hub file or URL)."""
        if checkpoint == 'official':
            checkpoint = official_weights_location(self.model_name)
        raw = read_checkpoint(checkpoint)
        state_dict = strip_prefix(select_state_dict(raw, use_ema=use_ema), prefix)
        converted = self.convert_state_dict(state_dict, what=f'checkpoint {checkpoint}')
        result = self.load_state_dict(converted, strict=False)
        if result.unexpected_keys:  # convert_state_dict only emits own keys
            raise RuntimeError(f'internal key mapping error: {result.unexpected_keys[:10]}')
        fresh = [k for k in result.missing_keys if not k.startswith('body.')]
        print_log(f'{type(self).__name__}({self.model_name}): loaded {checkpoint}'
                  + (f'; freshly initialized adapter weights: {sorted(fresh)}' if fresh else ''),
                  logger='current', level=logging.INFO)

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            unknown = set(cfg) - {'type', 'checkpoint', 'prefix', 'use_ema', 'map_location'}
            if unknown:
                raise ValueError(f'unknown Pretrained init_cfg keys for {type(self).__name__}: {sorted(unknown)}')
            self.load_checkpoint(cfg['checkpoint'], prefix=cfg.get('prefix'), use_ema=cfg.get('use_ema', False))
            self._is_init = True
        else:
            # timm already initialized the model; only other init_cfg types act here.
            super().init_weights()


def _family_alias(class_name: str, default_model: str, doc: str, **defaults):
    """A registered subclass of TimmVMamba with the family's default model and settings."""

    def __init__(self, model_name: str = default_model, **kwargs):
        TimmVMamba.__init__(self, model_name, **{**defaults, **kwargs})

    cls = type(class_name, (TimmVMamba,), dict(__init__=__init__, __doc__=doc, __module__=__name__))
    return MODELS.register_module(module=cls)


VMambaBackbone = _family_alias('VMambaBackbone', 'vmamba_tiny_s1l8', 'VMamba v2 (and MHS-VM) as a backbone.')
SpatialMambaBackbone = _family_alias('SpatialMambaBackbone', 'spatialmamba_tiny', 'Spatial-Mamba as a backbone.')
EfficientVMambaBackbone = _family_alias(
    'EfficientVMambaBackbone', 'efficientvmamba_tiny', 'EfficientVMamba as a backbone.')
GroupMambaBackbone = _family_alias('GroupMambaBackbone', 'groupmamba_tiny', 'GroupMamba as a backbone.')
ViM2Backbone = _family_alias('ViM2Backbone', 'vim2_tiny', 'MambaMixer ViM2 as a backbone.')
PlainMambaBackbone = _family_alias(
    'PlainMambaBackbone', 'plainmamba_l1',
    'PlainMamba (single-scale, stride 16) with a ViTDet-style simple feature pyramid (strides 4-32).',
    out_indices=(-1,), pyramid_scales=(4, 2, 1, 0.5))
