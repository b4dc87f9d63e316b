"""CUDA graph capture as the ops see it: one answer for validation, tuning, caches and allocation."""
import torch

__all__ = ["capturing"]


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (never where CUDA is not initialized).
    Nothing may then synchronise with the host (value checks), run tuning launches or fill a cache: the calls
    before the capture have done those."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
