"""Shared layers of vmamba_zoo.layers against plain formulations."""
import pytest
import torch

from vmamba_zoo.layers import per_route_linear


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_per_route_linear_matches_einsum_with_gradients(dtype, tol):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(2, 3, 5, 4, 6, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(4, 7, 6, generator=g, dtype=dtype).requires_grad_()
    dout = torch.randn(2, 3, 5, 4, 7, generator=g, dtype=dtype)

    out = per_route_linear(x, weight)
    want = torch.einsum('...ki,koi->...ko', x, weight)
    grads = torch.autograd.grad(out, (x, weight), dout)
    want_grads = torch.autograd.grad(want, (x, weight), dout)
    for a, b in zip((out, *grads), (want, *want_grads)):
        assert a.shape == b.shape and not torch.isnan(a).any()
        assert (a - b).norm() <= tol * b.norm()


def test_per_route_linear_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r'x \(\.\.\., K, I\) = \(2, 3, 6\) does not match weight'):
        per_route_linear(torch.zeros(2, 3, 6), torch.zeros(4, 7, 6))
