"""Allocation of the kernels' outputs and workspaces, and of the state they keep across calls.

Tests turn on poisoning: every fresh buffer is then filled with NaN (floating dtypes) or 77 (integer
dtypes), so that an element a kernel fails to write shows up instead of passing as leftover memory.

CUDA graphs: a buffer kept across calls (a route plan, a placeholder argument) must not come from a graph's
memory pool, or the graph's owner finds a live allocation it does not track ("tensor(s) in the cudagraph pool
not tracked as outputs"). While a graph is captured (``vmamba_kernels.graphs.capturing``) nothing is cached;
otherwise kept buffers are made under ``persistent``, on a stream of their own, which no graph pool claims:
PyTorch routes to a pool only the allocations of the stream being captured or, in
``torch.compile(mode="reduce-overhead")``'s eager warm-up run, of the stream that run uses.
"""
import contextlib

import torch

_poison = {"on": False}
_side_streams = {}


def poison(enabled: bool) -> None:
    _poison["on"] = bool(enabled)


def empty(*shape, dtype, device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _poison["on"]:
        t.fill_(float("nan") if t.is_floating_point() else 77)
    return t


@contextlib.contextmanager
def persistent(device):
    """Allocate buffers that outlive the call (caches) outside any CUDA graph memory pool: on CUDA the block
    runs on a side stream that first waits for the current one, and the current stream then waits for it.
    Callers must not be capturing (``vmamba_kernels.graphs.capturing``). The block's tensors are for the current
    stream: pass them to the yielded ``keep``, which marks them used there, so that freeing one waits for that
    stream's work."""
    device = torch.device(device)
    if device.type != "cuda":
        yield lambda *tensors: None
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    current = torch.cuda.current_stream(index)
    side = _side_streams.get(index)
    if side is None:
        side = _side_streams[index] = torch.cuda.Stream(index)
    kept = []
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield lambda *tensors: kept.extend(tensors)
    current.wait_stream(side)
    for t in kept:
        t.record_stream(current)
