"""Reusable blocks of the zoo: family-agnostic, built on vmamba_kernels."""
from .state_fusion import StateFusion, merge_dilated_kernels
from .routes import device_routes
from .route_scan import RouteScanParams, per_route_linear
from .scan_params import at_least_fp32, init_A_log_and_D_, init_dt_projection_
from .stages import ChannelsLastStagesMixin, Stage
from .heads import ClassifierHeadMixin, channels_last_head
from .init import init_linear_and_norm
from .input_size import check_images

__all__ = ["ChannelsLastStagesMixin", "ClassifierHeadMixin", "RouteScanParams", "Stage", "StateFusion", "at_least_fp32",
           "channels_last_head", "check_images", "device_routes", "init_A_log_and_D_", "init_dt_projection_",
           "init_linear_and_norm", "merge_dilated_kernels", "per_route_linear"]
