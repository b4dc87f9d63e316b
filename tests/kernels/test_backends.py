"""The two backends implement one interface, and the ops pick them by name."""
import inspect

import pytest
import torch

from vmamba_kernels import backend, ops, reference

OPS = [name for name, _ in inspect.getmembers(backend.ScanBackend, inspect.isfunction) if not name.startswith("_")]
SAVING_OPS = [name for name, _ in inspect.getmembers(backend.SavingScanBackend, inspect.isfunction)
              if not name.startswith("_")]


def _parameters(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _assert_implements(impl, protocol, names):
    assert isinstance(impl, protocol)
    for name in names:
        assert _parameters(getattr(impl, name)) == _parameters(getattr(protocol, name)), name


def test_interface_lists_the_six_functions():
    assert len(OPS) == 6 and set(OPS) < set(SAVING_OPS) and len(SAVING_OPS) == 9


def test_reference_implements_the_interface():
    _assert_implements(reference.ReferenceBackend, backend.ScanBackend, OPS)


def test_triton_implements_the_saving_interface():
    pytest.importorskip("triton")
    import vmamba_kernels.triton as triton_backend

    _assert_implements(triton_backend, backend.SavingScanBackend, SAVING_OPS)


def test_ops_pick_the_backend_by_name():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda", torch.device("cpu"))
