"""Exact pure-PyTorch selective scan: the oracle, and the CPU path.

The semantics are mamba_ssm's ``selective_scan_ref``::

    delta = softplus(delta + delta_bias)            (each optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = <C_t, h_t> + D * u_t,    out = y * silu(z)

with ``h`` of shape (Bt, Dm, N) per step. Everything is computed in fp32 (fp64 when an input is fp64,
so that ``torch.autograd.gradcheck`` is meaningful). The scan is chunked (``_chunked_scan``): every
update is the plain recurrence, all chunks advance together, so the Python loop runs once per position
of a chunk (SCAN_CHUNK times), never once per time step, and export sees a graph whose size does not
depend on the sequence length. The forward contracts each step's state with C as it goes, so it never
holds every state. Traced (exported) and autograd-recorded forwards run it as ``_functional_scan``: channels
innermost, each step read out by one batched MatMul, each chunk position taken by one select, so that an ONNX
graph holds few nodes per position and onnxruntime runs each over contiguous rows.

The 2D form is gather → 1D scan → scatter, routes folded into channels (route k owns channel block k
and B/C group k), which is what the fused kernels must reproduce.

A forward that autograd does not record and nothing traces (inference, the CPU path) runs ``_blocked_scan``
instead, which hands fp32 CPU problems to the compiled C loop of ``cpu_scan`` where a C compiler is found, else
runs the same recurrence, time-major, in time blocks whose decays and drives are formed by a few large
products and whose states are one multiply-add per step (or per position of sub-chunks that advance together,
for steps of few states), so that a block's work stays in cache and the number of operations per step is one.
"""
import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_scan

__all__ = [
    "ReferenceBackend",
    "compute_dtype",
    "selective_scan_ref",
    "selective_scan_bwd_ref",
    "selective_scan_states_bwd_ref",
    "selective_scan_2d_bwd_ref",
    "selective_scan_states_ref",
    "selective_scan_2d_ref",
    "linear_scan",
    "exporting",
]

SCAN_CHUNK = 16  # steps per chunk: the Python loop's length; the chunk-level scan covers L / SCAN_CHUNK
MAX_TRACED_CHUNKS = 2 ** 20  # chunks the fixed chunk-level scan of an exported graph covers
BLOCK_ELEMENTS = 1 << 22  # states per eager block (16 MiB in fp32); _blocked_scan's time blocks hold a quarter
SEQUENTIAL_STEP = 1 << 13  # _blocked_scan: a step of at least this many states is one multiply-add
SUB_CHUNK_STATES = 1 << 16  # _blocked_scan: states that the sub-chunks of a smaller step update at once
MIN_SUB_CHUNK = 4  # _blocked_scan: steps per sub-chunk, at least
BMM_CHANNELS = 64  # _blocked_scan: channels per row from which C is read out by batched matrix products
_LOG2_E = 1.0 / math.log(2.0)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp32, or fp64 when any input is fp64."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _grouped_time_major(BC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Bt, N, L) or (Bt, G, N, L) → (L, Bt, G, 1, N): channel block g of Dm reads group g."""
    BC = BC.to(dtype)
    if BC.dim() == 3:
        BC = BC.unsqueeze(1)
    return BC.permute(3, 0, 1, 2).unsqueeze(3)


def _softplus(x: torch.Tensor, work=()) -> torch.Tensor:
    """``F.softplus``; with ``work`` (three buffers like x), in place: x becomes the result. In eager fp32 on
    CPU, as max(x, 0) + log1p(exp(-|x|)) with log1p(e) formed as log(u) + (e - (u - 1)) / u, u = 1 + e (the
    rounding of u corrected to first order, a few ulps): the CPU's log1p is scalar code, several times slower
    than the rest of the scan's discretization. Above 20 the added term is below half an ulp of x, so the
    result is x, as in softplus's threshold. Exported, as max(x, 0) + log(1 + exp(-|x|)), within 6e-8 of it. An
    internal that tests/kernels/test_export_scan.py checks on its own."""
    if exporting():  # onnxruntime's Softplus (and the threshold's Where) cost a third of an exported scan
        return F.relu(x) + torch.log(1.0 + torch.exp(-x.abs()))
    if x.dtype != torch.float32 or x.device.type != "cpu" or _is_traced() or x.requires_grad:
        return x.copy_(F.softplus(x)) if work else F.softplus(x)
    e, u, t = work or (None, None, None)
    e = torch.abs(x, out=e).neg_().exp_()
    u = torch.add(e, 1.0, out=u)
    e.sub_(torch.sub(u, 1.0, out=t)).div_(u)  # u - 1 is exact: e - (u - 1) is the rounding of u
    return (x.clamp_min_(0.0) if work else x.clamp_min(0.0)).add_(u.log_().add_(e))


def _delta(delta, delta_bias, delta_softplus, dtype, bias_view=(-1, 1)):
    """(pre, dt): delta (+ bias, viewed as ``bias_view`` to broadcast over delta) before and after the optional
    softplus, in the compute dtype."""
    pre = delta.to(dtype)
    if delta_bias is not None:
        pre = pre + delta_bias.to(dtype).view(bias_view)
    return pre, (_softplus(pre) if delta_softplus else pre)


def _shift(x: torch.Tensor, k: int, value: float, dim: int) -> torch.Tensor:
    """x moved k steps forward along ``dim`` (the first k filled with ``value``), keeping its length."""
    return _shift_together((x,), k, (value,), dim)[0]


def _shift_together(xs, k: int, values, dim: int, steps: Optional[torch.Tensor] = None):
    """Tensors of one shape, each moved k steps forward along ``dim`` (the first k filled with its value).

    With a known length, a pad then a cut; otherwise (export, tracing) a gather from arange(n) - k (``steps``
    where given), whose cost does not grow with k and whose length stays symbolic whether or not k exceeds it,
    one index for all (every node of an exported graph costs export time)."""
    n = xs[0].shape[dim]
    if isinstance(n, int) and k <= n and not _is_traced():
        pad = [0, 0] * (xs[0].dim() - 1 - dim) + [k, 0]
        return [F.pad(x, pad, value=value).narrow(dim, 0, n) for x, value in zip(xs, values)]
    source = (torch.arange(n, device=xs[0].device) if steps is None else steps) - k
    index, inside = source.clamp_min(0), (source >= 0).view([-1] + [1] * (xs[0].dim() - 1 - dim))
    return [torch.where(inside, x.index_select(dim, index), value) for x, value in zip(xs, values)]


def _doubling_scan(a: torch.Tensor, b: torch.Tensor, steps: int, dim: int, in_place: bool = False):
    """Hillis-Steele scan of the affine maps h -> a_t h + b_t along ``dim``: after ``steps`` doublings, b
    holds h_t from h = 0 over windows of 2**steps and a their decay products. Every step is one
    fused multiply-add over the whole tensor, with nothing sequential in time. ``in_place`` (eager, known
    sizes) updates a and b in place, only where a step changes them: the padded shifts' fresh tensors cost
    more than the arithmetic at the chunk level."""
    # traced doublings shift by a gather; one arange serves them all
    k, positions = 1, (torch.arange(b.shape[dim], device=b.device) if _is_traced() else None)
    for _ in range(steps):
        if in_place:
            n = b.shape[dim]
            if k >= n:
                break
            b.narrow(dim, k, n - k).addcmul_(a.narrow(dim, k, n - k), b.narrow(dim, 0, n - k).clone())
            a.narrow(dim, k, n - k).mul_(a.narrow(dim, 0, n - k).clone())
        else:
            moved_b, moved_a = _shift_together((b, a), k, (0.0, 1.0), dim, positions)
            b, a = torch.addcmul(b, a, moved_b), a * moved_a
        k *= 2
    return a, b


def exporting() -> bool:
    """True while torch.export or an ONNX exporter traces the model: the public ops then run this
    module's math, which is standard operators only, instead of the custom ops (which exporters
    cannot translate). A plain torch.jit.trace (fvcore's FLOP count) keeps the custom ops."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _is_traced() -> bool:
    """Sizes may not be Python ints (torch.export, jit.trace): the scan then fixes its step counts."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a scan of these inputs may update buffers in place: nothing traces it and autograd records none
    of it (in inference mode a parameter's view still says requires_grad, but nothing is recorded)."""
    return not _is_traced() and not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))


def _chunk_count(L, chunk: int):
    """Chunks of ``chunk`` steps covering L; with symbolic sizes (a SymInt or a traced tensor) at least
    two whatever the length: export would otherwise specialize the graph on whether the traced input
    had one chunk (size-1 dimensions broadcast)."""
    if isinstance(L, int) and not _is_traced():
        return (L + chunk - 1) // chunk
    return L // chunk + 2


def _position_major(t: torch.Tensor, n, chunk: int, value: float = 0.0) -> torch.Tensor:
    """(L, ...) → (chunk, n, ...): step c * chunk + j at [j, c], padded with ``value`` after L. Contiguous, so
    that position j of every chunk is one block of memory."""
    rest = [0, 0] * (t.dim() - 1)
    t = F.pad(t, rest + [0, 2 * chunk], value=value).narrow(0, 0, n * chunk)
    return t.reshape((n, chunk) + t.shape[1:]).transpose(0, 1).contiguous()  # reshape: see _scan_time_major


def _chunked_scan(decay: torch.Tensor, drive: torch.Tensor, chunk_decay: torch.Tensor, L, readout=None,
                  chunk_dim: int = 0, prepare=None):
    """h_t = decay_t * h_{t-1} + drive_t from h_{-1} = 0, for steps laid out in chunks: decay and drive
    are (chunk position, ..., chunk index, ...) with the chunk index at ``chunk_dim`` of a position's
    slice, or lists of one tensor per position (padding: decay 1 and drive 0 keep h); ``chunk_decay``
    (a position's shape) is each chunk's product of decays (the exp of its summed log-decays, which the
    caller forms from small per-step factors). Returns (every state in time order (L, ...), or with a
    ``readout``, readout(h, j) of the states at chunk position j stacked along axis 1 (for the caller to put in
    time order); the last state). A forward that only needs <C_t, h_t> thus never stores every state.

    All chunks advance together, one position of the chunk at a time: a pass from zero gives each
    chunk's end state, a scan over the chunks (log2 of their number doublings) carries the state
    across chunk boundaries, and a second pass from each chunk's true start gives the states. Every
    update is the plain recurrence (a product and a sum, no division), so no decay can overflow, and
    the Python loop runs ``chunk`` times whatever the length. With symbolic sizes (export) the
    chunk-level scan is ``_grouped_chunk_scan`` (under jit.trace, a fixed ``log2(MAX_TRACED_CHUNKS)``
    doublings), which covers MAX_TRACED_CHUNKS chunks.

    ``prepare(j)``, where given, writes position j of decay and drive (eager only: they may be left unwritten
    until then), so that the first pass reads each position while it is still in cache."""
    positions = isinstance(drive, (list, tuple))
    chunk, n = (len(drive) if positions else drive.shape[0]), drive[0].shape[chunk_dim]
    symbolic = not isinstance(n, int) or _is_traced()
    if not symbolic and n > MAX_TRACED_CHUNKS:
        raise ValueError(f"the chunked scan covers at most {MAX_TRACED_CHUNKS} chunks, got {n}")
    # Eager calls update buffers in place: a fresh state-sized tensor per position would cost page faults
    # comparable to the arithmetic. Traced calls (export), and any call autograd records, stay functional.
    in_place = not (_is_traced() or positions or decay.requires_grad or drive.requires_grad)
    if prepare is not None:
        if not in_place:
            raise ValueError("prepare is for eager scans only")
        prepare(0)
    h, spare = drive[0].clone(), (torch.empty_like(drive[0]) if in_place else None)
    for j in range(1, chunk):  # the same rounding both ways: eager and exported programs agree
        if prepare is not None:
            prepare(j)
        if in_place:
            h, spare = torch.addcmul(drive[j], decay[j], h, out=spare), h
        else:
            h = torch.addcmul(drive[j], decay[j], h)
    if symbolic and not torch.jit.is_tracing():
        ends = _grouped_chunk_scan(chunk_decay, h, chunk_dim)
    else:  # jit.trace (the TorchScript ONNX exporter) gets the grouped scan's sizes wrong; no chunk needs no doubling
        steps = int(math.log2(MAX_TRACED_CHUNKS)) if symbolic else math.ceil(math.log2(max(n, 1)))
        _, ends = _doubling_scan(chunk_decay, h, steps, dim=chunk_dim, in_place=in_place)
    h = _shift(ends, 1, 0.0, dim=chunk_dim)  # each chunk's start: the end of the one before
    kept = []
    for j in range(chunk):  # in place, drive becomes the states
        h = drive[j].addcmul_(decay[j], h) if in_place else torch.addcmul(drive[j], decay[j], h)
        kept.append(h if readout is None else readout(h, j))
    last = ends.sum(chunk_dim) if isinstance(n, int) and n == 0 else ends.select(chunk_dim, -1)  # n = 0: h_{-1}
    if readout is not None:
        return torch.stack(kept, 1), last
    out = (drive if in_place else torch.stack(kept)).movedim(chunk_dim + 1, 0)  # (chunk index, position, ...)
    return out.flatten(0, 1).narrow(0, 0, L), last


def _grouped_chunk_scan(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """The chunk-level scan of an exported graph, whose chunk count is symbolic: h_c = a_c h_{c-1} + b_c along
    ``dim`` from h = 0, for up to MAX_TRACED_CHUNKS chunks. The chunks are taken in groups of SCAN_CHUNK (padded
    after the last, by a pad and a reshape) that advance together, one position at a time, keeping each
    position's partial state from the group's start and its decay product; a fixed doubling scan over the groups
    (log2(MAX_TRACED_CHUNKS / SCAN_CHUNK) steps) gives each group's true start, and one multiply-add adds it at
    every position. Fixed doublings over the chunks themselves would cost a whole pass over them per doubling
    (20), several times the states' own scan."""
    n, g = b.shape[dim], SCAN_CHUNK
    groups = _chunk_count(n, g)
    a, b = (t.movedim(dim, 0) for t in (a, b))
    # position j of every group: (groups, ...)
    a, b = (_chunk_positions(_in_chunks(t, groups, g)) for t in (a, b))
    h, decay = [b[0]], [a[0]]
    for j in range(1, g):
        h.append(torch.addcmul(b[j], a[j], h[-1]))
        decay.append(a[j] * decay[-1])
    _, ends = _doubling_scan(decay[-1], h[-1], int(math.log2(MAX_TRACED_CHUNKS // g)), dim=0)
    start = _shift(ends, 1, 0.0, dim=0)  # each group's start: the end of the one before
    h = torch.stack([torch.addcmul(h_j, decay_j, start) for h_j, decay_j in zip(h, decay)], 1)  # (groups, g, ...)
    return h.flatten(0, 1).narrow(0, 0, n).movedim(0, dim)


def linear_scan(log_decay: torch.Tensor, drive: torch.Tensor, chunk: int = SCAN_CHUNK) -> torch.Tensor:
    """h_t = exp(log_decay_t) * h_{t-1} + drive_t from h_{-1} = 0, along dim 0 (time-major); returns
    every h_t, shaped like drive (log_decay broadcasts to it). A chunked scan: see ``_chunked_scan``."""
    L = drive.shape[0]
    n = _chunk_count(L, chunk)
    log_decay = _position_major(log_decay.expand_as(drive), n, chunk)
    return _chunked_scan(log_decay.exp(), _position_major(drive, n, chunk), log_decay.sum(0).exp(), L)[0]


def _eager_blocks(Bt, Dm: int, G: int, states_per_channel):
    """(rows, channels, groups) slices that a forward autograd records scans together, so that a block's states
    stay near BLOCK_ELEMENTS whatever the batch and width: whole rows while they fit, else channels of
    one row, a block lying inside one group of B/C or covering whole groups. One block when sizes are
    symbolic."""
    everything = slice(None)
    if not isinstance(Bt, int) or _is_traced() or Bt * Dm * states_per_channel == 0:  # symbolic, or nothing
        return [(everything, everything, everything)]
    if Dm * states_per_channel <= BLOCK_ELEMENTS:
        rows = max(1, min(Bt, BLOCK_ELEMENTS // (Dm * states_per_channel)))
        return [(slice(r, r + rows), everything, everything) for r in range(0, Bt, rows)]
    group = Dm // G
    width = max(1, BLOCK_ELEMENTS // states_per_channel)
    if width >= group:
        width -= width % group
        channels = [(c, min(c + width, Dm)) for c in range(0, Dm, width)]
    else:  # split each group evenly
        width = -(-group // -(-group // width))
        channels = [(c, min(c + width, g + group)) for g in range(0, Dm, group) for c in range(g, g + group, width)]
    return [(slice(r, r + 1), slice(c0, c1), slice(c0 // group, (c1 - 1) // group + 1))
            for r in range(Bt) for c0, c1 in channels]


_SCRATCH = threading.local()  # per thread: {(name, dtype, device, inference mode): flat buffer}


def _scratch(name: str, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized eager work buffer of ``shape``, kept per thread and reused by the next call: on CPU a
    fresh state-sized tensor costs a page fault per 4 KiB written, comparable to the arithmetic on it. A
    buffer grown past 2 * BLOCK_ELEMENTS (a block of one long row) is not kept. Buffers made in inference
    mode are kept apart: outside it, an inference tensor may not be updated in place."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
    numel = math.prod(shape)
    if numel > 2 * BLOCK_ELEMENTS:
        buffers.pop(key, None)
        return like.new_empty(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = like.new_empty(max(numel, BLOCK_ELEMENTS))
    return buffer[:numel].view(shape)


def _scan_time_major(u, dt, A, B, dtype, C=None):
    """u, dt (Bt, Dm, L), A (Dm, N), B and C (Bt, [G,] N, L) → (every state (L, Bt, Dm, N), or with C
    y = <C_t, h_t> (L, Bt, Dm)) and the last state (Bt, Dm, N).

    A scan that is traced or that autograd records is ``_functional_scan``'s. An eager one lays the per-step
    inputs out in chunks (``_position_major``) while they are small and holds a chunk position's states as
    (N, chunks, Bt, G, Dm // G), channels innermost and N outermost, in work buffers updated in place: every
    state-sized product then runs along long contiguous rows of channels, with A or B broadcast whole (N is only
    1 to 16), which is several times faster on CPU than products along N."""
    if not _eager(u, dt, A, B, C):
        return _functional_scan(u, dt, A, B, dtype, C)
    Bt, Dm, L = u.shape
    n = _chunk_count(L, SCAN_CHUNK)

    def grouped_steps(BC):  # (Bt, [G,] N, L) → (chunk, N, n, Bt, G, 1), contiguous: products follow its layout
        if BC.shape[0] > 1 and BC.stride(0) == 0:  # a broadcast over rows or steps (stride 0) stays broadcast
            BC = BC[:1]
        if BC.shape[-1] > 1 and BC.stride(-1) == 0:  # → (1, N, 1, Bt|1, G, 1)
            return _grouped_time_major(BC[..., :1], dtype).unsqueeze(0).permute(0, 5, 1, 2, 3, 4).contiguous()
        return _position_major(_grouped_time_major(BC, dtype), n, SCAN_CHUNK).permute(0, 5, 1, 2, 3, 4).contiguous()

    def positions(BC):  # a grouped B or C per chunk position; one tensor where every position shares it
        return [BC[j if BC.shape[0] > 1 else 0] for j in range(SCAN_CHUNK)]

    Bg = grouped_steps(B)
    G = Bg.shape[4]
    grouped = lambda t: t.unflatten(-1, (G, Dm // G))  # (..., Dm) → (..., G, Dm // G): states read B/C group g
    # The decays are exp2(dt * A log2(e)): on CPU torch's exp2 runs about 3x faster than its exp, the scan's
    # costliest step (the extra rounding of A log2(e) is within fp32's).
    A_t = grouped(A.to(dtype).t()[:, None, None] * _LOG2_E)  # (N, 1, 1, G, Dm // G)
    dt_t = grouped(_position_major(dt.permute(2, 0, 1), n, SCAN_CHUNK))  # (chunk, n, Bt, G, Dm // G)
    chunk_decay = (dt_t.sum(0) * A_t).exp2_()
    dt_u = (dt_t * grouped(_position_major(u.to(dtype).permute(2, 0, 1), n, SCAN_CHUNK))).unsqueeze(1)
    # each position's decay and drive written just before the scan's first pass reads them
    shape = (SCAN_CHUNK, A_t.shape[0]) + dt_t.shape[1:]  # (chunk, N, n, Bt, G, Dm // G)
    decay, drive = _scratch("decay", shape, dt_t), dt_t.new_empty(shape)  # drive becomes the states
    B_at = positions(Bg)

    def prepare(j):
        torch.mul(dt_t[j], A_t, out=decay[j]).exp2_()
        torch.mul(dt_u[j], B_at[j], out=drive[j])

    last_state = lambda h: h.flatten(-2, -1).permute(1, 2, 0)  # (N, Bt, G, Dm // G) → (Bt, Dm, N)
    if C is None:
        states, last = _chunked_scan(decay, drive, chunk_decay, L, chunk_dim=1, prepare=prepare)
        return states.flatten(-2, -1).permute(0, 2, 3, 1), last_state(last)
    C_at = positions(grouped_steps(C))

    def contract_C(h, j):  # <C_t, h_t> over N: (N, n, Bt, G, Dm // G) → (n, Bt, G, Dm // G)
        return (h * C_at[j]).sum(0)

    y, last = _chunked_scan(decay, drive, chunk_decay, L, contract_C, chunk_dim=1, prepare=prepare)
    return y.flatten(0, 1).narrow(0, 0, L).flatten(-2, -1), last_state(last)


def _reshape_size(size):
    """``size`` as a reshape's target: -1 when traced (torch.export proves a padded length a multiple of the chunk,
    not of a symbolic count, and would otherwise guard the input's length), the size itself otherwise (-1 is
    ambiguous in an empty tensor)."""
    return -1 if _is_traced() else size


def _in_chunks(t: torch.Tensor, count, chunk: int) -> torch.Tensor:
    """t (L, ...) → (count, chunk, ...), zeros after L (L <= count * chunk <= L + 2 * chunk): one pad of exactly
    the steps missing and a reshape; under jit.trace, which records a pad's amount as a constant, a pad of
    2 * chunk then a cut (whose length it follows)."""
    rest, length = [0, 0] * (t.dim() - 1), count * chunk
    if torch.jit.is_tracing():
        t = F.pad(t, rest + [0, 2 * chunk]).narrow(0, 0, length)
    else:
        t = F.pad(t, rest + [0, length - t.shape[0]])
    return t.reshape((_reshape_size(count), chunk) + tuple(t.shape[1:]))


def _chunk_positions(t: torch.Tensor) -> list:
    """(n, chunk, ...) → chunk tensors (n, ...): position j of every chunk. Selects: each exports as one Gather
    (a narrow as a Slice and a dozen nodes forming its bounds, unbind or split as nodes of several outputs,
    which onnxscript's optimizer, run by plain torch.onnx.export, matches in time quadratic in the graph's size)."""
    return [t.select(1, j) for j in range(t.shape[1])]


def _functional_scan(u, dt, A, B, dtype, C=None):
    """``_scan_time_major`` as whole-tensor operations, for export (standard ONNX operators) and for forwards that
    autograd records. The steps are laid out in n chunks by a pad and a reshape, and each chunk position is
    selected from them (``_chunk_positions``: no transpose of an input-sized tensor). A position's states
    are (n, Bt, G, N, Dm // G), channels innermost: A, B and C broadcast whole, and each step's readout
    <C_t, h_t> is one batched (1, N) x (N, Dm // G) MatMul (a sum over an outer N costs onnxruntime several
    times more)."""
    Bt, Dm, L = u.shape
    N = A.shape[1]
    n = _chunk_count(L, SCAN_CHUNK)
    chunked = lambda t: _in_chunks(t, n, SCAN_CHUNK)
    Bg = _grouped_time_major(B, dtype)  # (L, Bt, G, 1, N)
    G = Bg.shape[2]
    # (Bt, Dm, L) → (n, chunk, Bt, G, 1, Dm // G). A reshape, not unflatten: jit.trace (the TorchScript ONNX
    # exporter) records unflatten's sizes as constants, and every size after it would stay the traced one
    grouped = lambda t: chunked(t.permute(2, 0, 1)).reshape((_reshape_size(n), SCAN_CHUNK, Bt, G, 1, Dm // G))
    A_t = A.to(dtype).reshape(G, Dm // G, N).transpose(1, 2)  # (G, N, Dm // G)
    dt_c = grouped(dt)
    chunk_decay = torch.exp(dt_c.sum(1) * A_t)
    decay = [torch.exp(d * A_t) for d in _chunk_positions(dt_c)]
    drive = [d * b for d, b in zip(_chunk_positions(grouped(dt * u.to(dtype))),
                                   _chunk_positions(chunked(Bg.transpose(-1, -2))))]
    last_state = lambda h: h.transpose(-1, -2).reshape(Bt, Dm, N)  # (Bt, G, N, Dm // G) → (Bt, Dm, N)
    if C is None:
        states, last = _chunked_scan(decay, drive, chunk_decay, L)  # (L, Bt, G, N, Dm // G)
        return states.transpose(-1, -2).reshape(L, Bt, Dm, N), last_state(last)
    Cg = _grouped_time_major(C, dtype).expand(-1, Bt, -1, -1, -1)  # rows of the readout's batch: every row's own
    rows = _reshape_size(n * Bt * G)  # of the readout's batch
    C_at = [c.reshape(rows, 1, N) for c in _chunk_positions(chunked(Cg))]  # (n * Bt * G, 1, N)
    # bmm over (n * Bt * G, N, Dm // G) views, not matmul: its broadcast (expands, views of symbolic sizes) would
    # add a dozen shape nodes per position to an exported graph
    readout = lambda h, j: torch.bmm(C_at[j], h.reshape(rows, N, Dm // G))
    y, last = _chunked_scan(decay, drive, chunk_decay, L, readout)
    y = y.reshape(_reshape_size(n), Bt, G, SCAN_CHUNK, Dm // G).permute(0, 3, 1, 2, 4)  # (n, chunk, Bt, G, Dm//G)
    return y.reshape(_reshape_size(n * SCAN_CHUNK), Bt, Dm).narrow(0, 0, L), last_state(last)


def _time_blocks(step: int, L: int, budget: int):
    """(sub-chunks, steps per sub-chunk) of one time block of ``_blocked_scan`` for steps of ``step`` states. A
    step of SEQUENTIAL_STEP states or more is one multiply-add, the block one sub-chunk of ``budget`` states; a
    smaller step's multiply-add would cost little more than its call, so the block's sub-chunks advance together,
    about SUB_CHUNK_STATES states per multiply-add, at the price of a second pass."""
    if step >= SEQUENTIAL_STEP:
        return 1, max(1, min(L, budget // step))
    sub = max(1, min(-(-SUB_CHUNK_STATES // step), L // MIN_SUB_CHUNK))
    return sub, max(MIN_SUB_CHUNK, min(budget // (step * sub), -(-L // sub)))


def _state_layout(t: torch.Tensor, n_major: bool) -> torch.Tensor:
    """t (..., R, N, X) in the memory order of ``_blocked_scan``'s states: N before R when ``n_major``, else as
    shaped; t itself where it already is."""
    if n_major:
        return t.transpose(-3, -2).contiguous().transpose(-3, -2)
    return t.contiguous()


def _states(steps: int, R: int, N: int, Dg: int, like: torch.Tensor, n_major: bool, name: Optional[str] = None):
    """Uninitialized states (steps, R, N, Dg) in ``_state_layout``'s order; the per-thread scratch buffer ``name``
    where given."""
    shape = (steps, N, R, Dg) if n_major else (steps, R, N, Dg)
    t = like.new_empty(shape) if name is None else _scratch(name, shape, like)
    return t.transpose(1, 2) if n_major else t


def _steps_of(t: torch.Tensor, t0: int, n: int) -> torch.Tensor:
    """Steps t0 .. t0 + n of a time-major t, which may hold one step that every step shares."""
    return t if t.shape[0] == 1 else t[t0:t0 + n]


def _blocked_scan(u, delta, delta_bias, delta_softplus: bool, A, B, C, y):
    """The eager forward of R independent rows of Dg channels that share B_t and C_t within a row, time-major:
    u, delta (L, R, Dg), delta_bias (R, Dg) or None, and A (R, N, Dg) in the compute dtype; B and C
    (L, R, N, 1), or (1, R, N, 1) where every step shares them. Writes y_t = <C_t, h_t> to y (L, R, Dg) and
    returns the last state (R, N, Dg).

    fp32 problems on CPU run the compiled C loop of ``cpu_scan`` where it is available (states in registers, one
    pass). The PyTorch form below runs otherwise: each time block's dt = softplus(delta + bias), its decays
    exp2(dt A log2(e)) and its drives dt u B are formed by a few products over the whole block, its states by one
    multiply-add per step written over the drives, and its readout by one product: a few operations per step, on
    buffers of at most BLOCK_ELEMENTS // 4 states that stay in cache (a scan over all L steps at once would stream
    every state through memory several times). Rows are scanned in groups whose blocks hold at least 16 steps.
    Rows of few channels hold their states N-major, so that products broadcast over N along long rows and the
    readout sums whole rows."""
    L, R, Dg = u.shape
    N = A.shape[1]
    last = cpu_scan.selective_scan_fwd(u, delta, delta_bias, delta_softplus, A, B, C, y)
    if last is not None:
        return last
    budget = max(BLOCK_ELEMENTS // 4, 1)
    rows = max(1, min(R, budget // (16 * max(N * Dg, 1))))
    last = [_scan_rows(u[:, r], delta[:, r], None if delta_bias is None else delta_bias[r], delta_softplus, A[r],
                       B[:, r], C[:, r], y[:, r], budget)
            for r in (slice(r0, r0 + rows) for r0 in range(0, max(R, 1), rows))]
    return last[0] if len(last) == 1 else torch.cat(last)


def _scan_rows(u, delta, delta_bias, delta_softplus, A, B, C, y, budget):
    """``_blocked_scan`` of one group of rows: writes y, returns the last state (a new tensor)."""
    L, R, Dg = u.shape
    N = A.shape[1]
    n_major = Dg < BMM_CHANNELS
    sub, chunk = _time_blocks(max(R * N * Dg, 1), L, budget)
    steps = sub * chunk
    A = _state_layout(A * _LOG2_E, n_major)  # exp2 runs about 3x faster than exp on CPU
    B, C = (_state_layout(t, n_major) for t in (B, C))
    decay, drive = (_states(steps, R, N, Dg, u, n_major, name) for name in ("decay", "drive"))
    inputs = [_scratch(name, (steps, R, Dg), u) for name in ("dt", "dt_u", "softplus_e", "softplus_u", "softplus_t")]
    spare = [_states(sub, R, N, Dg, u, n_major, name) for name in ("ping", "pong", "starts", "chunk_decay")]
    last = _states(1, R, N, Dg, u, n_major)[0].zero_()
    each_step = tuple(zip(decay.unbind(0), drive.unbind(0))) if sub == 1 else ()  # views made once
    for t0 in range(0, L, steps):
        n = min(steps, L - t0)
        dt, dtu, *work = (t[:n] for t in inputs)
        torch.add(delta[t0:t0 + n], delta_bias, out=dt) if delta_bias is not None else dt.copy_(delta[t0:t0 + n])
        if delta_softplus:
            _softplus(dt, work)
        torch.mul(dt[:, :, None], A, out=decay[:n]).exp2_()
        torch.mul(torch.mul(dt, u[t0:t0 + n], out=dtu)[:, :, None], _steps_of(B, t0, n), out=drive[:n])
        if sub == 1:
            h = last
            for d, v in each_step[:n]:
                h = v.addcmul_(d, h)
        else:
            h = _scan_sub_chunks(decay, drive, dt, A, chunk, last, spare)
        last.copy_(h)
        _read_out(drive[:n], _steps_of(C, t0, n), y[t0:t0 + n], decay[:n], n_major)
    return last


def _scan_sub_chunks(decay, drive, dt, A, chunk: int, start, spare):
    """A time block of n = len(dt) steps as sub-chunks of ``chunk`` steps that advance together
    (``_chunked_scan`` within the block): a pass from zero gives each sub-chunk's end, a doubling scan over the
    sub-chunks from ``start`` (their decays: exp2 of their summed dt times A) their true starts, and a second
    pass from those the states, written over the drives. Steps after n (decay 1, drive 0) keep the state.
    Returns the block's last state."""
    n = dt.shape[0]
    count = -(-n // chunk)
    m = count * chunk
    decay[n:m].fill_(1.0)
    drive[n:m].zero_()
    d, v = (t[:m].unflatten(0, (count, chunk)).unbind(1) for t in (decay, drive))
    ping, pong, starts, chunk_decay = (t[:count] for t in spare)
    sums = F.pad(dt, (0, 0, 0, 0, 0, m - n)).unflatten(0, (count, chunk)).sum(1)
    torch.mul(sums[:, :, None], A, out=chunk_decay).exp2_()
    h = v[0]
    for j in range(1, chunk):  # chunk >= MIN_SUB_CHUNK: h is never a view of the drives here
        h = torch.addcmul(v[j], d[j], h, out=ping if j % 2 else pong)
    h[0].addcmul_(chunk_decay[0], start)
    _doubling_scan(chunk_decay, h, math.ceil(math.log2(count)), dim=0, in_place=True)
    starts[0].copy_(start)
    starts[1:].copy_(h[:-1])
    h = starts
    for j in range(chunk):
        h = v[j].addcmul_(d[j], h)
    return h[-1]


def _read_out(states, C, y, spare, n_major: bool) -> None:
    """y (n, R, Dg) = <C_t, h_t> of a block's states (n, R, N, Dg) and C (n or 1, R, N, 1); ``spare`` is a
    states-sized buffer free for the products. N-major states are summed over N as whole rows; others by
    batched (1, N) x (N, Dg) matrix products."""
    if n_major:
        torch.sum(torch.mul(states, C, out=spare), 2, out=y)
        return
    n, R, N, Dg = states.shape
    rows = C.expand(n, R, N, 1).reshape(n * R, 1, N)
    if y.is_contiguous():
        torch.bmm(rows, states.view(n * R, N, Dg), out=y.view(n * R, 1, Dg))
    else:
        y.copy_(torch.bmm(rows, states.view(n * R, N, Dg)).view(n, R, Dg))


def selective_scan_states_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Every hidden state h, (Bt, Dm, N, L), in the compute dtype."""
    dtype = compute_dtype(u, delta, A, B)
    _, dt = _delta(delta, delta_bias, delta_softplus, dtype)
    return _scan_time_major(u, dt, A, B, dtype)[0].permute(1, 2, 3, 0)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    out_dtype: Optional[torch.dtype] = None,
):
    """mamba_ssm's selective scan. Returns out (in ``out_dtype``, default u's dtype) and, with
    ``return_last_state``, the final state (Bt, Dm, N) in the compute dtype.

    Without autograd or tracing this is ``_blocked_scan``'s. Otherwise the scan runs in blocks of rows or
    channels (``_eager_blocks``), so that memory stays bounded by the output plus about BLOCK_ELEMENTS states."""
    dtype = compute_dtype(u, delta, A, B, C)
    out_dtype = u.dtype if out_dtype is None else out_dtype
    if _eager(u, delta, A, B, C, D, z, delta_bias):
        y, last = _selective_scan_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype)
        out = y.to(out_dtype)
        return (out, last) if return_last_state else out
    Bt, Dm, L = u.shape
    blocks = _eager_blocks(Bt, Dm, 1 if B.dim() == 3 else B.shape[1], A.shape[1] * L)
    if len(blocks) > 1:
        y, last = u.new_empty((Bt, Dm, L), dtype=dtype), u.new_empty((Bt, Dm, A.shape[1]), dtype=dtype)
    for rows, channels, groups in blocks:
        B_b, C_b = ((t[rows] if t.dim() == 3 else t[rows, groups]) for t in (B, C))
        bias = None if delta_bias is None else delta_bias[channels]
        _, dt = _delta(delta[rows, channels], bias, delta_softplus, dtype)
        y_b, last_b = _scan_time_major(u[rows, channels], dt, A[channels], B_b, dtype, C=C_b)
        if len(blocks) == 1:
            y, last = y_b.permute(1, 2, 0), last_b.clone()  # the last state's own storage, not a view
        else:
            y[rows, channels], last[rows, channels] = y_b.permute(1, 2, 0), last_b
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(out_dtype)
    return (out, last) if return_last_state else out


def _selective_scan_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype):
    """``selective_scan_ref`` by ``_blocked_scan``: row (b, g) holds the channels of B/C group g of batch row b.
    Returns y (Bt, Dm, L), contiguous, with D and z applied, and the last state (Bt, Dm, N)."""
    Bt, Dm, L = u.shape
    N, G = A.shape[1], 1 if B.dim() == 3 else B.shape[1]
    R, Dg = Bt * G, Dm // G
    like = u.new_empty(0, dtype=dtype)

    def time_major(t, name):  # (Bt, Dm, L) → (L, R, Dg) in a work buffer
        return _scratch(name, (L, Bt, Dm), like).copy_(t.permute(2, 0, 1)).view(L, R, Dg)

    def steps(BC):  # (Bt, [G,] N, L) → (L, R, N, 1), or one step where the steps are a broadcast (stride 0)
        BC = BC if BC.dim() == 4 else BC.unsqueeze(1)
        if BC.shape[-1] > 1 and BC.stride(-1) == 0:
            BC = BC[..., :1]
        return BC.permute(3, 0, 1, 2).to(dtype).reshape(BC.shape[3], R, N, 1)

    u, y = time_major(u, "u"), _scratch("y", (L, R, Dg), like)
    bias = None if delta_bias is None else delta_bias.to(dtype).view(G, Dg).expand(Bt, G, Dg).reshape(R, Dg)
    A = A.to(dtype).view(G, Dg, N).transpose(1, 2).expand(Bt, G, N, Dg).reshape(R, N, Dg)
    last = _blocked_scan(u, time_major(delta, "delta"), bias, delta_softplus, A, steps(B), steps(C), y)
    if D is not None:
        y.view(L, Bt, G, Dg).addcmul_(u.view(L, Bt, G, Dg), D.to(dtype).view(G, Dg))
    y = y.view(L, Bt, Dm).permute(1, 2, 0)  # a work buffer: the result is a new tensor either way
    y = y.clone(memory_format=torch.contiguous_format) if z is None else F.silu(z.to(dtype)) * y
    return y, last.view(Bt, G, N, Dg).transpose(2, 3).reshape(Bt, Dm, N)


def _reduce_groups(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(Bt, Dm, N, L) summed back to B/C's shape (Bt, N, L) or (Bt, G, N, L)."""
    if like.dim() == 3:
        return t.sum(1)
    return t.unflatten(1, (like.shape[1], -1)).sum(2)  # not reshape(..., -1): an empty t infers nothing


def _expand_groups(BC: torch.Tensor, Dm: int, dtype: torch.dtype) -> torch.Tensor:
    """(Bt, N, L) or (Bt, G, N, L) → (Bt, Dm|1, N, L): channel d reads group d // (Dm // G)."""
    BC = BC.to(dtype)
    if BC.dim() == 3:
        return BC.unsqueeze(1)
    Bt, G, N, L = BC.shape
    return BC.unsqueeze(2).expand(Bt, G, Dm // G, N, L).reshape(Bt, Dm, N, L)


def _backward_core(g_out, dt, pre_softplus, u, A, B, log_decay, states, delta_softplus, dtype):
    """Shared tail of the backward passes, given g_out (L, Bt, Dm, N): the gradient reaching each state
    from outside the recurrence. Returns du (scan part), ddelta_pre (before softplus/bias), dA, dB."""
    Dm = u.shape[1]
    # Adjoint recurrence g_t = g_out_t + decay_{t+1} * g_{t+1}: the same scan, run on reversed time.
    next_log_decay = _shift(log_decay.expand_as(g_out).flip(0), 1, 0.0, dim=0)
    g = linear_scan(next_log_decay, g_out.flip(0)).flip(0).permute(1, 2, 3, 0)  # (Bt, Dm, N, L)
    h_prev = _shift(states, 1, 0.0, dim=0).permute(1, 2, 3, 0)
    decay = log_decay.exp().permute(1, 2, 3, 0)
    B_full = _expand_groups(B, Dm, dtype)  # (Bt, Dm|1, N, L)
    u = u.to(dtype)
    gB = (g * B_full).sum(2)  # (Bt, Dm, L)
    d_decay_arg = g * h_prev * decay  # gradient of dt*A inside exp
    ddt = gB * u + (d_decay_arg * A.to(dtype)[None, :, :, None]).sum(2)
    du = gB * dt
    dA = (d_decay_arg * dt.unsqueeze(2)).sum((0, 3))
    dB = _reduce_groups(g * (dt * u).unsqueeze(2), B)
    if delta_softplus:
        ddt = ddt * torch.sigmoid(pre_softplus)
    return du, ddt, dA, dB


def _discretize_for_backward(u, delta, A, B, delta_bias, delta_softplus, dtype):
    """pre-softplus delta, dt, log-decays (L, Bt, Dm, N) and every state (L, Bt, Dm, N)."""
    pre, dt = _delta(delta, delta_bias, delta_softplus, dtype)
    log_decay = dt.permute(2, 0, 1).unsqueeze(-1) * A.to(dtype)
    return pre, dt, log_decay, _scan_time_major(u, dt, A, B, dtype)[0]


def selective_scan_bwd_ref(dout, dlast_state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False):
    """Gradients of ``selective_scan_ref`` (out, last_state) for u, delta, A, B, C, D, z, delta_bias,
    each in its input's dtype (None where the input is None)."""
    dtype = compute_dtype(u, delta, A, B, C)
    Dm = u.shape[1]
    pre, dt, log_decay, states = _discretize_for_backward(u, delta, A, B, delta_bias, delta_softplus, dtype)
    C_full = _expand_groups(C, Dm, dtype)  # (Bt, Dm|1, N, L)
    y = (states.permute(1, 2, 3, 0) * C_full).sum(2)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    dy = dout.to(dtype)
    dz = None
    if z is not None:
        zf = z.to(dtype)
        sig = torch.sigmoid(zf)
        dz = (dy * y * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = dy * zf * sig
    g_out = (dy.unsqueeze(2) * C_full).permute(3, 0, 1, 2).contiguous()  # (L, Bt, Dm, N)
    if dlast_state is not None and g_out.shape[0]:  # an empty sequence's last state is the constant 0
        g_out[-1] += dlast_state.to(dtype)
    du, ddt, dA, dB = _backward_core(g_out, dt, pre, u, A, B, log_decay, states, delta_softplus, dtype)
    dC = _reduce_groups(states.permute(1, 2, 3, 0) * dy.unsqueeze(2), C)
    dD = None
    if D is not None:
        du = du + dy * D.to(dtype)[:, None]
        dD = (dy * u.to(dtype)).sum((0, 2)).to(D.dtype)
    ddelta_bias = None if delta_bias is None else ddt.sum((0, 2)).to(delta_bias.dtype)
    return (du.to(u.dtype), ddt.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz,
            ddelta_bias)


def selective_scan_states_bwd_ref(dstates, u, delta, A, B, delta_bias=None, delta_softplus=False):
    """Gradients of ``selective_scan_states_ref`` for u, delta, A, B, delta_bias."""
    dtype = compute_dtype(u, delta, A, B)
    pre, dt, log_decay, states = _discretize_for_backward(u, delta, A, B, delta_bias, delta_softplus, dtype)
    g_out = dstates.to(dtype).permute(3, 0, 1, 2).contiguous()
    du, ddt, dA, dB = _backward_core(g_out, dt, pre, u, A, B, log_decay, states, delta_softplus, dtype)
    ddelta_bias = None if delta_bias is None else ddt.sum((0, 2)).to(delta_bias.dtype)
    return du.to(u.dtype), ddt.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), ddelta_bias


def _route_gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (Bt, L, K, F), or (Bt, L, F) shared by routes; index (K, Lr) → (Bt, Lr, K, F), step-major: the scan
    reads it time-major with no transpose of a pixel-sized tensor but the batch's."""
    index = index.t()
    if t.dim() == 3:
        return t[:, index]
    return t[:, index, torch.arange(index.shape[1], device=index.device).expand_as(index)]


def _route_scatter(values: torch.Tensor, index: torch.Tensor, L: int, shared: bool) -> torch.Tensor:
    """Adjoint of ``_route_gather``: values (Bt, Lr, K, F) added into (Bt, L, K, F), or (Bt, L, F)."""
    Bt, Lr, K, Fe = values.shape
    index = index.t()
    route = torch.arange(K, device=index.device).expand_as(index)
    if not _is_traced():  # rows of F added in place: several times faster than index_put's accumulation
        flat = index if shared else index * K + route
        out = values.new_zeros(Bt, L if shared else L * K, Fe)
        out.index_add_(1, flat.reshape(-1), values.reshape(Bt, Lr * K, Fe))
        return out if shared else out.view(Bt, L, K, Fe)
    out = values.new_zeros(L, K, Bt, Fe).index_put((index, route), values.permute(1, 2, 0, 3), accumulate=True)
    out = out.permute(2, 0, 1, 3)
    return out.sum(2) if shared else out


def _channels_first(t: torch.Tensor) -> torch.Tensor:
    """(Bt, Lr, K, F) → (Bt, K*F, Lr), a view: route k owns channel block k."""
    Bt, Lr, K, Fe = t.shape
    return t.reshape(Bt, Lr, K * Fe).transpose(1, 2)


def _channels_last(t: torch.Tensor, K: int) -> torch.Tensor:
    """(Bt, K*F, Lr) → (Bt, Lr, K, F)."""
    Bt, KF, Lr = t.shape
    return t.transpose(1, 2).reshape(Bt, Lr, K, KF // K)


def _fold_routes(x, delta, A, B, C, D, delta_bias, routes, param_routes):
    """The 2D problem as one grouped 1D scan: routes gathered, route k → channel block / group k.
    Padded (-1) steps only trail a route, so whatever they compute never reaches a visited pixel."""
    Bt, H, W, K, Dm = delta.shape
    N, L = A.shape[-1], H * W
    at, param_at = routes.clamp(min=0), param_routes.clamp(min=0)
    xs = x.reshape(Bt, L, Dm) if x.dim() == 4 else x.reshape(Bt, L, K, Dm)
    return dict(
        u=_channels_first(_route_gather(xs, at)),
        delta=_channels_first(_route_gather(delta.reshape(Bt, L, K, Dm), param_at)),
        A=A.reshape(K * Dm, N),
        B=_route_gather(B.reshape(Bt, L, K, N), param_at).permute(0, 2, 3, 1),
        C=_route_gather(C.reshape(Bt, L, K, N), param_at).permute(0, 2, 3, 1),
        D=None if D is None else D.reshape(K * Dm),
        delta_bias=None if delta_bias is None else delta_bias.reshape(K * Dm),
    )


def _unfold_routes(y: torch.Tensor, routes: torch.Tensor, H, W, merge: str) -> torch.Tensor:
    """The folded scan's output y (Bt, K*F, Lr) back on the pixels: each visited step's output added to its
    pixel (padded steps dropped), summed over the routes, (Bt, H, W, F), for merge "sum", else (Bt, H, W, K, F)."""
    Bt, KF, _ = y.shape
    K = routes.shape[0]
    y = _channels_last(y, K) * (routes >= 0).t()[None, :, :, None].to(y.dtype)
    out = _route_scatter(y, routes.clamp(min=0), H * W, shared=(merge == "sum"))
    return out.reshape((Bt, H, W, KF // K) if merge == "sum" else (Bt, H, W, K, KF // K))


def selective_scan_2d_ref(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    routes: torch.Tensor,
    param_routes: torch.Tensor,
    merge: str,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Gather along each route, scan, write each step's output to its pixel (validated inputs: each
    route visits a pixel at most once). The output is in ``out_dtype`` (default x's dtype); an fp64 one
    computes in fp64, as an fp64 x would."""
    H, W = delta.shape[1:3]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    x = _widened(x, out_dtype, compute_dtype(x, delta, A, B, C))
    dtype = compute_dtype(x, delta, A, B, C)
    if _eager(x, delta, A, B, C, D, delta_bias):
        out = _scan_2d_eager(x, delta, A, B, C, D, delta_bias, delta_softplus, routes, param_routes, merge, dtype)
        return out.to(out_dtype)
    folded = _fold_routes(x, delta, A, B, C, D, delta_bias, routes, param_routes)
    y = selective_scan_ref(**folded, delta_softplus=delta_softplus, out_dtype=dtype)
    return _unfold_routes(y, routes, H, W, merge).to(out_dtype)


def _scan_2d_eager(x, delta, A, B, C, D, delta_bias, delta_softplus, routes, param_routes, merge, dtype):
    """``selective_scan_2d_ref`` by ``_blocked_scan``: each route's steps gathered time-major into work buffers
    (no transposes around the 1D scan), row (k, b) holding route k of batch row b, and each step's output
    added to its pixel. Returns (Bt, H, W, [K,] Dm) in the compute dtype."""
    Bt, H, W, K, Dm = delta.shape
    L, N, Lr = H * W, A.shape[-1], routes.shape[1]
    route = torch.arange(K, device=routes.device)
    pixel = {name: r.clamp(min=0).t() for name, r in (("x", routes), ("param", param_routes))}  # (Lr, K)
    like = x.new_empty(0, dtype=dtype)

    def gather(t, at, name):  # (Bt, H, W, [K,] F) → (Lr, K * Bt, F): step s of row (k, b) reads pixel at[s, k]
        per_route, F_ = t.dim() == 5, t.shape[-1]
        rows = t.to(dtype).reshape(Bt, L * K if per_route else L, F_).transpose(0, 1)
        index = (at * K + route if per_route else at).reshape(-1)
        out = _scratch(name, (Lr * K, Bt * F_), like)
        return torch.index_select(rows.reshape(rows.shape[0], Bt * F_), 0, index, out=out).view(Lr, K * Bt, F_)

    u, y = gather(x, pixel["x"], "u"), _scratch("y", (Lr, K * Bt, Dm), like)
    B, C = (gather(t, pixel["param"], name)[..., None] for t, name in ((B, "B"), (C, "C")))
    bias = None if delta_bias is None else delta_bias.to(dtype)[:, None].expand(K, Bt, Dm).reshape(K * Bt, Dm)
    A = A.to(dtype).transpose(1, 2).unsqueeze(1).expand(K, Bt, N, Dm).reshape(K * Bt, N, Dm)
    _blocked_scan(u, gather(delta, pixel["param"], "delta"), bias, delta_softplus, A, B, C, y)
    y = y.view(Lr, K, Bt, Dm)
    if D is not None:
        y.addcmul_(u.view(Lr, K, Bt, Dm), D.to(dtype).view(K, 1, Dm))
    y.mul_((routes >= 0).t().to(dtype)[:, :, None, None])  # padded steps reach no pixel
    shared = merge == "sum"
    flat = (pixel["x"] if shared else pixel["x"] * K + route).reshape(-1)
    out = y.new_zeros((L if shared else L * K, Bt, Dm)).index_add_(0, flat, y.view(Lr * K, Bt, Dm))
    out = out.view(L, Bt, Dm).transpose(0, 1) if shared else out.view(L, K, Bt, Dm).permute(2, 0, 1, 3)
    return out.reshape((Bt, H, W, Dm) if shared else (Bt, H, W, K, Dm))


def _widened(x: torch.Tensor, dtype: torch.dtype, floor: Optional[torch.dtype] = None) -> torch.Tensor:
    """x in ``dtype`` where that is wider than x's dtype (and than ``floor``, a precision the scan reaches
    anyway): the scan then runs as on a copy of x in ``dtype``. x itself otherwise."""
    have = x.dtype if floor is None else torch.promote_types(x.dtype, floor)
    return x if torch.promote_types(have, dtype) == have else x.to(dtype)


def selective_scan_2d_bwd_ref(dout, x, delta, A, B, C, D, delta_bias, delta_softplus, routes, param_routes,
                              merge):
    """Gradients of ``selective_scan_2d_ref`` for x, delta, A, B, C, D, delta_bias. A dout wider than x
    (the output of a wider ``out_dtype``) gives the gradients of a copy of x in dout's dtype: x's gradient is
    summed over routes in that dtype and rounded to x's once."""
    x_dtype = x.dtype
    x = _widened(x, dout.dtype)
    Bt, H, W, K, Dm = delta.shape
    L = H * W
    dtype = compute_dtype(x, delta, A, B, C)
    at, param_at = routes.clamp(min=0), param_routes.clamp(min=0)
    valid = (routes >= 0).t()[None, :, :, None].to(dtype)
    dout = dout.to(dtype)
    dy = _route_gather(dout.reshape(Bt, L, Dm) if merge == "sum" else dout.reshape(Bt, L, K, Dm), at) * valid
    folded = _fold_routes(x, delta, A, B, C, D, delta_bias, routes, param_routes)
    du, ddt, dA, dB, dC, dD, _, dbias = selective_scan_bwd_ref(
        _channels_first(dy), None, **folded, z=None, delta_softplus=delta_softplus)
    dx = _route_scatter(_channels_last(du.to(dtype), K) * valid, at, L, shared=(x.dim() == 4))
    ddelta = _route_scatter(_channels_last(ddt.to(dtype), K) * valid, param_at, L, shared=False)
    dB = _route_scatter(dB.to(dtype).permute(0, 3, 1, 2) * valid, param_at, L, shared=False)
    dC = _route_scatter(dC.to(dtype).permute(0, 3, 1, 2) * valid, param_at, L, shared=False)
    return (
        dx.reshape(x.shape).to(x_dtype),
        ddelta.reshape(delta.shape).to(delta.dtype),
        dA.reshape(A.shape).to(A.dtype),
        dB.reshape(B.shape).to(B.dtype),
        dC.reshape(C.shape).to(C.dtype),
        None if D is None else dD.reshape(D.shape).to(D.dtype),
        None if delta_bias is None else dbias.reshape(delta_bias.shape).to(delta_bias.dtype),
    )


class ReferenceBackend:
    """The ``vmamba_kernels.backend.ScanBackend`` of the functions above: pure PyTorch on any device (the
    CPU path, and the fp64 path of every backend); the backward recomputes the states and runs the adjoint
    recurrence. Backward functions return None for absent inputs."""

    @staticmethod
    def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)

    @staticmethod
    def selective_scan_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return selective_scan_bwd_ref(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def selective_scan_states_fwd(u, delta, A, B, delta_bias, delta_softplus):
        return selective_scan_states_ref(u, delta, A, B, delta_bias, delta_softplus)

    @staticmethod
    def selective_scan_states_bwd(dstates, u, delta, A, B, delta_bias, delta_softplus):
        return selective_scan_states_bwd_ref(dstates, u, delta, A, B, delta_bias, delta_softplus)

    @staticmethod
    def selective_scan_2d_fwd(x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge,
                              out_dtype=None):
        return selective_scan_2d_ref(x, delta, A, B, C, D, delta_bias, delta_softplus, routes, param_routes, merge,
                                     out_dtype)

    @staticmethod
    def selective_scan_2d_bwd(dout, x, delta, A, B, C, D, delta_bias, routes, param_routes, delta_softplus, merge):
        return selective_scan_2d_bwd_ref(dout, x, delta, A, B, C, D, delta_bias, delta_softplus, routes,
                                         param_routes, merge)
