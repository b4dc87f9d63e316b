"""PlainMamba: a non-hierarchical (plain, stride-16) vision Mamba with continuous snake scans.

Paper: `PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition` (BMVC 2024)
    - https://arxiv.org/abs/2403.17695
Official code and weights: https://github.com/ChenhongyiYang/PlainMamba (Apache-2.0),
    https://huggingface.co/ChenhongyiYang/PlainMamba

The module math follows the official ``PlainMamba2D`` exactly, including what its checkpoints were
trained with (see ``PlainMamba2D``):
    * only the input u is read along each snake route; dt, B and C are read in raster order, while the
      direction bias ``direction_Bs`` is indexed by route step;
    * the dt bias is applied twice (inside ``dt_proj`` and again as the scan's ``delta_bias``);
    * each of the 4 scans adds D·x, so the merged output carries 4·D·x.
The scans run through ``vmamba_kernels.selective_scan_2d``: u is gathered along ``routes``, dt/B/C along
``param_routes`` = the raster route for every direction, and the outputs are scattered back and summed.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, register_notrace_function, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models._registry import generate_default_cfgs, register_model

from vmamba_kernels import selective_scan_2d
from vmamba_kernels.reference import exporting

from ._builder import build_zoo_model, zoo_cfg
from ..checkpoint import unwrap, without_wrapper_prefix
from ..layers.heads import ClassifierHeadMixin, channels_last_head
from ..layers.init import init_linear_and_norm
from ..layers.input_size import check_images
from ..layers.norm import LayerNorm, read_by_gemm
from ..layers.routes import device_routes
from ..layers.scan_params import init_A_log_and_D_, resolve_dt_rank

# shape-dependent steps stay opaque to torch.fx (timm's feature extraction by graph)
register_notrace_function(selective_scan_2d)

__all__ = ['PlainMamba', 'PlainMamba2D', 'PlainMambaLayer', 'ConvPatchEmbed']


def _traced() -> bool:
    """Exporting or tracing: sizes are symbolic, so size-dependent branches take their general form."""
    return exporting() or torch.jit.is_tracing()


@register_notrace_function
def corner_pad(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Zero-pad the bottom/right of an NCHW map so a (kernel_size, stride) conv covers every pixel
    (mmcv's ``AdaptivePadding(padding='corner')``)."""
    H, W = x.shape[-2:]
    if _traced() and kernel_size >= stride:  # the pad is never negative: pad by it whatever the size
        return F.pad(x, [0, ((W + stride - 1) // stride - 1) * stride + kernel_size - W,
                         0, ((H + stride - 1) // stride - 1) * stride + kernel_size - H])
    pad_h = max((math.ceil(H / stride) - 1) * stride + kernel_size - H, 0)
    pad_w = max((math.ceil(W / stride) - 1) * stride + kernel_size - W, 0)
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [0, pad_w, 0, pad_h])
    return x


def resize_pos_embed(pos_embed: torch.Tensor, src_size: Tuple[int, int], dst_size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, H*W, C) position embedding, as the official ``resize_pos_embed``
    (``align_corners=False``, no antialias)."""
    if not _traced() and tuple(src_size) == tuple(dst_size):  # traced: resized to any size (identity at its own)
        return pos_embed
    if pos_embed.ndim != 3 or pos_embed.shape[1] != src_size[0] * src_size[1]:
        raise ValueError(f'pos_embed must be (1, {src_size[0] * src_size[1]}, C) for grid {tuple(src_size)}, '
                         f'got {tuple(pos_embed.shape)}')
    C = pos_embed.shape[-1]
    orig_dtype = pos_embed.dtype
    grid = pos_embed.float().reshape(1, src_size[0], src_size[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_size), mode='bicubic', align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(orig_dtype)


@register_notrace_function
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    """x (B, H, W, C) + the position embedding made for ``grid_size``, resized to (H, W) when they differ."""
    H, W = x.shape[1:3]
    return x + resize_pos_embed(pos_embed, grid_size, (H, W)).reshape(1, H, W, -1)


def build_routes(H: int, W: int, device: torch.device = torch.device('cpu')
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PlainMamba's 4 snake routes, the raster param_routes (dt/B/C are read in raster order by every
    route) and the direction id of every route step, on ``device``."""
    return tuple(device_routes('continuous', H, W, device, table=table)
                 for table in ('routes', 'raster_params', 'directions'))


@register_notrace_function
def routes_for(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``build_routes`` for the grid of x (B, H, W, C) (built in the graph where the model is traced)."""
    return build_routes(x.shape[1], x.shape[2], x.device)


class ConvPatchEmbed(nn.Module):
    """Conv stem: 7×7/2 conv-BN-ReLU, ``num_convs`` × 3×3 conv-BN-ReLU, then a (p/2)×(p/2) stride-p/2
    projection after corner padding. Output is channels-last (B, H/p, W/p, C)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 192, num_convs: int = 1, patch_size: int = 16,
                 stem_chs: int = 64):
        super().__init__()
        if patch_size % 2 != 0:
            raise ValueError(f'patch_size must be even, got {patch_size}')
        self.patch_size = patch_size
        self.proj_size = patch_size // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_chs),
            nn.ReLU(inplace=True),
        )
        convs = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(stem_chs, stem_chs, 3, 1, padding=1, bias=False), nn.BatchNorm2d(stem_chs),
                      nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.projection = nn.Conv2d(stem_chs, embed_dim, kernel_size=self.proj_size, stride=self.proj_size)

    def grid_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        # the official model sizes its position embedding from img_size // 2 (not the conv's ceil)
        return tuple(math.ceil((s // 2) / self.proj_size) for s in img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(self.stem(x))
        x = self.projection(corner_pad(x, self.proj_size, self.proj_size))
        return x.permute(0, 2, 3, 1)


class PlainMamba2D(nn.Module):
    """PlainMamba's selective-scan mixer on a channels-last (B, H, W, C) map, 4 continuous snake routes.

    Faithful to the official ``PlainMamba2D`` (the checkpoints depend on these):
      * dt, B and C stay in raster order: step t of every route reads them at raster pixel t, while u is
        read at the route's pixel. ``param_routes`` is therefore the raster route repeated per direction.
      * ``direction_Bs[d]`` is added to B in route order: route k's B at raster pixel t is
        B[t] + direction_Bs[directions[k, t]] (the move that led into step t of route k).
      * dt = dt_proj(x) already holds the dt bias; the scan adds it again (``delta_bias``).
      * D·x is added inside every one of the 4 scans, so their sum carries 4·D·x.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, dt_rank: Union[int, str] = 'auto',
                 conv_size: int = 7, conv_bias: bool = True, bias: bool = True, num_directions: int = 4):
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f'conv_size must be odd, got {conv_size}')
        self.d_state = d_state
        self.d_inner = int(expand * dim)
        # dt_rank from the model dim, not the inner dim
        self.dt_rank = resolve_dt_rank(dim, dt_rank)

        self.in_proj = nn.Linear(dim, self.d_inner * 2, bias=bias)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, kernel_size=conv_size, padding=conv_size // 2,
                                groups=self.d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        init_A_log_and_D_(self.A_log, self.D)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)
        # one bias per move: [start, right, left, up, down]
        self.direction_Bs = nn.Parameter(torch.zeros(num_directions + 1, d_state))
        trunc_normal_(self.direction_Bs, std=0.02)

    def forward(self, x: torch.Tensor, routes: torch.Tensor, param_routes: torch.Tensor,
                directions: torch.Tensor) -> torch.Tensor:
        Bt, H, W, K = x.shape[0], x.shape[1], x.shape[2], routes.shape[0]
        E, N = self.d_inner, self.d_state

        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, N, N], dim=-1)
        dt = self.dt_proj(dt)  # first dt bias

        # B of route k at raster pixel t = B[t] + direction_Bs[move into step t of route k]
        direction_bias = self.direction_Bs[directions].reshape(K, H, W, N).permute(1, 2, 0, 3)
        B = B.unsqueeze(3) + direction_bias.to(B.dtype)
        C = C.unsqueeze(3).expand(Bt, H, W, K, N)
        dt = dt.unsqueeze(3).expand(Bt, H, W, K, E)
        A = -torch.exp(self.A_log.float())
        y = selective_scan_2d(
            x, dt, A.expand(K, E, N), B, C,
            D=self.D.float().expand(K, E),  # D inside each scan: 4·D·x after the sum
            delta_bias=self.dt_proj.bias.float().expand(K, E),  # second dt bias
            delta_softplus=True,
            routes=routes,
            param_routes=param_routes,
            merge='sum',
        )
        return self.out_proj(y * self.act(z))


class PlainMambaLayer(nn.Module):
    """x + DropPath(PlainMamba2D(LN(x))); with ``with_dwconv`` (L1's first layer) the result is then
    replaced by GELU(BN(dw3×3(·))), without a residual."""

    def __init__(self, dim: int, drop_path: float = 0., with_dwconv: bool = False, **mixer_kwargs):
        super().__init__()
        self.norm = read_by_gemm(LayerNorm(dim))
        self.mamba = PlainMamba2D(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False),
            nn.BatchNorm2d(dim),
            nn.GELU(),
        ) if with_dwconv else None

    def forward(self, x: torch.Tensor, routes: torch.Tensor, param_routes: torch.Tensor,
                directions: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mamba(self.norm(x), routes, param_routes, directions))
        if self.dw is not None:
            x = self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class PlainMamba(ClassifierHeadMixin, nn.Module):
    """PlainMamba classifier: conv patch embed (stride 16) + position embedding, a stack of
    ``PlainMambaLayer``, final LayerNorm, token mean, linear head. Channels-last throughout."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 192,
            depth: int = 24,
            patch_size: int = 16,
            stem_num_convs: int = 1,
            dwconv_layers: Sequence[int] = (),
            d_state: int = 16,
            expand: int = 2,
            conv_size: int = 7,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False

        self.patch_embed = ConvPatchEmbed(in_chans, embed_dim, stem_num_convs, patch_size)
        self.grid_size = self.patch_embed.grid_size(to_2tuple(img_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList([
            PlainMambaLayer(
                embed_dim, drop_path=dpr[i], with_dwconv=i in dwconv_layers, d_state=d_state, expand=expand,
                conv_size=conv_size)
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'layers.{i}') for i in range(depth)]
        self.norm = LayerNorm(embed_dim, eps=norm_eps)
        self.head = channels_last_head(embed_dim, num_classes, global_pool, drop_rate)

        # the official training init (mmcls init_cfg): every Linear, dt_proj included, is
        # trunc_normal(.02) with zero bias; LayerNorm is (1, 0); convs keep PyTorch's default
        self.apply(init_linear_and_norm)
        trunc_normal_(self.pos_embed, std=.02)


    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', '*.A_log', '*.D', '*.direction_Bs', 'norm.*', '*.norm.*'}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(
            stem=r'^pos_embed|^patch_embed',
            blocks=[(r'^layers\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor):
        x = self.pos_drop(add_pos_embed(self.patch_embed(check_images(self, x)), self.pos_embed, self.grid_size))
        return x, routes_for(x)

    def _run_layer(self, layer: nn.Module, x: torch.Tensor, routes) -> torch.Tensor:
        # routes is indexed, not unpacked: under torch.fx it is one opaque node
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, x, routes[0], routes[1], routes[2])
        return layer(x, routes[0], routes[1], routes[2])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor
            indices: Take last n layers if int, all if None, select matching indices if sequence
            norm: Apply the final norm to all intermediates
            stop_early: Stop iterating over layers when last desired intermediate hit
            output_fmt: Shape of intermediate feature outputs ('NCHW' or 'NHWC')
            intermediates_only: Only return intermediate features
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.layers), indices)

        x, routes = self._embed(x)
        layers = self.layers if torch.jit.is_scripting() or not stop_early else self.layers[:max_index + 1]
        for i, layer in enumerate(layers):
            x = self._run_layer(layer, x, routes)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        if output_fmt == 'NCHW':
            intermediates = [y.permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """ Prune layers not required for specified intermediates. """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, routes = self._embed(x)
        for layer in self.layers:
            x = self._run_layer(layer, x, routes)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict, model):
    """Convert an official PlainMamba checkpoint (mmcls ``ImageClassifier``: ``{'meta', 'state_dict'}``,
    ``backbone.`` prefix, ``backbone.ln1``, ``head.fc``; or an mmseg/mmdet one) to this model."""
    state_dict = unwrap(state_dict, ('state_dict', 'model', 'module'))
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = without_wrapper_prefix(k)
        if k.startswith(('ema_', 'neck.', 'decode_head.', 'auxiliary_head.', 'norm_layer')):
            # EMA hook buffers, downstream heads and per-index output norms are not part of this model
            continue
        if k.startswith('ln1.'):
            k = 'norm.' + k[len('ln1.'):]
        if k == 'pos_embed' and v.shape != model.pos_embed.shape:
            src = v.shape[1]
            side = int(math.isqrt(src))
            if side * side != src:
                raise ValueError(f'cannot infer the grid of a pos_embed with {src} tokens')
            v = resize_pos_embed(v, (side, side), model.grid_size)
        out[k] = v
    return out


_FAMILY_CFG = dict(
    first_conv='patch_embed.stem.0', pool_size=None, license='apache-2.0', paper_ids='arXiv:2403.17695',
    paper_name='PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition',
    origin_url='https://github.com/ChenhongyiYang/PlainMamba',
)


def _cfg(url='', **kwargs):
    return zoo_cfg(url, _FAMILY_CFG, **kwargs)


default_cfgs = generate_default_cfgs({
    'plainmamba_l1.in1k': _cfg(hf_hub_id='ChenhongyiYang/PlainMamba', hf_hub_filename='l1.pth'),
    'plainmamba_l2.in1k': _cfg(hf_hub_id='ChenhongyiYang/PlainMamba', hf_hub_filename='l2.pth'),
    'plainmamba_l3.in1k': _cfg(hf_hub_id='ChenhongyiYang/PlainMamba', hf_hub_filename='l3.pth'),
})


def _create_plainmamba(variant, pretrained=False, **kwargs):
    depth = kwargs.get('depth', 24)
    out_indices = kwargs.pop('out_indices', tuple(depth // 4 * (i + 1) - 1 for i in range(4)))  # a layer per quarter
    return build_zoo_model(PlainMamba, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


@register_model
def plainmamba_l1(pretrained=False, **kwargs) -> PlainMamba:
    model_args = dict(embed_dim=192, depth=24, stem_num_convs=1, dwconv_layers=(0,))
    return _create_plainmamba('plainmamba_l1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def plainmamba_l2(pretrained=False, **kwargs) -> PlainMamba:
    model_args = dict(embed_dim=384, depth=24, stem_num_convs=2)
    return _create_plainmamba('plainmamba_l2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def plainmamba_l3(pretrained=False, **kwargs) -> PlainMamba:
    model_args = dict(embed_dim=448, depth=36, stem_num_convs=2)
    return _create_plainmamba('plainmamba_l3', pretrained=pretrained, **dict(model_args, **kwargs))
