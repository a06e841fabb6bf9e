"""Backbone registry: how msx builds each MONAI network family and where its down path is.

A backbone entry never changes the MONAI network; it only names the submodules that form the down path.
The encoder keeps those submodules (the decoder is dropped, so DistributedDataParallel sees no unused
parameters) and the denoiser, a complete network, is conditioned at the outputs of the same submodules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from monai.networks.nets import BasicUNet, SegResNet
from torch import nn

from ..registry import Registry

CHANNEL_MULTIPLE = 8


def scale_channels(reference_channels: int, width: float) -> int:
    """Reference channel count times width, rounded to a multiple of 8 (at least 8).

    Multiples of 8 keep every GroupNorm with up to 8 groups valid at any width and suit tensor cores.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(CHANNEL_MULTIPLE, round(reference_channels * width / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE)


class DownPathEncoder(nn.Module):
    """Runs a network's down-path stages in order and returns every stage's output."""

    def __init__(self, stages: nn.ModuleList) -> None:
        super().__init__()
        self.stages = stages

    @classmethod
    def from_network(cls, network: nn.Module, stages: tuple[tuple[str, ...], ...]) -> DownPathEncoder:
        return cls(nn.ModuleList(nn.Sequential(*(network.get_submodule(n) for n in names)) for names in stages))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = image
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class Backbone(ABC):
    """One network family. Subclass, fill in the class attributes and `build`, register with BACKBONES.

    `stages` lists, per down-path stage, the dotted names of the submodules that compute it, in the order
    the network runs them; the last name's output is the stage feature map. A family whose down path is not
    such a chain (SwinUNETR's transformer feeds several encoder blocks) overrides `build_encoder` and keeps
    `stages[i][-1]` naming the module whose output matches encoder feature i.
    """

    stages: ClassVar[tuple[tuple[str, ...], ...]]
    spatial_multiple: ClassVar[int]  # every input side must be a multiple of this

    @classmethod
    @abstractmethod
    def build(cls, in_channels: int, out_channels: int, width: float) -> nn.Module:
        """The complete MONAI network at `width` times the reference feature sizes."""

    @classmethod
    @abstractmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        """Channels of each down-path stage output, in stage order."""

    @classmethod
    def build_encoder(cls, image_channels: int, width: float) -> nn.Module:
        """Module mapping an image to its list of stage feature maps (only the down path is kept)."""
        return DownPathEncoder.from_network(cls.build(image_channels, 1, width), cls.stages)

    @classmethod
    def conditioned_modules(cls) -> tuple[str, ...]:
        """Names of the denoiser submodules whose outputs receive the per-stage conditioning."""
        return tuple(names[-1] for names in cls.stages)


BACKBONES: Registry[type[Backbone]] = Registry("backbone")


@BACKBONES.register("unet")
class UNetBackbone(Backbone):
    """MONAI BasicUNet, reference features (64, 64, 128, 256, 512, 64), LeakyReLU 0.1, instance norm."""

    reference_features: ClassVar[tuple[int, ...]] = (64, 64, 128, 256, 512, 64)
    stages = (("conv_0",), ("down_1",), ("down_2",), ("down_3",), ("down_4",))
    spatial_multiple = 16  # four 2x max-poolings

    @classmethod
    def features(cls, width: float) -> tuple[int, ...]:
        return tuple(scale_channels(c, width) for c in cls.reference_features)

    @classmethod
    def build(cls, in_channels: int, out_channels: int, width: float) -> nn.Module:
        return BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            features=cls.features(width),
            act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        )

    @classmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        return cls.features(width)[:5]


@BACKBONES.register("segresnet")
class SegResNetBackbone(Backbone):
    """MONAI SegResNet, blocks_down (1, 2, 2, 4), 64 initial filters, GroupNorm."""

    reference_init_filters: ClassVar[int] = 64
    blocks_down: ClassVar[tuple[int, ...]] = (1, 2, 2, 4)
    # The initial convolution is not a stage of its own: its output only feeds the first residual stage.
    stages = (("convInit", "down_layers.0"), ("down_layers.1",), ("down_layers.2",), ("down_layers.3",))
    spatial_multiple = 8  # three stride-2 convolutions, and the decoder adds upsampled maps to skips

    @classmethod
    def init_filters(cls, width: float) -> int:
        return scale_channels(cls.reference_init_filters, width)

    @classmethod
    def build(cls, in_channels: int, out_channels: int, width: float) -> nn.Module:
        filters = cls.init_filters(width)
        return SegResNet(
            spatial_dims=3,
            init_filters=filters,
            in_channels=in_channels,
            out_channels=out_channels,
            blocks_down=cls.blocks_down,
            # One group per initial filter, as the reference (64 groups for 64 filters); it divides every
            # stage's channel count (filters * 2**i).
            norm=("GROUP", {"num_groups": filters}),
        )

    @classmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        filters = cls.init_filters(width)
        return tuple(filters * 2**i for i in range(len(cls.blocks_down)))


def spatial_multiple(backbone: str) -> int:
    """The number every input side must be a multiple of for this backbone."""
    return BACKBONES.get(backbone).spatial_multiple
