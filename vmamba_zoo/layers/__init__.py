"""Reusable blocks of the zoo: family-agnostic, built on vmamba_kernels."""
from .state_fusion import StateFusion, merge_dilated_kernels
from .routes import device_routes
from .route_scan import RouteScanParams, dt_projection_init, per_route_linear
from .stages import ChannelsLastStagesMixin
from .init import init_linear_and_norm
from .input_size import check_images

__all__ = ["ChannelsLastStagesMixin", "RouteScanParams", "StateFusion", "check_images", "device_routes",
           "dt_projection_init", "init_linear_and_norm", "merge_dilated_kernels", "per_route_linear"]
