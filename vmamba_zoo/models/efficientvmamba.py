""" EfficientVMamba: atrous selective scan for lightweight visual Mamba.

Paper: `EfficientVMamba: Atrous Selective Scan for Light Weight Visual Mamba` - https://arxiv.org/abs/2403.09977
Official code (Apache-2.0): https://github.com/TerryPei/EfficientVMamba

Architecture (channels-last (B, H, W, C) throughout, as the official model):
    stem:       Conv 4x4 s4 + LayerNorm
    stages 0-1: EVSS blocks. x + DropPath(gate(ES2D(LN x)) + gate(ConvBranch(LN x))) where one BiAttn
                channel gate is shared by both branches and ES2D scans the 4 stride-2 sub-grids of the map
                (the atrous routes of ``vmamba_kernels.scan_routes``), each with its own SSM parameters.
    stages 2-3: MobileNetV2 inverted residuals (expand 4, dw 3x3, SE 1/8, ReLU).
    downsample: patch merging (2x2 neighbours concatenated → LayerNorm(4C) → Linear 4C→2C, no bias), at the
                start of stages 1-3; odd maps are zero-padded at the bottom/right first, as upstream.
    head:       LayerNorm → global average pool → Linear.

The scan runs through ``vmamba_kernels.selective_scan_2d``, so every backend of the kernel library (the exact
reference on CPU, fused Triton kernels on GPU) serves the model.
"""
import math
import re
from collections import OrderedDict
from functools import partial
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models._features_fx import register_notrace_module

from vmamba_kernels import selective_scan_2d

from ._builder import build_zoo_model, zoo_cfg
from ..checkpoint import backbone_weights, unwrap
from ..layers.heads import ClassifierHeadMixin, channels_last_head, linear_head_keys_to_fc
from ..layers.init import init_linear_and_norm
from ..layers.input_size import check_images
from ..layers.stages import ChannelsLastStagesMixin, Stage
from ..layers.norm import LayerNorm, LowPrecisionLayerNorm, read_by_gemm
from ..layers.route_scan import fewer_launches, route_projections
from ..layers.routes import device_routes
from ..layers.scan_params import at_least_fp32, init_A_log_and_D_, init_dt_projection_, resolve_dt_rank

__all__ = ['EfficientVMamba']

# Sub-grid (h parity, w parity) that atrous route k visits: [(0, 0) row-major, (1, 0) column-major,
# (0, 1) row-major, (1, 1) column-major], the order of ``scan_routes("atrous", H, W, step=2)``.
ATROUS_PARITIES = ((0, 0), (1, 0), (0, 1), (1, 1))


def owned_values(per_route: torch.Tensor, owned_entries: torch.Tensor) -> torch.Tensor:
    """per_route (Bt, H, W, K, F) → (Bt, H, W, 1, F): each pixel's values for the route that visits it
    (``owned_entries``, the ``device_routes`` table). The scan reads nothing else, so it keeps (and saves for
    backward) one value per pixel instead of K; the others' gradient is zero, as the scan's own. An index
    select, whose backward keeps only the index (gather's would keep per_route alive)."""
    Bt, H, W, _, F_ = per_route.shape
    return per_route.flatten(1, 3).index_select(1, owned_entries).view(Bt, H, W, 1, F_)


@register_notrace_module  # routes depend on the runtime map size
class EfficientScan2d(nn.Module):
    """ES2D: the SS2D mixer of EVSS blocks with the atrous (stride-2 sub-grid) scan.

    in_proj C→2·Di splits into x and the gate z; x passes a depthwise 3x3 conv and SiLU; each of the 4 sub-grids
    of x is scanned once (none reversed) with its own x_proj, dt_proj, A and D; the outputs land back on their
    pixels, then LayerNorm, · SiLU(z), out_proj Di→C.

    Every pixel belongs to exactly one route, so its dt/B/C are projected only with its own route's weights
    (the FLOPs of the official code) and the (B, H, W, 1, ·) result is broadcast over the route axis:
    route k only ever reads the pixels it owns.

    Parameter layout follows the official checkpoints: x_proj_weight (K, R+2N, Di), dt_projs_weight (K, Di, R),
    dt_projs_bias (K, Di), A_logs (K·Di, N), Ds (K·Di).
    """
    num_routes = 4

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            ssm_ratio: float = 2.0,
            dt_rank: Union[int, str] = 'auto',
            d_conv: int = 3,
            conv_bias: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        K = self.num_routes
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.dt_rank = resolve_dt_rank(dim, dt_rank)
        self.d_state = d_state

        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False, **dd)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias, **dd)
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner, **dd))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank, **dd))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner, **dd))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state, **dd))
        self.Ds = nn.Parameter(torch.empty(K * d_inner, **dd))
        self.register_buffer('route_eye', torch.eye(K, **dd), persistent=False)
        self.out_norm = LowPrecisionLayerNorm(d_inner, **dd)
        self.out_proj = nn.Linear(d_inner, dim, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Mamba's initialization, as upstream: x_proj like nn.Linear, dt_proj uniform ±R^-0.5 with a bias that
        puts softplus(bias) log-uniformly in ``init_dt_projection_``'s range, S4D-real A, D = 1."""
        bound = 1. / math.sqrt(self.d_inner)
        self.x_proj_weight.uniform_(-bound, bound)
        init_dt_projection_(self.dt_projs_weight, self.dt_projs_bias)
        init_A_log_and_D_(self.A_logs, self.Ds)

    def _project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pixel dt (B, H, W, Di), B and C (B, H, W, N) with the weights of the route owning the pixel."""
        Bt, H, W, Di = x.shape
        R, N = self.dt_rank, self.d_state
        delta = x.new_empty(Bt, H, W, Di)
        B = x.new_empty(Bt, H, W, N)
        C = x.new_empty(Bt, H, W, N)
        for k, (ph, pw) in enumerate(ATROUS_PARITIES):
            dt_k, B_k, C_k = F.linear(x[:, ph::2, pw::2], self.x_proj_weight[k]).split([R, N, N], dim=-1)
            delta[:, ph::2, pw::2] = F.linear(dt_k, self.dt_projs_weight[k])
            B[:, ph::2, pw::2] = B_k
            C[:, ph::2, pw::2] = C_k
        return delta, B, C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bt, H, W, _ = x.shape
        K, Di, N = self.num_routes, self.d_inner, self.d_state
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = self.act(z)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)

        if not fewer_launches(x):  # each pixel's own route's projections only (CPU, FLOP counters)
            delta, B, C = self._project(x)
            delta = delta.unsqueeze(3).expand(Bt, H, W, K, Di)
            B, C = B.unsqueeze(3).expand(Bt, H, W, K, N), C.unsqueeze(3).expand(Bt, H, W, K, N)
        else:
            # Every route's projections of every pixel: two GEMMs instead of eight on strided sub-grid copies,
            # scattered back (the step is bound by launches); route k reads only its own pixels' values.
            delta, B, C = route_projections(x, self.x_proj_weight, self.dt_projs_weight, self.route_eye)
            owned_entries = device_routes('atrous', H, W, x.device, table='owned_entries', step=2)
            delta = owned_values(delta, owned_entries).expand(Bt, H, W, K, Di)
        y = selective_scan_2d(
            x, delta, -torch.exp(at_least_fp32(self.A_logs)).view(K, Di, N), B, C,
            D=at_least_fp32(self.Ds).view(K, Di),
            delta_bias=at_least_fp32(self.dt_projs_bias),
            delta_softplus=True,
            routes=device_routes('atrous', H, W, x.device, step=2),
            merge='sum',
        )
        y = self.out_norm(y).to(z.dtype) * z
        return self.out_proj(y)


class BiAttn(nn.Module):
    """Channel gate of EVSS blocks: x · sigmoid(W2 GELU(W1 mean_hw(LN x))), channels-last."""

    def __init__(self, dim: int, act_ratio: float = 0.125, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        reduced = int(dim * act_ratio)
        self.norm = LayerNorm(dim, **dd)
        self.global_reduce = nn.Linear(dim, reduced, **dd)
        self.act = nn.GELU()
        self.channel_select = nn.Linear(reduced, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.norm(x).mean(dim=(1, 2), keepdim=True)
        attn = self.channel_select(self.act(self.global_reduce(attn)))
        return x * attn.sigmoid()


class EVSSBlock(nn.Module):
    """Efficient visual state-space block: ES2D (with ``ssm_kwargs``) and a conv branch on the same normalized
    input, each gated by the one shared BiAttn, summed into the residual. No MLP."""

    def __init__(self, dim: int, drop_path: float = 0., norm_layer=LayerNorm, device=None, dtype=None, **ssm_kwargs):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = read_by_gemm(norm_layer(dim, **dd))
        self.ssm = EfficientScan2d(dim, **ssm_kwargs, **dd)
        self.conv_branch = nn.Sequential(OrderedDict([
            ('conv_dw', nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)),
            ('norm', nn.BatchNorm2d(dim, **dd)),
            ('act', nn.GELU()),
            ('conv_pw', nn.Conv2d(dim, dim, 1, **dd)),
        ]))
        self.channel_gate = BiAttn(dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        y_conv = self.conv_branch(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.channel_gate(self.ssm(y)) + self.channel_gate(y_conv)
        return x + self.drop_path(y)


class PatchMerging(nn.Module):
    """2x2 patch merging, channels-last: [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)] → LN → Linear.
    Odd maps are zero-padded at the bottom/right before the split, as upstream."""

    def __init__(self, dim: int, out_dim: int, norm_layer=LayerNorm, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = read_by_gemm(norm_layer(4 * dim, **dd))
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def inverted_residual(dim: int, drop_path: float = 0., ir_expand_ratio: float = 4.0, ir_se_ratio: float = 0.125,
                      device=None, dtype=None) -> InvertedResidual:
    """The MobileNetV2 block of the later stages (NCHW): 1x1 expansion, dw 3x3, SE, 1x1 projection, ReLU."""
    return InvertedResidual(
        dim, dim, dw_kernel_size=3, exp_ratio=ir_expand_ratio, act_layer=nn.ReLU,
        se_layer=partial(SqueezeExcite, rd_ratio=ir_se_ratio), drop_path_rate=drop_path, device=device, dtype=dtype)


class EfficientVMambaStage(Stage):
    """Patch merging (unless the first stage), then EVSS blocks (``block_type='evss'``) or MobileNetV2 inverted
    residuals ('ir', run channels-first); ``block_kwargs`` are the options of that block type
    (``EVSSBlock``'s ES2D options, or ``inverted_residual``'s)."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            block_type: str,
            drop_path: Sequence[float],
            downsample: bool,
            norm_layer=LayerNorm,
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        dd = {'device': device, 'dtype': dtype}
        merge = PatchMerging(in_dim, dim, norm_layer=norm_layer, **dd) if downsample else None
        if block_type == 'evss':
            blocks = [EVSSBlock(dim, drop_path=drop_path[i], norm_layer=norm_layer, **dd, **block_kwargs)
                      for i in range(depth)]
        elif block_type == 'ir':
            blocks = [inverted_residual(dim, drop_path[i], **dd, **block_kwargs) for i in range(depth)]
        else:
            raise ValueError(f"block_type must be 'evss' or 'ir', got {block_type!r}")
        super().__init__(merge, blocks, channels_first=block_type == 'ir')


class EfficientVMamba(ClassifierHeadMixin, ChannelsLastStagesMixin, nn.Module):
    """EfficientVMamba: EVSS stages (atrous selective scan + conv branch) then inverted-residual stages."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Union[int, Sequence[int]] = 48,
            depths: Sequence[int] = (2, 2, 4, 2),
            block_types: Sequence[str] = ('evss', 'evss', 'ir', 'ir'),
            patch_size: int = 4,
            d_state: int = 16,
            ssm_ratio: float = 2.0,
            dt_rank: Union[int, str] = 'auto',
            ir_expand_ratio: float = 4.0,
            ir_se_ratio: float = 0.125,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        num_stages = len(depths)
        if isinstance(dims, int):
            dims = [dims * 2 ** i for i in range(num_stages)]
        if len(dims) != num_stages or len(block_types) != num_stages:
            raise ValueError(f'dims {dims}, depths {depths} and block_types {block_types} must have one entry per stage')
        self.check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.output_fmt = 'NHWC'  # forward_features' layout (the stages run channels-last)
        self.dims = list(dims)
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(in_chans, dims[0], patch_size, stride=patch_size, **dd)),
            ('permute', ToChannelsLast()),
            ('norm', norm_layer(dims[0], **dd)),
        ]))

        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))]
        block_kwargs = {'evss': dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank),
                        'ir': dict(ir_expand_ratio=ir_expand_ratio, ir_se_ratio=ir_se_ratio)}
        self.stages = nn.Sequential()
        self.feature_info = []
        for i in range(num_stages):
            self.stages.append(EfficientVMambaStage(
                dims[max(i - 1, 0)], dims[i], depths[i], block_types[i], drop_path=dpr[i], downsample=i > 0,
                norm_layer=norm_layer, **dd, **block_kwargs.get(block_types[i], {})))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))

        self.norm = norm_layer(self.num_features, **dd)
        self.head = channels_last_head(self.num_features, num_classes, global_pool, drop_rate, **dd)

        self.apply(init_linear_and_norm)


    @torch.jit.ignore
    def no_weight_decay(self):
        return {'*A_logs', '*Ds', '*norm*'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        super().set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(check_images(self, x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _official_to_ours(key: str) -> Optional[str]:
    """Official EfficientVSSM key → ours, or None for keys that have no counterpart here."""
    if key.startswith('outnorm'):  # per-stage norms of the official detection/segmentation backbone
        return None
    key = key.replace('patch_embed.0.', 'stem.conv.').replace('patch_embed.2.', 'stem.norm.')
    key = key.replace('classifier.norm.', 'norm.').replace('classifier.head.', 'head.')
    m = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.(.*)', key)
    if m:  # EVSS stages
        i, j, rest = m.groups()
        rest = re.sub(r'^op\.', 'ssm.', rest)
        rest = re.sub(r'^se\.', 'channel_gate.', rest)
        rest = re.sub(r'^conv_branch\.0\.', 'conv_branch.conv_dw.', rest)
        rest = re.sub(r'^conv_branch\.1\.', 'conv_branch.norm.', rest)
        rest = re.sub(r'^conv_branch\.3\.', 'conv_branch.conv_pw.', rest)
        return f'stages.{i}.blocks.{j}.{rest}'
    m = re.match(r'layers\.(\d+)\.downsample\.(.*)', key)
    if m:  # patch merging at the end of an official stage = start of ours
        return f'stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}'
    m = re.match(r'layers\.(\d+)\.(\d+)\.(.*)', key)
    if m:  # inverted-residual stages: Sequential(Permute, IR × depth, Permute, PatchMerging2D)
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if rest.startswith(('norm.', 'reduction.')):
            return f'stages.{i + 1}.downsample.{rest}'
        for src, dst in (('conv_pw.0.', 'conv_pw.'), ('conv_pw.1.', 'bn1.'), ('conv_dw.0.', 'conv_dw.'),
                         ('conv_dw.1.', 'bn2.'), ('conv_pw2.0.', 'conv_pwl.'), ('conv_pw2.1.', 'bn3.')):
            if rest.startswith(src):
                rest = dst + rest[len(src):]
                break
        return f'stages.{i}.blocks.{j - 1}.{rest}'
    return key


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: EfficientVMamba) -> Dict[str, torch.Tensor]:
    """Official EfficientVMamba checkpoint (a bare state dict, or wrapped in 'state_dict' / 'model' /
    'model_ema' / 'ema_model', keys optionally prefixed 'module.' (any number) or 'backbone.') → ours."""
    state_dict = unwrap(state_dict, ('state_dict', 'model', 'model_ema', 'state_dict_ema', 'ema_model'))
    out = {}
    for k, v in backbone_weights(state_dict).items():
        if k.startswith(('stem.', 'stages.', 'norm.', 'head.')):
            out[k] = v  # already ours
            continue
        k = _official_to_ours(k)
        if k is not None:
            out[k] = v
    return linear_head_keys_to_fc(out)


_FAMILY_CFG = dict(
    first_conv='stem.conv', license='apache-2.0', paper_ids='arXiv:2403.09977',
    paper_name='EfficientVMamba: Atrous Selective Scan for Light Weight Visual Mamba',
    origin_url='https://github.com/TerryPei/EfficientVMamba',
)


def _cfg(url: str = '', **kwargs):
    return zoo_cfg(url, _FAMILY_CFG, **kwargs)


# The official Hub repositories: TerryPei/EfficientVMamba-{Tiny,Small,Base}, efficient_vmamba_{size}.ckpt.
default_cfgs = generate_default_cfgs({
    f'efficientvmamba_{size}.in1k': _cfg(
        hf_hub_id=f'TerryPei/EfficientVMamba-{size.title()}', hf_hub_filename=f'efficient_vmamba_{size}.ckpt')
    for size in ('tiny', 'small', 'base')
})


def _create_efficientvmamba(variant: str, pretrained: bool = False, **kwargs) -> EfficientVMamba:
    return build_zoo_model(EfficientVMamba, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def efficientvmamba_tiny(pretrained: bool = False, **kwargs) -> EfficientVMamba:
    model_args = dict(dims=48, depths=(2, 2, 4, 2))
    return _create_efficientvmamba('efficientvmamba_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientvmamba_small(pretrained: bool = False, **kwargs) -> EfficientVMamba:
    # dim 64 as trained (official log), not the 96 of the repo's yaml
    model_args = dict(dims=64, depths=(2, 2, 4, 2))
    return _create_efficientvmamba('efficientvmamba_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def efficientvmamba_base(pretrained: bool = False, **kwargs) -> EfficientVMamba:
    model_args = dict(dims=96, depths=(2, 2, 9, 2))
    return _create_efficientvmamba('efficientvmamba_base', pretrained=pretrained, **dict(model_args, **kwargs))
