"""GroupMamba for timm.

Paper: `GroupMamba: Parameter-Efficient and Accurate Group Visual State Space Model`
    - https://arxiv.org/abs/2407.13772
Official code and weights (MIT): https://github.com/Amshaker/GroupMamba

A four-stage channels-last backbone. Its mixer, the modulated group Mamba layer, normalizes the tokens,
splits the channels into four groups and runs one single-route selective scan per group (row-major,
column-major and both reversed), then multiplies by the normalized input, by a squeeze-excite style
channel affinity, and normalizes again with the *same* LayerNorm. Here the four groups' scans run as one
fused ``vmamba_kernels.selective_scan_2d`` call: group k is route k of the "cross" route set, with its
own parameters stacked along the route axis.

The classifier pools with a class token (the token mean) that passes one more mixer + MLP block and a
LayerNorm, then timm's ``ClassifierHead`` (dropout, ``fc``) and a distillation head whose logits are averaged
(as timm's DeiT does).
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, register_notrace_module, trunc_normal_
from timm.models._registry import generate_default_cfgs, register_model

from vmamba_kernels import layer_norm, selective_scan_2d

from ._builder import build_zoo_model, zoo_cfg
from ..checkpoint import unwrap, without_wrapper_prefix
from ..layers.heads import ClassifierHeadMixin, channels_last_head, linear_head_keys_to_fc
from ..layers.init import init_linear_and_norm
from ..layers.input_size import check_images
from ..layers.norm import LayerNorm, read_by_gemm
from ..layers.route_scan import fewer_launches, per_route_linear
from ..layers.routes import device_routes
from ..layers.scan_params import (at_least_fp32, at_least_fp32_dtype, init_A_log_and_D_, init_dt_projection_,
                                  resolve_dt_rank)
from ..layers.stages import ChannelsLastStagesMixin, Stage

__all__ = ['GroupMamba']

NUM_GROUPS = 4  # one scan route per channel group: row-major, column-major, both reversed
def block_diagonal(weight: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """(K, O, I) weights → the (K·O, K·I) block-diagonal matrix with ``weight[k]`` as block k.

    ``eye`` is the (K, K) identity (a buffer, so building the matrix is one elementwise kernel)."""
    K, O, I = weight.shape
    return (weight.unsqueeze(2) * eye.view(K, 1, K, 1)).reshape(K * O, K * I)


class GroupedLinear(nn.Module):
    """K independent linear maps applied to the K groups of a (..., K, in_features) tensor.

    It runs as one GEMM with the block-diagonal weight over the flattened (..., K·in_features) input. The
    groups are narrow (16-112 channels per group in GroupMamba-T), so that GEMM stays memory-bound although
    it multiplies K times as many weights, while K GEMMs (``per_route_linear``) cost K launches forward, 2K
    backward, plus the stacking and its casts under autocast: the step is bound by launches, not GEMM time.
    Off CUDA and when traced (fvcore, ONNX) it runs the K GEMMs (``fewer_launches``), so CPU time and FLOP counts
    exclude the zero blocks.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features)) if bias else None
        self.register_buffer('eye', torch.eye(groups), persistent=False)
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init, as the official scan parameters keep it
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x):
        K, O, I = self.weight.shape
        if x.shape[-2:] != (K, I):
            raise ValueError(f"GroupedLinear expects (..., {K}, {I}) inputs, got {tuple(x.shape)}")
        if not fewer_launches(x):
            x = per_route_linear(x, self.weight)
            return x if self.bias is None else x + self.bias
        bias = None if self.bias is None else self.bias.flatten()
        return F.linear(x.flatten(-2), block_diagonal(self.weight, self.eye), bias).unflatten(-1, (K, O))


@register_notrace_module  # the op checks shapes in Python; fx records the norm as one call
class GroupedLayerNorm(nn.Module):
    """LayerNorm over the last dim of a (..., K, C) tensor with a separate affine per group
    (``vmamba_kernels.layer_norm`` with (K, C) parameters: one fused kernel on CUDA)."""

    def __init__(self, num_channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, num_channels))
        self.bias = nn.Parameter(torch.zeros(groups, num_channels))

    def forward(self, x, out_dtype=None):
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)


class GroupedSingleScan2d(nn.Module):
    """Four single-route SS2D blocks (VMamba's SS2D reduced to one route), one per channel group.

    Each group k has its own in_proj (with a SiLU gate z), depthwise 3x3 conv, x_proj, dt_proj, A, D,
    output LayerNorm and out_proj, exactly as the official ``SS2D(d_state=1, ssm_ratio=1, d_conv=3)``; the
    parameters are stacked along the group axis and the four scans are one ``selective_scan_2d`` call in
    which group k follows route k of ``scan_routes("cross", H, W)``.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3):
        super().__init__()
        if dim % NUM_GROUPS:
            raise ValueError(f"GroupMamba needs channels divisible by {NUM_GROUPS}, got {dim}")
        groups = NUM_GROUPS
        d_model = dim // groups
        d_inner = int(ssm_ratio * d_model)
        dt_rank = resolve_dt_rank(d_model)
        self.groups, self.d_inner, self.d_state, self.dt_rank = groups, d_inner, d_state, dt_rank

        self.in_proj = GroupedLinear(d_model, 2 * d_inner, groups)
        self.conv2d = nn.Conv2d(
            groups * d_inner, groups * d_inner, d_conv, padding=(d_conv - 1) // 2, groups=groups * d_inner)
        self.act = nn.SiLU()
        self.x_proj = GroupedLinear(d_inner, dt_rank + 2 * d_state, groups)
        # dt_proj's bias is the scan's delta_bias (added inside the scan before the softplus)
        self.dt_proj_weight = nn.Parameter(torch.empty(groups, d_inner, dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(groups, d_inner))
        init_dt_projection_(self.dt_proj_weight, self.dt_proj_bias)
        self.A_log = nn.Parameter(torch.empty(groups, d_inner, d_state))
        self.D = nn.Parameter(torch.empty(groups, d_inner))
        init_A_log_and_D_(self.A_log, self.D)
        self.register_buffer('eye', torch.eye(groups), persistent=False)
        self.out_norm = GroupedLayerNorm(d_inner, groups)
        self.out_proj = GroupedLinear(d_inner, d_model, groups)
        # nn.Linear modules upstream, so its model-wide trunc_normal_ init reaches them (not x_proj)
        trunc_normal_(self.in_proj.weight, std=.02)
        trunc_normal_(self.out_proj.weight, std=.02)

    def forward(self, x):
        """x: (B, H, W, K, d_model) → (B, H, W, K, d_model); group k is scanned along route k."""
        Bt, H, W, K, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        z = self.act(z)
        x = x.reshape(Bt, H, W, K * self.d_inner).permute(0, 3, 1, 2)  # one copy: the conv reads channels-last
        x = self.act(self.conv2d(x)).permute(0, 2, 3, 1).reshape(Bt, H, W, K, self.d_inner)

        x_dbl = self.x_proj(x)
        # The official scan runs in fp32 (force_fp32) and normalizes its fp32 output: out_dtype asks for that
        # output. x, dt, B and C are read as they are, since the kernels widen them to fp32 exactly as a cast
        # would (and round their gradients back as the cast's backward would), without fp32 copies (x's
        # would be saved for the backward in every block).
        f32 = at_least_fp32
        dt = self._dt_proj(x_dbl)
        b, c = x_dbl[..., self.dt_rank:].split(self.d_state, dim=-1)
        y = selective_scan_2d(
            x, dt, -torch.exp(f32(self.A_log)), b, c, f32(self.D),
            delta_bias=f32(self.dt_proj_bias), delta_softplus=True,
            routes=device_routes('cross', H, W, x.device), merge='none',  # route k is group k's scan order
            out_dtype=at_least_fp32_dtype(x.dtype),
        )
        y = self.out_norm(y, out_dtype=z.dtype) * z  # rounded once in the kernel, as the cast would
        return self.out_proj(y)

    def _dt_proj(self, x_dbl):
        """Group k's dt_proj on the dt_rank leading features of its x_proj output (..., K, R + 2N) → (..., K, d_inner)."""
        if not fewer_launches(x_dbl):
            return per_route_linear(x_dbl[..., :self.dt_rank], self.dt_proj_weight)
        # one GEMM over all of x_dbl: zero columns for B and C, so no copy of the dt features is made
        weight = block_diagonal(F.pad(self.dt_proj_weight, (0, 2 * self.d_state)), self.eye)
        return F.linear(x_dbl.flatten(-2), weight).unflatten(-1, (self.groups, self.d_inner))


class ChannelAffinity(nn.Module):
    """Squeeze-excite over tokens: sigmoid(fc2(relu(fc1(mean over H, W)))) → (B, C) channel weights."""

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // reduction)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(dim // reduction, dim)

    def forward(self, x):
        return torch.sigmoid(self.fc2(self.act(self.fc1(x.mean(dim=(1, 2))))))


class GroupMambaMixer(nn.Module):
    """The modulated group Mamba layer (official ``GroupMambaLayer``), channels-last (B, H, W, C)."""

    def __init__(self, dim: int, d_state: int = 1, d_conv: int = 3, ssm_ratio: float = 1.0, reduction: int = 16):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.affinity = ChannelAffinity(dim, reduction)
        self.ssm = GroupedSingleScan2d(dim, d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv)
        self.proj = nn.Linear(dim, dim)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        Bt, H, W, C = x.shape
        x = self.norm(x)
        # upstream quirks: the scan output is multiplied by the *normalized* input (not added to it), and
        # the same LayerNorm (shared weights) normalizes again after the channel modulation
        scale = (self.affinity(x) * self.skip_scale).view(Bt, 1, 1, C)
        y = self.ssm(x.view(Bt, H, W, NUM_GROUPS, C // NUM_GROUPS)).view(Bt, H, W, C)
        return self.proj(self.norm(y * x * scale))


class ConvMlp(nn.Module):
    """fc1 → depthwise 3x3 conv → GELU → fc2 (PVTv2's FFN), channels-last."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(self.act(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GroupMambaBlock(nn.Module):
    """x + mixer(x) (the mixer normalizes its own input), then x + FFN(norm(x))."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0., norm_eps: float = 1e-6):
        super().__init__()
        self.mixer = GroupMambaMixer(dim)
        self.norm = read_by_gemm(LayerNorm(dim, eps=norm_eps))
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.mixer(x))
        return x + self.drop_path(self.mlp(self.norm(x)))


class ClassTokenBlock(nn.Module):
    """Pools (B, H, W, C) to (B, C): the token mean passes a mixer (post-norm) and an MLP (pre-norm).

    The mixer sees only the class token (a 1x1 grid), as upstream's ``ClassBlock`` does.
    """

    def __init__(self, dim: int, mlp_ratio: float, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.norm2 = read_by_gemm(LayerNorm(dim, eps=norm_eps))
        self.mixer = GroupMambaMixer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        cls = x.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        cls = cls + self.norm1(self.mixer(cls))
        cls = cls + self.mlp(self.norm2(cls))
        return cls.flatten(1)


class Stem(nn.Module):
    """Conv7x7/2 (no bias) BN ReLU, 2x [Conv3x3 BN ReLU], Conv3x3/2 (bias), LayerNorm → (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm(out_dim)

    def forward(self, x):
        return self.norm(self.proj(self.conv(x)).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """Conv3x3/2 + LayerNorm on channels-last maps."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = LayerNorm(out_dim)

    def forward(self, x):
        return self.norm(self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class GroupMamba(ClassifierHeadMixin, ChannelsLastStagesMixin, nn.Module):
    """GroupMamba: stem → 4 stages of modulated group Mamba blocks → class-token pooling → head (+ dist head).

    Args:
        in_chans: input channels.
        num_classes: classes of ``head`` and ``dist_head``.
        global_pool: 'token' (upstream: the token mean passes a mixer+MLP block), 'avg' (token mean only) or ''
            (no pooling: the head sees the (B, H, W, C) map, as timm's ``global_pool=''``).
        stem_hidden_dim: channels of the stem's convolutions.
        embed_dims: channels per stage (each divisible by 4, the number of scan groups).
        depths: blocks per stage.
        mlp_ratios: FFN expansion per stage.
        distillation: add the distillation head ``dist_head`` (upstream default; its logits are averaged with
            ``head``'s unless ``set_distilled_training(True)`` and training, where both are returned).
        drop_rate: dropout before the heads (upstream accepts but ignores it).
        drop_path_rate: stochastic depth, linear over all blocks.
    """
    features_end_with_norm = False  # ``norm`` follows the class-token pooling, in the head
    global_pools = ('token', 'avg', '')
    final_groups = ((r'^stages\.(\d+)\.norm', (99999,)), (r'^cls_block|^norm', (99999,)))

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            stem_hidden_dim: int = 32,
            embed_dims: Tuple[int, ...] = (64, 128, 348, 448),
            depths: Tuple[int, ...] = (3, 4, 9, 3),
            mlp_ratios: Tuple[float, ...] = (8, 8, 4, 4),
            distillation: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"GroupMamba got unexpected arguments {sorted(kwargs)}")
        self.check_global_pool(global_pool)
        num_stages = len(depths)
        if not (len(embed_dims) == len(mlp_ratios) == num_stages):
            raise ValueError(f"embed_dims, depths, mlp_ratios need one entry per stage, got "
                             f"{len(embed_dims)}, {num_stages}, {len(mlp_ratios)}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.output_fmt = 'NHWC'
        self.distilled_training = False

        self.stem = Stem(in_chans, stem_hidden_dim, embed_dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.Sequential()
        self.feature_info = []
        cur, prev_dim = 0, embed_dims[0]
        for i in range(num_stages):
            self.stages.append(Stage(
                Downsample(prev_dim, embed_dims[i]) if i > 0 else None,
                [GroupMambaBlock(embed_dims[i], mlp_ratios[i], drop_path=dpr[cur + j]) for j in range(depths[i])],
                # upstream normalizes stages 1-3 here; the last stage's norm is applied to the class token instead
                norm=LayerNorm(embed_dims[i], eps=1e-6) if i < num_stages - 1 else None,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
            cur += depths[i]
            prev_dim = embed_dims[i]
        self.num_features = self.head_hidden_size = prev_dim

        self.cls_block = ClassTokenBlock(prev_dim, mlp_ratios[-1])
        self.norm = LayerNorm(prev_dim, eps=1e-6)
        # the pooling (class token or mean) and ``norm`` come before the head, so the head itself never pools
        self.head = channels_last_head(prev_dim, num_classes, '', drop_rate)
        self.dist_head = (nn.Linear(prev_dim, num_classes) if num_classes > 0 else nn.Identity()) \
            if distillation else None

        self.apply(self._init_weights)

    def _init_weights(self, m):
        # upstream's init reaches nn.Linear/nn.Conv2d/nn.LayerNorm modules only; the scan's grouped
        # in_proj/out_proj (nn.Linear upstream) are set in GroupedSingleScan2d, x_proj/dt/A/D keep SS2D's init
        init_linear_and_norm(m, norm_types=(nn.LayerNorm, GroupedLayerNorm))
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'*.A_log', '*.D', '*.dt_proj_bias', '*.out_norm.weight', '*.skip_scale'}

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, Tuple[nn.Module, nn.Module]]:
        return self.head.fc if self.dist_head is None else (self.head.fc, self.dist_head)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        super().reset_classifier(num_classes)  # the head's own pooling stays '' (see __init__)
        if self.dist_head is not None:
            weight = next(self.parameters())
            self.dist_head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype) \
                if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_distilled_training(self, enable=True):
        """Return (head, dist_head) logits in training, as upstream does for its distillation loss."""
        self.distilled_training = enable

    def prune_norm_and_head(self, max_index: int, prune_norm: bool, prune_head: bool):
        """The norm goes with any stage (it reads the last one's width); the head with the class-token block."""
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.cls_block = None
            self.global_pool = 'avg'
            self.reset_classifier(0)

    def forward_features(self, x):
        """(B, C, H, W) images → (B, H/32, W/32, C) last-stage map (channels-last)."""
        x = self.stem(check_images(self, x))
        return self.stages(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == 'token':
            x = self.cls_block(x)
        elif self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.norm(x)
        if self.dist_head is None:
            return self.head(x, pre_logits=pre_logits)
        x = self.head(x, pre_logits=True)  # the dropout, shared by both classifiers
        if pre_logits:
            return x
        x, x_dist = self.head.fc(x), self.dist_head(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _stack_groups(state_dict, prefix, name, cat):
    parts = [state_dict.pop(f'{prefix}mamba_g{g}.{name}') for g in range(1, NUM_GROUPS + 1)]
    return torch.cat(parts, 0) if cat else torch.stack(parts, 0)


# official SS2D tensor name → (our name under `.ssm.`, concatenate (already has a group axis) or stack)
_SS2D_KEYS = {
    'in_proj.weight': ('in_proj.weight', False),
    'conv2d.weight': ('conv2d.weight', True),
    'conv2d.bias': ('conv2d.bias', True),
    'x_proj_weight': ('x_proj.weight', True),
    'dt_projs_weight': ('dt_proj_weight', True),
    'dt_projs_bias': ('dt_proj_bias', True),
    'A_logs': ('A_log', False),
    'Ds': ('D', False),
    'out_norm.weight': ('out_norm.weight', False),
    'out_norm.bias': ('out_norm.bias', False),
    'out_proj.weight': ('out_proj.weight', False),
}


def checkpoint_filter_fn(state_dict, model):
    """Convert an official GroupMamba checkpoint (``groupmamba_*_ema.pth``) to this model's layout.

    Unwraps 'model_ema' / 'model' / 'state_dict', strips 'module.' / 'backbone.' prefixes, stacks the four
    ``mamba_g{1..4}`` SS2D parameter sets of every mixer along a group axis and renames the rest.
    """
    state_dict = unwrap(state_dict, ('model_ema', 'state_dict_ema', 'model', 'state_dict'))
    if 'stem.proj.weight' in state_dict:
        return linear_head_keys_to_fc(state_dict)  # ours (a bare Linear ``head`` in files from before ClassifierHead)

    import re
    sd = {without_wrapper_prefix(k): v for k, v in state_dict.items()}

    # stack the four groups' SS2D tensors of each mixer
    mixers = sorted({m.group(1) for m in (re.match(r'(.*\.)mamba_g1\.', k) for k in sd) if m})
    for prefix in mixers:
        for old, (new, cat) in _SS2D_KEYS.items():
            sd[f'{prefix}ssm.{new}'] = _stack_groups(sd, prefix, old, cat)
        leftover = [k for k in sd if k.startswith(f'{prefix}mamba_g')]
        if leftover:
            raise ValueError(f"unknown official SS2D tensors {leftover}")

    out = {}
    for k, v in sd.items():
        k = k.replace('patch_embed1.', 'stem.')
        k = re.sub(r'^patch_embed(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.', k)
        k = re.sub(r'^block(\d+)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.', k)
        k = k.replace('post_network.0.', 'cls_block.')
        k = k.replace('.attn.fc1.', '.attn.affinity.fc1.').replace('.attn.fc2.', '.attn.affinity.fc2.')
        k = k.replace('.attn.', '.mixer.')
        k = k.replace('.mlp.dwconv.dwconv.', '.mlp.dwconv.')
        if k.startswith('stages.') and '.blocks.' in k:
            k = k.replace('.norm2.', '.norm.')
        m = re.match(r'^norm(\d+)\.(.*)$', k)
        if m:
            stage = int(m.group(1)) - 1
            num_stages = len(model.stages) if model is not None else 4
            k = f'norm.{m.group(2)}' if stage == num_stages - 1 else f'stages.{stage}.norm.{m.group(2)}'
        out[k] = v
    return linear_head_keys_to_fc(out)


_FAMILY_CFG = dict(
    first_conv='stem.conv.0', classifier=('head.fc', 'dist_head'), license='mit', paper_ids='arXiv:2407.13772',
    paper_name='GroupMamba: Parameter-Efficient and Accurate Group Visual State Space Model',
    origin_url='https://github.com/Amshaker/GroupMamba',
)


def _cfg(url='', **kwargs):
    return zoo_cfg(url, _FAMILY_CFG, **kwargs)


# The official Hub repositories (EMA weights): Abdelrahman-shaker/GroupMamba-{Tiny,Small,Base}.
default_cfgs = generate_default_cfgs({
    f'groupmamba_{size}.in1k': _cfg(
        hf_hub_id=f'Abdelrahman-shaker/GroupMamba-{size.title()}', hf_hub_filename=f'groupmamba_{size}_ema.pth')
    for size in ('tiny', 'small', 'base')
})


def _create_groupmamba(variant, pretrained=False, **kwargs):
    return build_zoo_model(GroupMamba, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def groupmamba_tiny(pretrained=False, **kwargs) -> GroupMamba:
    model_args = dict(stem_hidden_dim=32, embed_dims=(64, 128, 348, 448), depths=(3, 4, 9, 3))
    return _create_groupmamba('groupmamba_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def groupmamba_small(pretrained=False, **kwargs) -> GroupMamba:
    model_args = dict(stem_hidden_dim=64, embed_dims=(64, 128, 348, 512), depths=(3, 4, 16, 3))
    return _create_groupmamba('groupmamba_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def groupmamba_base(pretrained=False, **kwargs) -> GroupMamba:
    model_args = dict(stem_hidden_dim=64, embed_dims=(96, 192, 424, 512), depths=(3, 6, 21, 3))
    return _create_groupmamba('groupmamba_base', pretrained=pretrained, **dict(model_args, **kwargs))
