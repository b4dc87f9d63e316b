"""CUDA-graph capture and replay on a GPU: one model of each family, and train.py's captured update.

These run only where CUDA is (the device machine: ``python -m pytest tests/tools/test_cuda_graphs_gpu.py``); on CPU
the capture paths are covered by tests/tools/test_cuda_graphs.py and tests/kernels/test_graph_safety.py."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from .tool_runner import load_tool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graph capture needs a CUDA device')

ONE_PER_FAMILY = ['vmamba_tiny_s1l8', 'groupmamba_tiny', 'efficientvmamba_tiny', 'spatialmamba_tiny',
                  'plainmamba_l1', 'vim2_tiny']


@pytest.mark.parametrize('name', ONE_PER_FAMILY)
def test_family_captures_and_replays_like_eager(name):
    """Inference and a full training step, captured, replayed on two fresh inputs: each replay matches eager on
    that input (never a stale result) and the training replays move the parameters."""
    tool = load_tool('check_cuda_graphs')
    args = argparse.Namespace(batch_size=2, img_size=64, num_classes=10, amp='bf16', modes='manual', iters=1)
    row = tool.check_model(name, args, torch.device('cuda'))
    assert row['eager']['ok'], row['eager']
    manual = row['manual']
    assert 'error' not in manual, manual.get('traceback')
    assert manual['infer_ok'] and manual['train_ok'] and manual['params_updated'], manual


def test_train_py_captured_update_follows_eager_and_the_scheduler():
    """train.py's capture (warm-up undone, learning rates as tensors) gives the eager run's parameters after
    several updates whose learning rate changes every step."""
    graphs = load_tool('toolkit.cuda_graphs')
    results = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, capturable=captured)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 16, generator=gen).cuda(), torch.randint(0, 4, (8,), generator=gen).cuda())
                   for _ in range(5)]

        def update(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        step = graphs.capture_train_step(update, model, opt, *batches[0], undo_warmup=True) if captured else update
        for x, y in batches:
            step(x, y)
            sched.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, replayed in zip(*results):
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-6)
