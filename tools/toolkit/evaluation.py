"""Top-1/top-5 evaluation and the processes/devices plumbing shared by train.py and validate.py."""
import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .cli import UsageError

__all__ = ['Runtime', 'init_runtime', 'autocast_context', 'evaluate', 'AMP_DTYPES']

AMP_DTYPES = {'none': None, 'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> Runtime:
    """Rank and world size as torchrun sets them, before any process group exists."""
    return Runtime(device=torch.device('cpu'), rank=int(os.environ.get('RANK', 0)),
                   world_size=int(os.environ.get('WORLD_SIZE', 1)), local_rank=int(os.environ.get('LOCAL_RANK', 0)))


def init_runtime(device: str = 'auto') -> Runtime:
    """Pick the device and, under torchrun, join the process group (NCCL on GPU, gloo on CPU)."""
    rt = world_from_env()
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise UsageError('--device cuda requested but CUDA is not available')
        index = rt.local_rank if device == 'cuda' else torch.device(device).index
        torch.cuda.set_device(index)
        rt.device = torch.device('cuda', index)
    else:
        rt.device = torch.device(device)
    if rt.world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if rt.device.type == 'cuda' else 'gloo'
        kwargs = {'device_id': rt.device} if rt.device.type == 'cuda' else {}
        dist.init_process_group(backend=backend, **kwargs)
    return rt


def autocast_context(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, rt: Runtime, amp: str = 'none', channels_last: bool = False,
             max_batches: Optional[int] = None) -> Dict[str, float]:
    """Top-1/top-5 (%) and mean cross-entropy over the loader, summed exactly over the ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # correct@1, correct@5, loss sum, count
    for i, (images, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = images.to(rt.device, non_blocking=True)
        targets = targets.to(rt.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(rt.device, amp):
            logits = model(images)
        if isinstance(logits, (tuple, list)):  # heads returned separately: average them (DeiT convention)
            logits = sum(logits) / len(logits)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        hit = topk.eq(targets[:, None])
        sums[0] += hit[:, :1].sum()
        sums[1] += hit.sum()
        sums[2] += F.cross_entropy(logits, targets, reduction='sum').double()
        sums[3] += targets.numel()
    if rt.distributed:
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {'top1': 100.0 * sums[0].item() / n, 'top5': 100.0 * sums[1].item() / n, 'loss': sums[2].item() / n,
            'count': int(sums[3].item())}
