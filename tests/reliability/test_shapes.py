"""Shapes at the edges: an empty batch, every image size from a family's total stride up (odd and non-square
included), and a clear error below it. Small variants of each family (tests/models/test_export.py's SMALL) keep
this to seconds; the registered models' empty batch is checked where they are built anyway
(tests/models/test_timm_api.py)."""
import pytest
import timm
import torch

import vmamba_zoo  # noqa: F401  (registers the models)
from vmamba_kernels import ROUTE_NAMES, scan_routes

from ..models.test_export import SMALL


def _small(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, **SMALL[name], **kwargs)


def _size_grid(stride):
    """The smallest size, one above, odd sizes, and non-square ones both ways (for stride 32: 32, 33, 47x47,
    64x96, 95x33)."""
    return [(stride, stride), (stride + 1, stride + 1), (stride + stride // 2 - 1,) * 2, (2 * stride, 3 * stride),
            (3 * stride - 1, stride + 1)]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_empty_batch_trains_and_gives_empty_outputs(name):
    """Batch 0 in training mode: empty logits (0, num_classes), and a backward that gives every parameter a
    zero gradient (a sum over no image) and the input an empty one."""
    model = _small(name).train()
    x = torch.randn(0, 3, 64, 64, requires_grad=True)
    logits = model(x)
    assert logits.shape == (0, 3)
    logits.sum().backward()
    assert x.grad.shape == x.shape
    for pname, p in model.named_parameters():
        if p.grad is not None:
            assert not p.grad.any(), pname


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_size_from_the_total_stride_up(name):
    """Each size of the grid gives finite logits of the right shape, last-stage maps of the stride's size
    (rounded either way: families pad or crop odd maps), and the answer for an image does not depend on the
    batch it is in: a reshape that mixed pixels of different images, or rows with columns, would show."""
    model = _small(name).eval()
    stride = model.feature_info[-1]["reduction"]
    for H, W in _size_grid(stride):
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            logits = model(x)
            features = model.forward_features(x)
            alone = model(x[1:])
        assert logits.shape == (2, 3) and torch.isfinite(logits).all(), (H, W)
        assert features.shape[1] in (H // stride, -(-H // stride)), (H, W, features.shape)
        assert features.shape[2] in (W // stride, -(-W // stride)), (H, W, features.shape)
        # norm-relative: a reshape that mixed images errs by O(1); GEMMs blocked by batch size differ in fp32 rounding,
        # which an untrained small model's near-zero logits (norm about 0.06) amplify past 1e-3
        assert (alone - logits[1:]).norm() <= 1e-2 * logits[1:].norm(), (H, W)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_image_below_the_total_stride_is_a_clear_error(name):
    model = _small(name).eval()
    stride = model.feature_info[-1]["reduction"]
    for H, W in ((stride - 1, stride), (stride, stride - 1), (1, 1)):
        x = torch.randn(1, 3, H, W)
        for forward in (model, model.forward_features, model.forward_intermediates):
            with pytest.raises(ValueError, match=f"at least {stride}x{stride} pixels .*, got {H}x{W}$"):
                forward(x)
    with pytest.raises(ValueError, match=r"takes images \(B, C, H, W\), got \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize("name", ROUTE_NAMES)
def test_routes_of_one_row_one_column_and_one_pixel_visit_every_pixel_once(name):
    """The smallest maps a model's last stages see (MHS-VM's spiral was once empty on a 1x1 grid)."""
    for H, W in ((1, 1), (1, 5), (4, 1), (2, 3)):
        routes = scan_routes(name, H, W)
        if name == "atrous":  # four sub-grids that partition the grid, -1 padded
            visited = routes[routes >= 0].sort().values
        else:
            assert routes.shape[1] == H * W, (H, W)
            visited = routes.sort(dim=1).values
        expected = torch.arange(H * W).expand_as(visited) if name != "atrous" else torch.arange(H * W)
        assert torch.equal(visited, expected), (name, H, W, routes)
