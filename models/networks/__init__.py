"""Networks: backbone registry and the conditional encoder + denoiser of MSSegDiff."""

from .backbones import BACKBONES, Backbone, spatial_multiple
from .network import DiffusionSegmentationNet, NetworkConfig, build_network

__all__ = [
    "BACKBONES",
    "Backbone",
    "DiffusionSegmentationNet",
    "NetworkConfig",
    "build_network",
    "spatial_multiple",
]
