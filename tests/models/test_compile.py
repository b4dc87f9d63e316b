"""torch.compile of every family: one graph per mode (inference, training), no graph break, no recompilation.

The small variants of test_export, in the CUDA's projection form (the one CUDA graphs capture; test_timm_api
compiles the CPU's), compiled with
``backend="aot_eager"`` (dynamo and AOTAutograd, where a model's Python shows up in compile time): a guard on
state that eager calls change (a cache read while tracing) recompiles the whole model at a later call, and a
graph break splits it; either multiplies the compile time of a model, and a CUDA graph of it.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from vmamba_zoo.layers.route_scan import fused_projections

from .test_export import SMALL, _model

SIZE = (2, 3, 32, 32)
OTHER_SIZE = (1, 3, 48, 40)  # an eager call at another size fills the ops' and the routes' caches anew
FACTORIES = (torch.arange, torch.empty, torch.full, torch.ones, torch.zeros, torch.eye, torch.tensor,
             torch.scalar_tensor)


def _host_built(graphs, device):
    """Tensor factories of the captured graphs that do not build on ``device`` (a routes table built on the
    host and copied in would put CPU work and a copy into a CUDA graph)."""
    return [f"{n.name} = torch.{n.target.__name__}(device={n.kwargs.get('device')}), want device={device}"
            for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and n.target in FACTORIES and n.kwargs.get("device") != device]


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_compiles_one_graph_per_mode_and_no_eager_call_recompiles_it(name):
    torch._dynamo.reset()
    with fused_projections(True):
        _check_compile(name)


def _check_compile(name):
    model = _model(name)
    x = torch.randn(SIZE)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        model(torch.randn(OTHER_SIZE))
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x)
    assert counter.frame_count == 1

    model.train()
    compiled(x).sum().backward()  # the training graph: grad mode and module.training differ (one recompilation)
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    want = _grads(model)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    model(torch.randn(OTHER_SIZE)).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x).sum().backward()
    assert counter.frame_count == 2, f"{counter.frame_count} graphs compiled for inference and training, want 2"
    assert _host_built(counter.graphs, x.device) == []
