""" MambaMixer ViM2: selective token and channel mixing with weighted averaging of earlier features.

Paper: `MambaMixer: Efficient Selective State Space Models with Dual Token and Channel Selection`
    - https://arxiv.org/abs/2403.19888 (v1; its ImageNet table, architecture table A and Sections 3-4)

No official code or weights exist (github.com/MambaMixer/M2 holds only a README): this is a reimplementation
from the paper's text. Where the paper is silent the choice is named in the docstring of the block it affects
and collected in model_cards/mambamixer.md.

Architecture (channels-last (B, H, W, C) throughout):
    stem:       Conv 4x4 s4 + LayerNorm
    stages:     four; stages 2-4 start with patch merging (2x2 → LayerNorm(4C) → Linear 4C→2C). A stage is a
                sequence of MambaMixer blocks; block l holds a Selective Token Mixer (``token_depth`` pre-norm
                residual SS2D layers: Linear C→2·2C, depthwise 3x3, SiLU, S6 over the four cross routes summed,
                LayerNorm, · SiLU(gate), Linear 2C→C) and a Selective Channel Mixer (a pre-norm residual layer
                whose S6 runs bidirectionally along each token's channels).
    weighted averaging (per stage, y_tok^(0) = y_ch^(0) = the stage input):
                x_tok^(l) = sum_{i<l} alpha_{l,i} y_tok^(i) + beta_{l,i} y_ch^(i)
                x_ch^(l)  = sum_{i<=l} theta_{l,i} y_tok^(i) + sum_{i<l} gamma_{l,i} y_ch^(i)
                one learnable scalar per term (the paper's L(2L+3) weights); the stage returns y_ch^(L).
    head:       LayerNorm → global average pool → Linear.

The token scan runs through ``vmamba_kernels.selective_scan_2d`` on the "cross" routes, the channel scan through
``vmamba_kernels.selective_scan``; every backend of the kernel library serves the model.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.checkpoint import checkpoint as recompute_checkpoint

from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model, register_notrace_module
from timm.models._manipulate import checkpoint
from timm.models.swin_transformer import PatchMerging

from vmamba_kernels import selective_scan, selective_scan_2d
from vmamba_kernels.reference import exporting

from ._builder import build_zoo_model, zoo_cfg
from ..checkpoint import backbone_weights, unwrap
from ..layers.heads import ClassifierHeadMixin, channels_last_head, linear_head_keys_to_fc
from ..layers.init import init_linear_and_norm
from ..layers.input_size import check_images
from ..layers.norm import LayerNorm, read_by_gemm
from ..layers.stages import ChannelsLastStagesMixin
from ..layers.route_scan import RouteScanParams, fewer_launches
from ..layers.routes import device_routes
from ..layers.scan_params import resolve_dt_rank


__all__ = ['MambaMixer', 'SelectiveTokenMixer', 'SelectiveChannelMixer']


def recomputed_in_backward(fn, *args):
    """fn(*args), whose intermediate tensors the backward recomputes from args instead of autograd keeping
    them: for a few memory-bound steps whose inputs are kept anyway. The recomputation runs the same kernels on
    the same inputs (under the forward's autocast state), so outputs and gradients are bit for bit those of
    fn(*args). Without autograd, and when traced or exported, it is fn(*args)."""
    if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.jit.is_scripting() or exporting():
        return fn(*args)
    return recompute_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


@register_notrace_module  # routes depend on the runtime map size
class SelectiveTokenMixer(RouteScanParams):
    """The S6 token mixer of a MambaMixer block, for images (VMamba's SS2D with its gate), channels-last.

    in_proj C→2·Di splits into x and the gate z (the paper's x̄_MLP); x passes a depthwise 3x3 conv and SiLU; the
    S6 runs along the four cross routes (row-major, column-major and both reversed), each with its own x_proj,
    dt_proj, A and D, and the routes' outputs are summed; then LayerNorm, · SiLU(z), out_proj Di→C.
    delta, B and C come from the conv output (Mamba's order; the paper writes them as functions of the input).
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
            act_layer=nn.SiLU,
    ):
        d_inner = int(ssm_ratio * dim)
        dt_rank = resolve_dt_rank(dim, dt_rank)
        super().__init__(num_routes=self.num_routes, channels=d_inner, d_state=d_state, dt_rank=dt_rank)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.act = act_layer()
        self.out_norm = LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        Bt, H, W, Di = x.shape
        # view with x's traced sizes (a size-generic TorchScript export) and the projection width (batch 0 works)
        x_dbl = F.linear(x, self.x_proj_weight.reshape(-1, Di)).view(Bt, H, W, self.num_routes,
                                                                      self.x_proj_weight.shape[1])
        delta, Bs, Cs, A, D, delta_bias = self.scan_inputs(x_dbl)
        y = selective_scan_2d(
            x, delta, A, Bs, Cs, D, delta_bias, delta_softplus=True,
            routes=device_routes('cross', H, W, x.device), merge='sum',
        )
        # Under CUDA autocast the LayerNorm would keep an fp32 copy of y and the product its fp32 output, 8 bytes
        # per channel and pixel (15% of what ViM2-T keeps for backward), where the recomputation keeps y: 2 bytes
        return self.out_proj(recomputed_in_backward(self.gated_norm, y, z))

    def gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out_norm(y) * self.act(z)


@register_notrace_module  # shape-dependent reshapes and slicing of the token batch
class SelectiveChannelMixer(RouteScanParams):
    """The S6 channel mixer of a MambaMixer block: a bidirectional S6 whose sequence is a token's channels.

    Per token, in_proj maps the C channels to a sequence of ``width`` channels and a gate of the same length
    (the paper's "CW-Linear width" and x̃_MLP); the sequence is read forward and reversed, each direction with its
    own causal 1D conv (``d_conv`` taps) + SiLU and its own S6 (x_proj → dt, B, C per step, dt_proj, A, D,
    ``d_state`` states). One channel step carries one value, so every token runs its own scan: A, D and the
    projections are shared by all tokens, which keeps the parameters independent of the image size. The reversed
    direction's output is flipped back, the two are summed, gated by SiLU(gate) and out_proj maps width→C.

    Scan parameters are stored like the token mixer's with K = 2 directions of one channel each:
    x_proj_weight (2, 1 + 2N, 1), dt_projs_weight (2, 1, 1), dt_projs_bias (2, 1), A_logs (2, N), Ds (2).
    """
    num_directions = 2
    # The scan's backward writes fp32 per-step B and C gradients for every token, (tokens, K, N, L) each, before
    # they are summed into the broadcast b and c: under autograd the tokens go through the scan in runs whose
    # per-step gradients stay under this many bytes, so that transient does not grow with the batch.
    grad_chunk_bytes = 256 * 2 ** 20

    def __init__(
            self,
            dim: int,
            width: int,
            d_state: int = 16,
            d_conv: int = 4,
            act_layer=nn.SiLU,
    ):
        super().__init__(num_routes=self.num_directions, channels=1, d_state=d_state, dt_rank=1)
        self.width = width
        self.in_proj = nn.Linear(dim, 2 * width, bias=False)
        self.conv1d = nn.Conv1d(
            self.num_directions, self.num_directions, kernel_size=d_conv, padding=d_conv - 1,
            groups=self.num_directions)
        self.act = act_layer()
        self.out_proj = nn.Linear(width, dim, bias=False)

    @staticmethod
    def runs_conv1d(u: torch.Tensor) -> bool:
        """Whether ``causal_conv`` runs conv1d. On CPU in eager mode it runs d_conv shifted multiply-adds: oneDNN's
        2-channel depthwise convolution over thousands of tokens takes longer than the whole channel scan. Under a
        dispatch mode (torch's flop counter) it stays the conv, so that counters see the model's own op, and so
        does it where ``fused_projections(True)`` asks for the CUDA form on CPU."""
        return (not u.is_cpu or fewer_launches(u) or torch.jit.is_tracing() or exporting()
                or is_in_torch_dispatch_mode())

    def causal_conv(self, u: torch.Tensor, as_conv1d: bool) -> torch.Tensor:
        """conv1d's causal outputs, (tokens, K, L), by conv1d or by shifted multiply-adds (``runs_conv1d``)."""
        L = u.shape[-1]
        if as_conv1d:
            return self.conv1d(u)[..., :L]
        taps = self.conv1d.kernel_size[0]
        w, padded = self.conv1d.weight[:, 0, :, None], F.pad(u, (taps - 1, 0))  # w (K, taps, 1)
        y = w[:, 0] * padded[..., :L]
        for i in range(1, taps):
            y = torch.addcmul(y, w[:, i], padded[..., i:i + L])
        return y if self.conv1d.bias is None else y + self.conv1d.bias[:, None]

    def directions(self, seq: torch.Tensor, as_conv1d: bool) -> torch.Tensor:
        """seq (tokens, L) → SiLU of the causal conv of its forward and reversed channel order, (tokens, K, L)."""
        return self.act(self.causal_conv(torch.stack([seq, seq.flip(-1)], dim=1), as_conv1d))

    def scan(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (tokens, L) → the forward scan plus the flipped-back reversed scan, (tokens, L).

        A step's x_proj input is one value u_t, so delta, B and C are rank one: delta_t = u_t·a, B_t = u_t·b,
        C_t = u_t·c with a = x_proj_dt·dt_proj and b, c the x_proj rows. Then
            h_t = exp(delta_t A) h_{t-1} + delta_t (u_t²) b,    y_t = u_t (c·h_t) + D u_t,
        a scan of u² whose B = b and C = c do not change along the sequence: they pass as broadcast views
        (stride 0 over tokens and steps), so no (tokens, K, N, L) B or C is ever written or saved for backward
        (16x the size of u at N = 16; it was 70% of the model's activation memory)."""
        K, L = self.num_directions, seq.shape[-1]
        T, N = seq.shape[0], self.d_state
        # seq is kept anyway (a view of in_proj's output, whose gate half is kept): recomputing the stacked
        # directions and the conv output from it saves the two (tokens, K, L) tensors that the conv and SiLU
        # would keep. The conv's form is chosen here, so that the recomputation repeats the forward's.
        u = recomputed_in_backward(self.directions, seq, self.runs_conv1d(seq))
        w = self.x_proj_weight.view(K, 1 + 2 * N)
        a = (w[:, 0] * self.dt_projs_weight.view(K)).unsqueeze(-1)  # (K, 1): delta per unit of u
        delta = (u * a).to(u.dtype)
        b, c = w[:, 1:1 + N].reshape(1, K, N, 1), w[:, 1 + N:].reshape(1, K, N, 1)
        A = -torch.exp(self.A_logs.float())  # (K, N): direction k is scan channel k, B/C group k
        uu, delta_bias = u * u, self.dt_projs_bias.float().view(K)
        step = max(1, self.grad_chunk_bytes // (4 * K * N * L)) if torch.is_grad_enabled() else T
        # split (one concatenation of the runs' gradients in backward), and each run broadcasts b and c itself:
        # a slice of one (T, ...) broadcast would send a full-size gradient back per run
        ys = [selective_scan(ui, di, A, b.expand(ui.shape[0], K, N, L), c.expand(ui.shape[0], K, N, L), None,
                             delta_bias=delta_bias, delta_softplus=True)
              for ui, di in (zip(uu.split(step), delta.split(step)) if step < T else [(uu, delta)])]
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        y = u * (y + self.Ds.view(K, 1).to(y.dtype))
        return y[:, 0] + y[:, 1].flip(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        seq, gate = self.in_proj(x).reshape(-1, 2 * self.width).chunk(2, dim=-1)
        y = self.scan(seq) * self.act(gate)
        # Sizes from x.shape (not unflatten's constants) keep a traced export size-generic; no -1, so batch 0 works
        return self.out_proj(y).view(*shape, self.out_proj.out_features)


class MixerLayer(nn.Module):
    """Pre-norm residual layer: x + DropPath(mixer(LayerNorm(x))). Its output is the y^(i) that the weighted
    averaging re-uses (the sum over earlier outputs replaces the plain chain of residual layers)."""

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0., norm_layer=LayerNorm):
        super().__init__()
        self.norm = read_by_gemm(norm_layer(dim))
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


def weighted_sum(weights: torch.Tensor, features: List[torch.Tensor]) -> torch.Tensor:
    """sum_i weights[i] · features[i]."""
    out = weights[0] * features[0]
    for i in range(1, len(features)):
        out = out + weights[i] * features[i]
    return out


class MambaMixerBlock(nn.Module):
    """Block l (1-based) of a stage: the token mixer (``token_depth`` SS2D layers), then the channel mixer, each
    fed by a learnable weighted average of the earlier outputs of the stage.

    alpha (l,), beta (l,) weigh y_tok^(0..l-1), y_ch^(0..l-1) into the token mixer; theta (l+1,), gamma (l,)
    weigh y_tok^(0..l), y_ch^(0..l-1) into the channel mixer. They start as the plain chain (beta_{l,l-1} = 1,
    theta_{l,l} = 1, the rest 0), DenseFormer's identity initialization.
    """

    def __init__(
            self,
            index: int,
            dim: int,
            token_depth: int,
            channel_width: int,
            drop_path: Sequence[float],
            d_state: int = 16,
            ssm_ratio: float = 2.0,
            dt_rank: Union[int, str] = 'auto',
            channel_d_state: int = 16,
            channel_d_conv: int = 4,
            norm_layer=LayerNorm,
    ):
        super().__init__()
        if index < 1:
            raise ValueError(f'blocks are numbered from 1, got {index}')
        if len(drop_path) != token_depth + 1:
            raise ValueError(f'one drop-path rate per layer ({token_depth + 1}), got {len(drop_path)}')
        self.index = index
        self.grad_checkpointing = False
        self.alpha = nn.Parameter(torch.zeros(index))
        self.beta = nn.Parameter(torch.zeros(index))
        self.theta = nn.Parameter(torch.zeros(index + 1))
        self.gamma = nn.Parameter(torch.zeros(index))
        self.token_mixer = nn.Sequential(*[
            MixerLayer(dim, SelectiveTokenMixer(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank),
                       drop_path=drop_path[j], norm_layer=norm_layer)
            for j in range(token_depth)])
        self.channel_mixer = MixerLayer(
            dim, SelectiveChannelMixer(dim, channel_width, d_state=channel_d_state, d_conv=channel_d_conv),
            drop_path=drop_path[-1], norm_layer=norm_layer)
        self.reset_averaging()

    @torch.no_grad()
    def reset_averaging(self):
        for w in (self.alpha, self.beta, self.theta, self.gamma):
            w.zero_()
        self.beta[-1] = 1.
        self.theta[-1] = 1.

    def forward(
            self, tokens: List[torch.Tensor], channels: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """tokens = [y_tok^(0..l-1)], channels = [y_ch^(0..l-1)] → (y_tok^(l), y_ch^(l))."""
        x = weighted_sum(self.alpha, tokens) + weighted_sum(self.beta, channels)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            y_tok = checkpoint(self.token_mixer, x)
        else:
            y_tok = self.token_mixer(x)
        x = weighted_sum(self.theta, tokens + [y_tok]) + weighted_sum(self.gamma, channels)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            y_ch = checkpoint(self.channel_mixer, x)
        else:
            y_ch = self.channel_mixer(x)
        return y_tok, y_ch


class MambaMixerStage(nn.Module):
    """Optional patch merging, then MambaMixer blocks whose weighted averaging stays inside the stage."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            token_depth: int,
            channel_width: int,
            drop_path: Sequence[float],
            downsample: bool,
            norm_layer=LayerNorm,
            **block_kwargs,
    ):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, norm_layer=norm_layer) if downsample else nn.Identity()
        per_block = token_depth + 1
        self.blocks = nn.ModuleList([
            MambaMixerBlock(
                j + 1, dim, token_depth, channel_width, drop_path=drop_path[j * per_block:(j + 1) * per_block],
                norm_layer=norm_layer, **block_kwargs)
            for j in range(depth)])

    @property
    def grad_checkpointing(self) -> bool:
        return all(b.grad_checkpointing for b in self.blocks)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool):
        for b in self.blocks:
            b.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        tokens, channels = [x], [x]
        for block in self.blocks:
            y_tok, y_ch = block(tokens, channels)
            tokens.append(y_tok)
            channels.append(y_ch)
        return channels[-1]


class Stem(nn.Module):
    """Conv 4x4 stride 4 → channels-last → LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4, norm_layer=LayerNorm):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class MambaMixer(ClassifierHeadMixin, ChannelsLastStagesMixin, nn.Module):
    """Vision MambaMixer (ViM2): hierarchical stages of MambaMixer blocks.

    Args:
        in_chans: input image channels.
        num_classes: classifier classes (0 removes the classifier).
        global_pool: 'avg' or '' (no pooling).
        dims: channels per stage.
        depths: MambaMixer blocks per stage (= channel mixers per stage in the paper's table A).
        token_depth: SS2D layers in the token mixer of one block (table A: twice the channel mixers).
        channel_widths: length of the channel sequence the channel mixer scans, per stage (table A's
            "CW-Linear" width; default 2C in stages 1-3 and C in stage 4, as the table).
        d_state, ssm_ratio, dt_rank: S6 of the token mixer.
        channel_d_state, channel_d_conv: S6 and causal conv of the channel mixer.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear from 0 over all mixer layers.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (1, 1, 3, 1),
            token_depth: int = 2,
            channel_widths: Optional[Sequence[int]] = None,
            patch_size: int = 4,
            d_state: int = 16,
            ssm_ratio: float = 2.0,
            dt_rank: Union[int, str] = 'auto',
            channel_d_state: int = 16,
            channel_d_conv: int = 4,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=LayerNorm,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,  # any size works; accepted for timm
    ):
        super().__init__()
        num_stages = len(depths)
        dims = list(dims)
        if channel_widths is None:
            channel_widths = [2 * d for d in dims[:-1]] + [dims[-1]]
        channel_widths = list(channel_widths)
        if len(dims) != num_stages or len(channel_widths) != num_stages:
            raise ValueError(f'dims {dims}, depths {depths} and channel_widths {channel_widths} need one entry per stage')
        self.check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.dims = dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = 'NHWC'  # forward_features' layout (the stages run channels-last)

        self.stem = Stem(in_chans, dims[0], patch_size=patch_size, norm_layer=norm_layer)

        per_block = token_depth + 1
        dpr = torch.linspace(0, drop_path_rate, sum(depths) * per_block, device='cpu').tolist()
        self.stages = nn.Sequential()
        self.feature_info = []
        cur = 0
        for i in range(num_stages):
            n = depths[i] * per_block
            self.stages.append(MambaMixerStage(
                dims[max(i - 1, 0)], dims[i], depths[i], token_depth, channel_widths[i], drop_path=dpr[cur:cur + n],
                downsample=i > 0, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank,
                channel_d_state=channel_d_state, channel_d_conv=channel_d_conv, norm_layer=norm_layer))
            cur += n
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f'stages.{i}'))

        self.norm = norm_layer(self.num_features)
        self.head = channels_last_head(self.num_features, num_classes, global_pool, drop_rate)
        # VMamba's: trunc-normal Linear weights, zero biases, unit LayerNorms (convs and S6 keep their own)
        self.apply(init_linear_and_norm)


    @torch.jit.ignore
    def no_weight_decay(self):
        return {'*.A_logs', '*.Ds', '*.dt_projs_bias', '*norm*', '*.alpha', '*.beta', '*.theta', '*.gamma'}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(check_images(self, x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: MambaMixer) -> Dict[str, torch.Tensor]:
    """A checkpoint of this model (no official one exists): unwraps 'model' / 'state_dict' / 'model_ema',
    strips 'module.' and, for detection/segmentation checkpoints, keeps the 'backbone.' weights."""
    state_dict = unwrap(state_dict, ('model', 'state_dict', 'model_ema', 'state_dict_ema'))
    return linear_head_keys_to_fc(backbone_weights(state_dict))


_FAMILY_CFG = dict(
    first_conv='stem.conv',
    license='apache-2.0',  # this reimplementation's; no official code or weights exist
    paper_ids='arXiv:2403.19888',
    paper_name='MambaMixer: Efficient Selective State Space Models with Dual Token and Channel Selection',
    origin_url='https://mambamixer.github.io',
)


def _cfg(url: str = '', **kwargs):
    return zoo_cfg(url, _FAMILY_CFG, **kwargs)


default_cfgs = generate_default_cfgs({
    'vim2_tiny': _cfg(),
    'vim2_small': _cfg(),
    'vim2_base': _cfg(),
})


def _create_mambamixer(variant: str, pretrained: bool = False, **kwargs) -> MambaMixer:
    return build_zoo_model(MambaMixer, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def vim2_tiny(pretrained: bool = False, **kwargs) -> MambaMixer:
    model_args = dict(dims=(96, 192, 384, 768), depths=(1, 1, 3, 1))
    return _create_mambamixer('vim2_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim2_small(pretrained: bool = False, **kwargs) -> MambaMixer:
    model_args = dict(dims=(96, 192, 384, 768), depths=(1, 1, 9, 1))
    return _create_mambamixer('vim2_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim2_base(pretrained: bool = False, **kwargs) -> MambaMixer:
    model_args = dict(dims=(128, 256, 512, 1024), depths=(1, 1, 9, 1))
    return _create_mambamixer('vim2_base', pretrained=pretrained, **dict(model_args, **kwargs))
