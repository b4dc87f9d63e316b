"""Spatial-Mamba: Effective Visual State Space Models via Structure-Aware State Fusion.

Paper: https://arxiv.org/abs/2410.15091 (Xiao, Li, Zhang, Meng, Zhang, ICLR 2025)
Official code and weights: https://github.com/EdwardChasel/Spatial-Mamba (Apache-2.0)

One block: a depthwise conv position encoding, a structure-aware SSM (one raster scan with d_state 1 that keeps
every hidden state, a dilated-conv fusion of those states across the image grid, then y = C·h + D·x), a second
conv position encoding and an MLP. The model is channels-last (B, H, W, C) between the convolutional stem,
the blocks and the convolutional downsamplers.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, Mlp, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model
from timm.models import register_notrace_module

from vmamba_kernels import selective_scan_states

from ._builder import build_zoo_model, zoo_cfg
from ..checkpoint import unwrap
from ..layers.heads import ClassifierHeadMixin, channels_last_head, linear_head_keys_to_fc
from ..layers.init import init_linear_and_norm
from ..layers.input_size import check_images
from ..layers.norm import LayerNorm, read_by_gemm
from ..layers.stages import ChannelsLastStagesMixin, Stage
from ..layers.scan_params import init_A_log_and_D_, init_dt_projection_, resolve_dt_rank
from ..layers.state_fusion import FUSION_IMPLS, StateFusion

__all__ = ["SpatialMamba", "StructureAwareSSM", "SpatialMambaBlock", "MIXER_LAYOUTS", "FUSION_IMPLS"]

MIXER_LAYOUTS = ("auto", "channels_last", "channels_first")


class ConvNormAct(nn.Module):
    """Conv2d → optional BatchNorm → optional ReLU (NCHW)."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, groups=1, bias=True, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class Stem(nn.Module):
    """3×3 s2 (→C/2) → residual pair of 3×3 → 3×3 s2 (→4C) → 1×1 (→C); NCHW in, NHWC out."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        mid = embed_dim // 2
        self.conv1 = ConvNormAct(in_chans, mid, 3, stride=2, bias=False)
        self.conv2 = nn.Sequential(
            ConvNormAct(mid, mid, 3, bias=False),
            ConvNormAct(mid, mid, 3, bias=False, act=False),
        )
        self.conv3 = nn.Sequential(
            ConvNormAct(mid, embed_dim * 4, 3, stride=2, bias=False),
            ConvNormAct(embed_dim * 4, embed_dim, 1, bias=False, act=False),
        )

    def forward(self, x):
        # channels_last all the way, so that the (B, H, W, C) view handed to the blocks is contiguous
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        x = self.conv2(x) + x
        x = self.conv3(x)
        return x.permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """1×1 (C→8C) + ReLU → depthwise 3×3 s2 + ReLU → 1×1 (8C→2C) + BN; NHWC in and out."""

    def __init__(self, dim: int, dim_out: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(dim_out * ratio)
        self.conv1 = ConvNormAct(dim, hidden, 1, norm=False)
        self.conv2 = ConvNormAct(hidden, hidden, 3, stride=2, groups=hidden, norm=False)
        self.conv3 = ConvNormAct(hidden, dim_out, 1, act=False)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        x = self.conv3(self.conv2(self.conv1(x)))
        return x.permute(0, 2, 3, 1)


@register_notrace_module  # the scan op validates shapes in Python; fx sees the mixer as one leaf
class StructureAwareSSM(nn.Module):
    """Spatial-Mamba's token mixer (SASSM), channels-last (B, H, W, C) in and out.

    in_proj → (x, z); x ← SiLU(dwconv3×3(x)); one raster scan keeping every hidden state h (d_state 1);
    h ← StateFusion(h) on the image grid; y = C·h + D·x; out_proj(LayerNorm(y) · SiLU(z)).

    ``layout="channels_last"`` keeps x, the fused states and y in (B, H, W, C) memory order: the scan reads x
    through strides, the convs run channels_last (cuDNN), and y reaches the LayerNorm without a transpose copy
    or an extra cast. ``layout="channels_first"`` is the NCHW form (x and y as (B, C, L)). Both compute the same
    function. ``layout="auto"`` (the default) runs channels-last in eval mode and with the fused state fusion
    (``fusion_impl="fused"``, which writes the fused states channels-last); it runs channels-first for training
    with PyTorch's convs (``fusion_impl="auto"``), the faster of the two there on one H100
    (Spatial-Mamba-T, bf16, batch 128: inference 2150 against 1709 img/s, training 462 against 405;
    model_cards/benchmarks/side_by_side.md).
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 1,
            expand: float = 2.0,
            d_conv: int = 3,
            dt_rank: Union[int, str] = "auto",
            proj_drop: float = 0.,
            fusion_merge_at_eval: bool = False,
            fusion_impl: str = "auto",
            layout: str = "auto",
    ):
        super().__init__()
        if layout not in MIXER_LAYOUTS:
            raise ValueError(f"layout must be one of {MIXER_LAYOUTS}, got {layout!r}")
        self.layout = layout
        if d_state != 1:
            # the fused states are laid out one map per channel; C·h over N > 1 states has no official form
            raise ValueError(f"Spatial-Mamba's state fusion needs d_state=1, got {d_state}")
        self.d_inner = d_inner = int(expand * dim)
        self.d_state = d_state
        self.dt_rank = resolve_dt_rank(dim, dt_rank)

        self.in_proj = nn.Linear(dim, d_inner * 2, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.state_fusion = StateFusion(
            d_inner, kernel_size=3, dilations=(1, 3, 5), padding_mode="replicate", merge_at_eval=fusion_merge_at_eval,
            impl=fusion_impl)
        self.out_norm = LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba's init for x_proj, dt_proj (softplus(bias) log-uniform in ``init_dt_projection_``'s range),
        A (S4D real), D."""
        self.x_proj.reset_parameters()
        init_dt_projection_(self.dt_proj.weight, self.dt_proj.bias)
        init_A_log_and_D_(self.A_log, self.D)

    def forward(self, x):
        layout = self.layout
        if layout == "auto":  # channels-first only for training with PyTorch's convs (see the class docstring)
            fused = self.state_fusion.resolved_impl() == "fused"
            layout = "channels_first" if self.training and not fused else "channels_last"
        if layout == "channels_first":
            return self._forward_channels_first(x)
        Bt, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        x = self.act(self.conv(x)).permute(0, 2, 3, 1)  # (Bt, H, W, Di), contiguous
        xl = x.reshape(Bt, H * W, self.d_inner)

        x_dbl = F.linear(xl, self.x_proj.weight)  # (Bt, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # bias added (then softplus) in the scan
        h = selective_scan_states(
            xl.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log), B.transpose(1, 2),
            delta_bias=self.dt_proj.bias, delta_softplus=True,
        )  # (Bt, Di, 1, L), fp32 or wider
        h = self.state_fusion(h.view(Bt, self.d_inner, H, W)).permute(0, 2, 3, 1)  # (Bt, H, W, Di)
        # D·x + C·h in one more pass; the LayerNorm computes in fp32 under autocast, so no cast in between
        y = torch.addcmul(x * self.D, h, C.reshape(Bt, H, W, self.d_state))
        y = self.out_norm(y) * F.silu(z)
        return self.proj_drop(self.out_proj(y))

    def _forward_channels_first(self, x):
        Bt, H, W, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv(x.permute(0, 3, 1, 2)))  # (Bt, Di, H, W)
        u = x.flatten(2)  # (Bt, Di, L), raster order

        x_dbl = F.linear(u.transpose(1, 2), self.x_proj.weight)  # (Bt, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias added (then softplus) in the scan
        h = selective_scan_states(
            u, dt, -torch.exp(self.A_log), B.transpose(1, 2),
            delta_bias=self.dt_proj.bias, delta_softplus=True,
        )  # (Bt, Di, 1, L), fp32 or wider
        h = self.state_fusion(h.view(Bt, self.d_inner, H, W)).flatten(2)
        y = h * C.transpose(1, 2) + u * self.D[:, None]  # (Bt, Di, L)

        y = self.out_norm(y.transpose(1, 2).reshape(Bt, H, W, self.d_inner).to(z.dtype))
        y = y * F.silu(z)
        return self.proj_drop(self.out_proj(y))


class SpatialMambaBlock(nn.Module):
    """x + cpe1(x), then x + DropPath(mixer(norm1(x))), x + cpe2(x) and x + DropPath(mlp(norm2(x))); channels-last.
    The mixer is ``StructureAwareSSM`` with ``layout=mixer_layout`` and ``mixer_kwargs`` (d_state, fusion_impl,
    fusion_merge_at_eval)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0., proj_drop: float = 0.,
                 norm_layer=LayerNorm, mixer_layout: str = "auto", **mixer_kwargs):
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = read_by_gemm(norm_layer(dim))
        self.mixer = StructureAwareSSM(dim, proj_drop=proj_drop, layout=mixer_layout, **mixer_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = read_by_gemm(norm_layer(dim))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.cpe1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        x = x + self.cpe2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class SpatialMamba(ClassifierHeadMixin, ChannelsLastStagesMixin, nn.Module):
    """Spatial-Mamba, channels-last; `forward_features` returns normalized (B, H, W, C) tokens.

    `fusion_merge_at_eval=True` runs each state fusion in eval mode as one merged 11×11 depthwise conv, as the
    official code does; the default keeps the three dilated 3×3 convs, the same function at 27 rather than 121
    multiply-adds per output (the count the paper's FLOPs use).

    `fusion_impl` ("auto", "fused", "channels_last", "nchw", "merged") and `mixer_layout` ("auto", "channels_last",
    "channels_first") pick among implementations of the same function (see `StateFusion` and
    `StructureAwareSSM`); the defaults ("auto") take the measured faster one for eval and for training, the others
    are for comparisons (`tools/bench_layers.py`). Neither changes the state dict.
    """
    global_pools = ("avg", "max", "")
    # check_images refuses dynamo=False; onnxruntime rejects any other size in the graphs it wrote
    torchscript_onnx_unsupported = ("its graph keeps sizes of the example input as constants (the state fusion's "
                                    "broadcasts), so the file fails at any other input size")

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Tuple[int, ...] = (2, 4, 8, 4),
            dims: Union[int, Tuple[int, ...]] = 64,
            d_state: int = 1,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=LayerNorm,
            fusion_merge_at_eval: bool = False,
            fusion_impl: str = "auto",
            mixer_layout: str = "auto",
            img_size: Optional[Union[int, Tuple[int, int]]] = None,  # accepted for timm API; any size works
            **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        self.check_global_pool(global_pool)
        if isinstance(dims, int):
            dims = tuple(dims * 2 ** i for i in range(len(depths)))
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = Stem(in_chans, dims[0])
        dp_rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        block_kwargs = dict(mlp_ratio=mlp_ratio, d_state=d_state, proj_drop=proj_drop_rate, norm_layer=norm_layer,
                            fusion_merge_at_eval=fusion_merge_at_eval, fusion_impl=fusion_impl, mixer_layout=mixer_layout)
        self.stages = nn.Sequential()
        self.feature_info = []
        prev_dim, stride = dims[0], 4
        for i, depth in enumerate(depths):
            stride *= 2 if i > 0 else 1
            self.stages.append(Stage(
                Downsample(prev_dim, dims[i]) if i > 0 else None,
                [SpatialMambaBlock(dims[i], drop_path=dp_rates[i][j], **block_kwargs) for j in range(depth)],
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f"stages.{i}"))
            prev_dim = dims[i]
        self.norm = norm_layer(self.num_features)
        self.head = channels_last_head(self.num_features, num_classes, global_pool, drop_rate)

        self.apply(init_linear_and_norm)
        for m in self.modules():
            if isinstance(m, StructureAwareSSM):
                m.reset_ssm_parameters()


    @torch.jit.ignore
    def no_weight_decay(self):
        return {"*.A_log", "*.D", "*.state_fusion.alpha", "*norm*"}

    def prune_norm_and_head(self, max_index: int, prune_norm: bool, prune_head: bool):
        # the norm and the head read the last stage's width: with stages gone, both go and the model ends at the map
        stages_gone = max_index < len(self.feature_info) - 1
        if stages_gone:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        super().prune_norm_and_head(max_index, prune_norm or stages_gone, prune_head or stages_gone)

    def forward_features(self, x):
        x = self.stem(check_images(self, x))
        x = self.stages(x)
        return self.norm(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


_OFFICIAL_RENAMES = (
    (".self_attention.", ".mixer."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".mixer.conv2d.", ".mixer.conv."),
    (".mixer.x_proj_weight", ".mixer.x_proj.weight"),
    (".mixer.dt_projs_weight", ".mixer.dt_proj.weight"),
    (".mixer.dt_projs_bias", ".mixer.dt_proj.bias"),
    (".mixer.A_logs", ".mixer.A_log"),
    (".mixer.Ds", ".mixer.D"),
)
_FUSION_KERNELS = ("kernel_3", "kernel_3_1", "kernel_3_2")  # dilations 1, 3, 5


def checkpoint_filter_fn(state_dict, model):
    """Convert an official Spatial-Mamba checkpoint (Swin-style {'model', 'model_ema', ...} dict, optionally
    'module.'- or 'backbone.'-prefixed) to this implementation's keys. Our own state dicts pass through."""
    state_dict = unwrap(state_dict, ("model", "state_dict", "model_ema"))
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if "stem.conv1.conv.weight" in state_dict:
        return linear_head_keys_to_fc(state_dict)

    import re
    out, fusion = {}, {}
    for k, v in state_dict.items():
        if k.startswith("outnorm") or k.endswith("._merge_weight"):
            continue  # detection backbone's per-stage output norms; eval-time merge cache
        k = k.replace("patch_embed.", "stem.", 1) if k.startswith("patch_embed.") else k
        m = re.match(r"layers\.(\d+)\.downsample\.conv\.(\d)\.(.*)", k)
        if m:
            k = f"stages.{int(m[1]) + 1}.downsample.conv{int(m[2]) + 1}.{m[3]}"
        k = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", k)
        for old, new in _OFFICIAL_RENAMES:
            k = k.replace(old, new)
        m = re.match(r"(.*\.state_fusion\.)(kernel_3(?:_1|_2)?)$", k)
        if m:
            fusion.setdefault(m[1], {})[m[2]] = v
            continue
        out[k] = v
    for prefix, kernels in fusion.items():
        out[prefix + "weight"] = torch.stack([kernels[name] for name in _FUSION_KERNELS])
    return linear_head_keys_to_fc(out)


_FAMILY_CFG = dict(
    first_conv="stem.conv1.conv", license="apache-2.0", paper_ids="arXiv:2410.15091",
    paper_name="Spatial-Mamba: Effective Visual State Space Models via Structure-Aware State Fusion",
    origin_url="https://github.com/EdwardChasel/Spatial-Mamba",
)


def _cfg(url="", drive_page="", **kwargs):
    notes = (f"the official weights are on a Google Drive page ({drive_page}, linked from "
             "https://github.com/EdwardChasel/Spatial-Mamba): download the file by hand, then pass "
             "pretrained_cfg_overlay=dict(file=PATH)",)
    return zoo_cfg(url, _FAMILY_CFG, notes=notes, **kwargs)


# The official weights are Google Drive pages (HTML, no direct file), so no url: pretrained=True without a
# file fails at once with the page to download from (vmamba_zoo.checkpoint.check_pretrained_source).
default_cfgs = generate_default_cfgs({
    "spatialmamba_tiny.in1k": _cfg(
        drive_page="https://drive.google.com/file/d/19kXoqGSTuKKs4AHbdUSrdKZTwTWenLIW/view"),
    "spatialmamba_small.in1k": _cfg(
        drive_page="https://drive.google.com/file/d/1Wb3sYoWLpgmWrmHMYKwdgDwGPZaqM28O/view"),
    "spatialmamba_base.in1k": _cfg(
        drive_page="https://drive.google.com/file/d/1k8dHp2QRCOqBSgAi36YkhZp_O8LqOPjM/view"),
})


def _create_spatialmamba(variant, pretrained=False, **kwargs):
    return build_zoo_model(SpatialMamba, variant, pretrained, checkpoint_filter_fn, **kwargs)


# official drop_path_rate for ImageNet training: tiny 0.2, small 0.3, base 0.5
@register_model
def spatialmamba_tiny(pretrained=False, **kwargs) -> SpatialMamba:
    model_args = dict(depths=(2, 4, 8, 4), dims=64)
    return _create_spatialmamba("spatialmamba_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spatialmamba_small(pretrained=False, **kwargs) -> SpatialMamba:
    model_args = dict(depths=(2, 4, 21, 5), dims=64)
    return _create_spatialmamba("spatialmamba_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spatialmamba_base(pretrained=False, **kwargs) -> SpatialMamba:
    model_args = dict(depths=(2, 4, 21, 5), dims=96)
    return _create_spatialmamba("spatialmamba_base", pretrained=pretrained, **dict(model_args, **kwargs))
