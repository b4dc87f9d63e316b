"""The public scan ops at their edges, on every backend: empty sequences (L = 0) and empty batches give empty
outputs of the right shapes and a backward that works, and a backend or device mismatch names both sides.

The Triton backend runs on CPU only under TRITON_INTERPRET=1, which Triton reads at import: its checks run in a
child process (``python test_scan_ops_edges.py``) that sets it first, and print one line per case."""
import os
import subprocess
import sys

import pytest
import torch

import vmamba_kernels as vk

# (Bt, L) of the 1D ops and (Bt, H, W) of the 2D op: no step, no image, neither.
EMPTY_1D = [(2, 0), (0, 5), (0, 0)]
EMPTY_2D = [(2, 0, 3), (2, 3, 0), (0, 2, 3)]
D_STATES = [3, 1]  # d_state 1 has its own Triton kernels


def _check_empty_1d(backend, Bt, L, N):
    """selective_scan and selective_scan_states: empty outputs, the last state of no step is h = 0, and the
    parameters' gradients (sums over no step or no image) are 0."""
    Dm = 4
    inputs = dict(u=torch.randn(Bt, Dm, L), delta=torch.randn(Bt, Dm, L), A=-torch.rand(Dm, N),
                  B=torch.randn(Bt, N, L), C=torch.randn(Bt, N, L), D=torch.randn(Dm), z=torch.randn(Bt, Dm, L),
                  delta_bias=torch.randn(Dm))
    for t in inputs.values():
        t.requires_grad_()
    out, last = vk.selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
    assert out.shape == (Bt, Dm, L) and last.shape == (Bt, Dm, N)
    assert not last.any(), "the state after no step is the initial 0"
    (out.sum() + last.sum()).backward()
    for name, t in inputs.items():
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert not t.grad.any(), name

    states_inputs = {k: inputs[k].detach().clone().requires_grad_() for k in ("u", "delta", "A", "B", "delta_bias")}
    states = vk.selective_scan_states(**states_inputs, delta_softplus=True, backend=backend)
    assert states.shape == (Bt, Dm, N, L)
    states.sum().backward()
    for name, t in states_inputs.items():
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name


def _check_empty_2d(backend, Bt, H, W, N):
    """selective_scan_2d, both merges: empty outputs, gradients of the inputs' shapes, the parameters' 0."""
    K, Dm = 4, 4
    routes = vk.scan_routes("cross", H, W) if H * W else torch.empty(K, 0, dtype=torch.long)
    for merge, out_shape in (("sum", (Bt, H, W, Dm)), ("none", (Bt, H, W, K, Dm))):
        inputs = dict(x=torch.randn(Bt, H, W, Dm), delta=torch.randn(Bt, H, W, K, Dm), A=-torch.rand(K, Dm, N),
                      B=torch.randn(Bt, H, W, K, N), C=torch.randn(Bt, H, W, K, N), D=torch.randn(K, Dm),
                      delta_bias=torch.randn(K, Dm))
        for t in inputs.values():
            t.requires_grad_()
        out = vk.selective_scan_2d(**inputs, routes=routes, merge=merge, backend=backend)
        assert out.shape == out_shape, merge
        out.sum().backward()
        for name, t in inputs.items():
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), (merge, name)


@pytest.mark.parametrize("N", D_STATES)
@pytest.mark.parametrize("Bt, L", EMPTY_1D)
def test_empty_1d_scans_on_the_reference(Bt, L, N):
    _check_empty_1d("reference", Bt, L, N)


@pytest.mark.parametrize("N", D_STATES)
@pytest.mark.parametrize("Bt, H, W", EMPTY_2D)
def test_empty_2d_scans_on_the_reference(Bt, H, W, N):
    _check_empty_2d("reference", Bt, H, W, N)


def test_empty_scans_on_triton():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    done = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(done) == len(D_STATES) * (len(EMPTY_1D) + len(EMPTY_2D)), proc.stdout


def test_triton_with_cpu_tensors_names_the_backend_and_the_device():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("under TRITON_INTERPRET=1 the Triton backend runs on CPU")
    if not vk.triton_available():
        pytest.skip("triton is not installed: the backend is refused for that reason instead")
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors .*got tensors on cpu"):
        vk.selective_scan(u, u, -torch.rand(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3), backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors .*got tensors on cpu"):
        vk.resolve_backend("triton", torch.device("cpu"))


def test_tensors_on_two_devices_name_both():
    K, Dm, N = 4, 2, 3
    x, delta = torch.randn(1, 2, 3, Dm), torch.randn(1, 2, 3, K, Dm)
    B, C = torch.randn(1, 2, 3, K, N), torch.randn(1, 2, 3, K, N)
    A = -torch.rand(K, Dm, N)
    routes = vk.scan_routes("cross", 2, 3)
    with pytest.raises(ValueError, match="A must be on cpu like the input, got meta"):
        vk.selective_scan_2d(x, delta, A.to("meta"), B, C, routes=routes)
    with pytest.raises(ValueError, match="routes must be on cpu like the input, got meta"):
        vk.selective_scan_2d(x, delta, A, B, C, routes=routes.to("meta"))
    u = torch.randn(1, Dm, 5)
    with pytest.raises(ValueError, match="delta must be on cpu like the input, got meta"):
        vk.selective_scan(u, u.to("meta"), -torch.rand(Dm, N), torch.randn(1, N, 5), torch.randn(1, N, 5))


if __name__ == "__main__":  # the child of test_empty_scans_on_triton, under TRITON_INTERPRET=1
    from vmamba_kernels.triton import alloc

    alloc.poison(True)  # fresh buffers start as NaN: an unwritten gradient cannot pass as 0
    for N in D_STATES:
        for Bt, L in EMPTY_1D:
            _check_empty_1d("triton", Bt, L, N)
            print(f"ok 1d Bt={Bt} L={L} N={N}", flush=True)
        for Bt, H, W in EMPTY_2D:
            _check_empty_2d("triton", Bt, H, W, N)
            print(f"ok 2d Bt={Bt} H={H} W={W} N={N}", flush=True)
