import pytest

from vmamba_zoo.layers.route_scan import fused_projections


@pytest.fixture(params=[False, True], ids=['per-route', 'fused'])
def projection_form(request):
    """Runs a test with the mixers' per-route projections (CPU's form) and with their fused, launch-saving form
    (CUDA's), so that both are held to the test's oracle on any device."""
    with fused_projections(request.param):
        yield request.param
