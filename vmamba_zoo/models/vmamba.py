"""VMamba v2 (and a VMamba-T with MHS-VM's multi-head scan) for image classification.

Papers:
* `VMamba: Visual State Space Model` - https://arxiv.org/abs/2401.10166
* `MHS-VM: Multi-Head Scanning in Parallel Subspaces for Vision Mamba` - https://arxiv.org/abs/2406.05992

Official code: https://github.com/MzeroMiko/VMamba (MIT), https://github.com/PixDeep/MHS-VM (Apache-2.0).

The v2 models ("s1l8", "s1l20": d_state 1, ssm_ratio 1, forward_type ``v05_noz``) are rebuilt channels-last:
the official LayerNorm2d / Linear2d on NCHW are a LayerNorm / Linear on NHWC with the same weights. The
four-way cross scan is one fused ``selective_scan_2d`` over the "cross" routes; delta, B and C are computed
per pixel for every route (they are pointwise projections), so no permuted copy of the input is made.
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from timm.models import register_notrace_module
from timm.models.mambaout import Downsample, Stem

from vmamba_kernels import selective_scan_2d

from ._builder import build_zoo_model, zoo_cfg
from ..checkpoint import unwrap, without_wrapper_prefix
from ..layers.heads import ClassifierHeadMixin, channels_last_head
from ..layers.init import init_linear_and_norm
from ..layers.input_size import check_images
from ..layers.stages import ChannelsLastStagesMixin, Stage
from ..layers.norm import LayerNorm, LowPrecisionLayerNorm, read_by_gemm
from ..layers.route_scan import RouteScanParams, per_route_linear
from ..layers.routes import device_routes
from ..layers.scan_params import resolve_dt_rank

__all__ = ['VMamba', 'SS2D', 'MultiHeadScan', 'ScanRouteAttention']


@register_notrace_module
class SS2D(RouteScanParams):
    """VMamba's SS2D, forward_type ``v05_noz`` (no z gate), channels-last (B, H, W, C).

    in_proj → depthwise conv → SiLU → cross scan (4 routes, summed) → LayerNorm → out_proj.
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 1,
            ssm_ratio: float = 1.0,
            dt_rank: Union[int, str] = 'auto',
            d_conv: int = 3,
            conv_bias: bool = False,
            act_layer=nn.SiLU,
    ):
        d_inner = int(ssm_ratio * dim)
        dt_rank = resolve_dt_rank(dim, dt_rank)
        super().__init__(num_routes=4, channels=d_inner, d_state=d_state, dt_rank=dt_rank)
        self.in_proj = nn.Linear(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias,
        ) if d_conv > 1 else None
        self.act = act_layer()
        self.out_norm = LowPrecisionLayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)
        if self.conv2d is not None:
            x = self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.act(x)
        Bt, H, W, C = x.shape
        delta, Bs, Cs = self.project(x)
        A, D, delta_bias = self.scan_params()
        y = selective_scan_2d(
            x, delta, A, Bs, Cs, D, delta_bias, delta_softplus=True,
            routes=device_routes('cross', H, W, x.device), merge='sum',
        )
        return self.out_proj(self.out_norm(y))


class ScanRouteAttention(nn.Module):
    """MHS-VM's gated fusion unit (GFU, "scan route attention") over the route dim.

    y = sum_k y_k · ReLU(std_k(y) / (mean_k(y - min_k y) + 1e-5) - t), std unbiased as ``torch.std``.
    """

    def __init__(self, t: float = 0.0, dim: int = -2):
        super().__init__()
        self.t = t
        self.dim = dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # over the K route slices one at a time: on CPU, torch.std's reduction of a few (K = 4) values per
        # output runs tens of times slower than these elementwise steps
        routes = y.unbind(self.dim)
        K = len(routes)
        y_sum = sum(routes[1:], routes[0])
        y_mean = y_sum / K
        y_min = functools.reduce(torch.minimum, routes)
        y_var = sum((r - y_mean).square() for r in routes) / (K - 1)
        cv = y_var.sqrt() / (y_mean - y_min + 1e-5)
        return y_sum * F.relu(cv - self.t)


@register_notrace_module
class MultiHeadScan(RouteScanParams):
    """MHS-VM's un-gated VSS module with the multi-head scan (MHSM), channels-last (B, H, W, C).

    depthwise conv → SiLU → x_ssproj (C → n·S, S = C // n) → head h scans its S channels along the four
    routes of pattern h (r0, r0 reversed, r1, r1 reversed; d_state 16, no expansion) → GFU over the four →
    concat heads → LayerNorm → y_proj (n·S → C) → LayerNorm.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 4,
            patterns: Sequence[str] = ('C', 'X', 'S', 'Z'),
            d_state: int = 16,
            dt_rank: Union[int, str] = 'auto',
            d_conv: int = 3,
            conv_bias: bool = True,
            gfu_t: float = 0.0,
            act_layer=nn.SiLU,
    ):
        patterns = tuple(patterns)
        if len(patterns) != num_heads:
            raise ValueError(f'one scan pattern per head: num_heads={num_heads}, got patterns {patterns}')
        head_dim = dim // num_heads
        dt_rank = resolve_dt_rank(head_dim, dt_rank)
        super().__init__(num_routes=4 * num_heads, channels=head_dim, d_state=d_state, dt_rank=dt_rank)
        self.num_heads, self.head_dim, self.patterns = num_heads, head_dim, patterns
        self.conv2d = nn.Conv2d(dim, dim, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=dim, bias=conv_bias)
        self.act = act_layer()
        self.x_ssproj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.gfu = ScanRouteAttention(gfu_t, dim=-2)
        self.cat_norm = LayerNorm(num_heads * head_dim)
        self.y_proj = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.out_norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        Bt, H, W, _ = x.shape
        n, S = self.num_heads, self.head_dim
        xh = self.x_ssproj(x).view(Bt, H, W, n, S)
        # unflatten, not view(..., -1): an empty batch leaves -1 nothing to infer from
        x_dbl = per_route_linear(xh, self.x_proj_weight.view(n, -1, S)).unflatten(-1, (4, -1)).flatten(-3, -2)
        delta, Bs, Cs, A, D, delta_bias = self.scan_inputs(x_dbl)
        # route k belongs to head k // 4 and reads that head's channels
        xs = xh.unsqueeze(4).expand(Bt, H, W, n, 4, S).reshape(Bt, H, W, 4 * n, S)
        routes = device_routes('multihead', H, W, x.device, patterns=self.patterns)
        ys = selective_scan_2d(xs, delta, A, Bs, Cs, D, delta_bias, delta_softplus=True, routes=routes, merge='none')
        y = self.gfu(ys.view(Bt, H, W, n, 4, S)).reshape(Bt, H, W, n * S)
        return self.out_norm(self.y_proj(self.cat_norm(y)))


class VSSBlock(nn.Module):
    """x + DropPath(mixer(norm1(x))), then x + DropPath(mlp(norm2(x))); channels-last."""

    def __init__(
            self,
            dim: int,
            mixer: str = 'ss2d',
            mixer_kwargs: Optional[dict] = None,
            mlp_ratio: float = 4.0,
            drop_path: float = 0.,
            norm_layer=LayerNorm,
    ):
        super().__init__()
        mixer_cls = {'ss2d': SS2D, 'mhs': MultiHeadScan}[mixer]
        self.norm1 = read_by_gemm(norm_layer(dim))
        self.mixer = mixer_cls(dim, **(mixer_kwargs or {}))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = read_by_gemm(norm_layer(dim))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VMamba(ClassifierHeadMixin, ChannelsLastStagesMixin, nn.Module):
    """VMamba v2 (VSSM with patchembed v2, downsample v3, LayerNorm), channels-last internally.

    Args:
        in_chans: input image channels.
        num_classes: classifier classes (0 removes the classifier).
        global_pool: 'avg' or '' (no pooling).
        depths: blocks per stage.
        dims: channels per stage.
        mixer: 'ss2d' (VMamba's cross scan) or 'mhs' (MHS-VM's multi-head scan).
        mixer_kwargs: keyword arguments of the mixer (SS2D or MultiHeadScan).
        mlp_ratio: hidden ratio of the MLP in each block.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear from 0 over all blocks.
    """
    # check_images refuses dynamo=False; onnxruntime rejects any other size in the graphs it wrote
    torchscript_onnx_unsupported = ("its graph keeps sizes of the example input as constants (the scan's reshapes "
                                    "of the route-folded tensors), so the file fails at any other input size")

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (2, 2, 8, 2),
            dims: Sequence[int] = (96, 192, 384, 768),
            mixer: str = 'ss2d',
            mixer_kwargs: Optional[dict] = None,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,  # any size works; accepted for timm
    ):
        super().__init__()
        norm_layer = LayerNorm  # eps 1e-5 as the official LayerNorm2d
        self.check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.output_fmt = 'NHWC'
        dims = list(dims)
        self.stem = Stem(in_chans, dims[0], act_layer=nn.GELU, norm_layer=norm_layer)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.Sequential()
        self.feature_info = []
        prev_dim, stride, cur = dims[0], 4, 0
        for i, depth in enumerate(depths):
            if i > 0:
                stride *= 2
            self.stages.append(Stage(
                # official downsample "v3": 3x3 stride-2 conv then LayerNorm, at the end of the previous layer
                Downsample(prev_dim, dims[i], norm_layer=norm_layer) if i > 0 else None,
                [VSSBlock(dims[i], mixer=mixer, mixer_kwargs=mixer_kwargs, mlp_ratio=mlp_ratio, drop_path=dpr[cur + j],
                          norm_layer=norm_layer) for j in range(depth)],
            ))
            prev_dim, cur = dims[i], cur + depth
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f'stages.{i}'))

        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = norm_layer(dims[-1])
        self.head = channels_last_head(dims[-1], num_classes, global_pool, drop_rate)
        # as the official VSSM: trunc-normal Linear weights, zero biases, unit LayerNorms (convs keep torch's)
        self.apply(init_linear_and_norm)


    @torch.jit.ignore
    def no_weight_decay(self):
        return {'*.A_logs', '*.Ds', '*.dt_projs_bias', '*norm*'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(check_images(self, x))
        x = self.stages(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _official_to_ours(key: str) -> Optional[str]:
    """Official VSSM key → ours, or None for keys we do not have (detection out-norms, decoders)."""
    stem = {'patch_embed.0.': 'stem.conv1.', 'patch_embed.2.': 'stem.norm1.',
            'patch_embed.5.': 'stem.conv2.', 'patch_embed.7.': 'stem.norm2.',
            'classifier.norm.': 'norm.', 'classifier.head.': 'head.fc.'}
    for old, new in stem.items():
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split('.')
    if parts[0] != 'layers':
        return None
    i = int(parts[1])
    if parts[2] == 'downsample':  # layers.i.downsample.{1 conv, 3 norm} → stages.(i+1).downsample
        sub = {'1': 'conv', '3': 'norm'}[parts[3]]
        return '.'.join([f'stages.{i + 1}.downsample', sub] + parts[4:])
    if parts[2] == 'blocks':
        rest = '.'.join(parts[5:])
        sub = {'norm': 'norm1', 'op': 'mixer', 'norm2': 'norm2', 'mlp': 'mlp'}[parts[4]]
        return f'stages.{i}.blocks.{parts[3]}.{sub}.{rest}'
    return None


# The current official SS2D keeps x_proj and dt_projs as (grouped) Linear modules, where the released checkpoints
# have stacked parameters; the official code loads both, viewing one as the other (its _load_from_state_dict).
_SCAN_MODULE_KEYS = {'x_proj.weight': 'x_proj_weight', 'x_proj.bias': 'x_proj_bias',
                     'dt_projs.weight': 'dt_projs_weight', 'dt_projs.bias': 'dt_projs_bias'}


def _stacked_scan_key(key: str) -> str:
    """``...x_proj.weight`` (K·(R + 2N), C) and the other module keys → the stacked names we store."""
    for module_key, stacked in _SCAN_MODULE_KEYS.items():
        if key.endswith('.' + module_key):
            return key[:-len(module_key)] + stacked
    return key


def checkpoint_filter_fn(state_dict: dict, model: VMamba) -> dict:
    """Official VMamba checkpoint (``{'model': ..., 'model_ema': ...}``, or a bare / mm ``state_dict``) → ours.

    Prefers the ``model`` weights, then ``model_ema``. Strips ``module.`` / ``backbone.``, renames keys,
    drops keys we do not have (``outnorm{i}`` of the detection backbone), reshapes 1x1-conv-shaped
    Linear2d weights to Linear, and reads both official SS2D layouts: stacked ``x_proj_weight`` /
    ``dt_projs_weight`` / ``dt_projs_bias`` parameters, or ``x_proj`` / ``dt_projs`` modules (same values,
    flattened over the routes).
    """
    state_dict = unwrap(state_dict, ('model', 'model_ema', 'state_dict'))
    ours = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = without_wrapper_prefix(k)
        if k not in ours:
            k = _official_to_ours(k)
            if k is None:
                continue
        stacked = _stacked_scan_key(k)
        if stacked != k and stacked in ours and v.numel() == ours[stacked].numel():
            k, v = stacked, v.reshape(ours[stacked].shape)
        if k in ours and v.ndim == 4 and ours[k].ndim == 2:
            v = v.flatten(1)
        out[k] = v
    return out


_FAMILY_CFG = dict(
    first_conv='stem.conv1', license='mit', paper_ids='arXiv:2401.10166', paper_name='VMamba: Visual State Space Model',
    origin_url='https://github.com/MzeroMiko/VMamba',
)


def _cfg(url: str = '', **kwargs):
    return zoo_cfg(url, _FAMILY_CFG, **kwargs)


_RELEASES = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'

default_cfgs = generate_default_cfgs({
    'vmamba_tiny_s1l8.in1k': _cfg(url=_RELEASES + 'vssm1_tiny_0230s_ckpt_epoch_264.pth'),
    'vmamba_small_s1l20.in1k': _cfg(url=_RELEASES + 'vssm1_small_0229s_ckpt_epoch_240.pth'),
    'vmamba_base_s1l20.in1k': _cfg(url=_RELEASES + 'vssm1_base_0229s_ckpt_epoch_225.pth'),
    'vmamba_tiny_mhs': _cfg(
        license='apache-2.0', paper_ids='arXiv:2406.05992',
        paper_name='MHS-VM: Multi-Head Scanning in Parallel Subspaces for Vision Mamba',
        origin_url='https://github.com/PixDeep/MHS-VM',
    ),
})


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    return build_zoo_model(VMamba, variant, pretrained, checkpoint_filter_fn, **kwargs)


_V2 = dict(d_state=1, ssm_ratio=1.0, d_conv=3, conv_bias=False)


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs) -> VMamba:
    model_args = dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768), mixer_kwargs=_V2)
    return _create_vmamba('vmamba_tiny_s1l8', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_small_s1l20(pretrained: bool = False, **kwargs) -> VMamba:
    model_args = dict(depths=(2, 2, 20, 2), dims=(96, 192, 384, 768), mixer_kwargs=_V2)
    return _create_vmamba('vmamba_small_s1l20', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_base_s1l20(pretrained: bool = False, **kwargs) -> VMamba:
    model_args = dict(depths=(2, 2, 20, 2), dims=(128, 256, 512, 1024), mixer_kwargs=_V2)
    return _create_vmamba('vmamba_base_s1l20', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_tiny_mhs(pretrained: bool = False, **kwargs) -> VMamba:
    mhs = dict(num_heads=4, patterns=('C', 'X', 'S', 'Z'), d_state=16, gfu_t=0.0)
    model_args = dict(depths=(2, 2, 8, 2), dims=(96, 192, 384, 768), mixer='mhs', mixer_kwargs=mhs)
    return _create_vmamba('vmamba_tiny_mhs', pretrained=pretrained, **dict(model_args, **kwargs))
