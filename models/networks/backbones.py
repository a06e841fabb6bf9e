"""Backbone registry: how msx builds each MONAI network family and where its down path is.

A backbone entry never changes the MONAI network; it names the submodules that form the down path and the
forward that runs the network with conditioning added at their outputs (`conditioning.py`). The encoder keeps
those submodules (the decoder is dropped, so DistributedDataParallel sees no unused parameters) and the
denoiser, a complete network, is conditioned at the outputs of the same submodules.

Registered: "unet" (the paper's MSSegDiff U-Net, `mssegdiff_unet.py`), "multiencoder" (the same denoiser with
one shared single-modality encoder), "basic-unet" (MONAI's BasicUNet as it is: a lighter U-Net that is not the
paper's), "segresnet" (SegResNet), "attention-unet" (AttentionUnet), "swinunetr" (SwinUNETR) and "unetr" (UNETR,
built for one input size). The encoders of the last two and of "multiencoder" are not plain chains; see
`encoders.py`.

Two ways of conditioning the denoiser, both through arguments, so that `torch.compile` traces either as one
graph: the paper's U-Net takes the encoder's stage features and the time step in its forward
(`conditioning = "arguments"`, `build_denoiser`); a MONAI network used as it is runs through its family's
`conditioned_forward`, which adds one tensor per stage to the stage's output (`conditioning = "additions"`,
`network.py` computes them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from monai.networks.nets import UNETR, AttentionUnet, BasicUNet, SegResNet, SwinUNETR
from torch import nn

from ..registry import Registry
from .conditioning import (
    attention_unet_forward,
    basic_unet_forward,
    segresnet_forward,
    swin_unetr_forward,
    unetr_forward,
)
from .encoders import ModalitySumEncoder, SwinUNETREncoder, UNETREncoder
from .mssegdiff_unet import SPATIAL_MULTIPLE as MSSEGDIFF_UNET_SPATIAL_MULTIPLE, MSSegDiffUNetDenoiser

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
    # True for a network built for exactly one input size (UNETR's position embedding): it then needs the
    # `patch_size` argument of `build` and `build_encoder`, and takes inputs of that size only.
    fixed_input_size: ClassVar[bool] = False
    # "additions": the denoiser is `build`'s network, run by `conditioned_forward` with one tensor added to each
    # stage's output. "arguments": `build_denoiser` gives a network taking the time step and stage features.
    conditioning: ClassVar[str] = "additions"
    # For "additions": (`build`'s network, x, stage additions) -> the network's output on x with
    # stage_additions[i] added to the output of stage i (a staticmethod from `conditioning.py`).
    conditioned_forward: ClassVar[Callable[[nn.Module, torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]]
    # True for a family that can also be built from explicit feature sizes (NetworkConfig.features) instead of
    # width: it then has `encoder_with_features` and `denoiser_with_features`.
    takes_features: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def build(
        cls, in_channels: int, out_channels: int, width: float, patch_size: Sequence[int] | None = None
    ) -> nn.Module:
        """The complete MONAI network at `width` times the reference feature sizes.

        `patch_size` is the input size; only a `fixed_input_size` family uses it, the others ignore it.
        """

    @classmethod
    @abstractmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        """Channels of each down-path stage output, in stage order."""

    @classmethod
    def build_encoder(cls, image_channels: int, width: float, patch_size: Sequence[int] | None = None) -> nn.Module:
        """Module mapping an image to its list of stage feature maps (only the down path is kept)."""
        return DownPathEncoder.from_network(cls.build(image_channels, 1, width, patch_size), cls.stages)

    @classmethod
    def build_denoiser(cls, in_channels: int, width: float, patch_size: Sequence[int] | None = None) -> nn.Module:
        """For `conditioning = "arguments"`: forward(concat(image, x_t), t, stage features) -> x0 logits."""
        raise NotImplementedError(f"{cls.__name__} is conditioned by stage additions; it has no build_denoiser")

    @classmethod
    def conditioned_modules(cls) -> tuple[str, ...]:
        """Names of the denoiser submodules whose outputs receive the per-stage conditioning."""
        return tuple(names[-1] for names in cls.stages)


BACKBONES: Registry[type[Backbone]] = Registry("backbone")


@BACKBONES.register("basic-unet")
class BasicUNetBackbone(Backbone):
    """MONAI BasicUNet as it is, reference features (64, 64, 128, 256, 512, 64), LeakyReLU 0.1, instance norm.

    Not the paper's U-Net ("unet"): no squeeze-attention blocks, and the time embedding reaches the five down
    stages only. 38.1 M parameters at width 1.0 against the paper's 85.7 M; kept as the lighter baseline.
    """

    reference_features: ClassVar[tuple[int, ...]] = (64, 64, 128, 256, 512, 64)
    stages = (("conv_0",), ("down_1",), ("down_2",), ("down_3",), ("down_4",))
    spatial_multiple = 16  # four 2x max-poolings
    conditioned_forward = staticmethod(basic_unet_forward)

    @classmethod
    def features(cls, width: float) -> tuple[int, ...]:
        return tuple(scale_channels(c, width) for c in cls.reference_features)

    @classmethod
    def build(
        cls, in_channels: int, out_channels: int, width: float, patch_size: Sequence[int] | None = None
    ) -> nn.Module:
        return cls.basic_unet(in_channels, out_channels, cls.features(width))

    @staticmethod
    def basic_unet(in_channels: int, out_channels: int, features: Sequence[int]) -> BasicUNet:
        return BasicUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
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
    conditioned_forward = staticmethod(segresnet_forward)

    @classmethod
    def init_filters(cls, width: float) -> int:
        return scale_channels(cls.reference_init_filters, width)

    @classmethod
    def build(
        cls, in_channels: int, out_channels: int, width: float, patch_size: Sequence[int] | None = None
    ) -> nn.Module:
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


@BACKBONES.register("attention-unet")
class AttentionUNetBackbone(Backbone):
    """MONAI AttentionUnet with the U-Net reference's down-path sizes (64, 64, 128, 256, 512), stride 2.

    The paper gives no size for it; matching the "unet" entry's five down-path stages channel for channel
    (full resolution 64, then 64, 128, 256, 512 at 1/2 .. 1/16) makes the two differ only in their blocks
    (AttentionUnet: batch-normalised ReLU conv blocks, attention gates on the skips, transposed-conv
    upsampling) rather than in size: 24.0 M parameters per network at width 1.0, against BasicUNet's 23.0 M;
    the encoders are the same size (14.3 M).
    """

    reference_channels: ClassVar[tuple[int, ...]] = (64, 64, 128, 256, 512)
    # The ConvBlock computing each stage: the head, then each level's strided block, nested one
    # AttentionLayer deeper per level; the bottom level's block is that layer's whole submodule.
    stages = (
        ("model.0",),
        ("model.1.submodule.0",),
        ("model.1.submodule.1.submodule.0",),
        ("model.1.submodule.1.submodule.1.submodule.0",),
        ("model.1.submodule.1.submodule.1.submodule.1.submodule",),
    )
    spatial_multiple = 16  # four stride-2 convolutions
    conditioned_forward = staticmethod(attention_unet_forward)

    @classmethod
    def channels(cls, width: float) -> tuple[int, ...]:
        return tuple(scale_channels(c, width) for c in cls.reference_channels)

    @classmethod
    def build(
        cls, in_channels: int, out_channels: int, width: float, patch_size: Sequence[int] | None = None
    ) -> nn.Module:
        channels = cls.channels(width)
        return AttentionUnet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
        )

    @classmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        return cls.channels(width)


SWIN_FEATURE_MULTIPLE = 12  # SwinUNETR requires it (heads 3, 6, 12, 24 over feature sizes 1, 2, 4, 8 x it)


@BACKBONES.register("swinunetr")
class SwinUNETRBackbone(Backbone):
    """MONAI SwinUNETR, feature size 48, gradient checkpointing in the Swin transformer.

    Its down path is the Swin transformer (patch embedding, then four stages, each halving the resolution)
    plus the residual encoder blocks that read its outputs. Conditioned stages, the outputs of:
    encoder1 (image, full resolution, F channels), encoder2 (patch embedding, 1/2, F), encoder3 (stage 1,
    1/4, 2F), encoder4 (stage 2, 1/8, 4F) and encoder10 (stage 4, 1/32, 16F). Stage 3's output (1/16, 8F)
    reaches the decoder directly, through no block of its own, and is not conditioned.
    The encoder keeps the transformer and those five blocks (`SwinUNETREncoder`).
    Width scales F = 48 to the nearest multiple of 12 (SwinUNETR's constraint), at least 12.
    """

    reference_feature_size: ClassVar[int] = 48
    stages = (("encoder1",), ("encoder2",), ("encoder3",), ("encoder4",), ("encoder10",))
    stage_multipliers: ClassVar[tuple[int, ...]] = (1, 1, 2, 4, 16)
    # Patch embedding and four merges: 2**5. Training also needs sides of at least 64, so that the
    # instance norm of encoder10 sees more than one voxel.
    spatial_multiple = 32
    conditioned_forward = staticmethod(swin_unetr_forward)

    @classmethod
    def feature_size(cls, width: float) -> int:
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        m = SWIN_FEATURE_MULTIPLE
        return max(m, round(cls.reference_feature_size * width / m) * m)

    @classmethod
    def build(
        cls, in_channels: int, out_channels: int, width: float, patch_size: Sequence[int] | None = None
    ) -> nn.Module:
        return SwinUNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=cls.feature_size(width),
            use_checkpoint=True,
            spatial_dims=3,
        )

    @classmethod
    def build_encoder(cls, image_channels: int, width: float, patch_size: Sequence[int] | None = None) -> nn.Module:
        return SwinUNETREncoder(cls.build(image_channels, 1, width, patch_size))

    @classmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        return tuple(m * cls.feature_size(width) for m in cls.stage_multipliers)


@BACKBONES.register("unetr")
class UNETRBackbone(Backbone):
    """MONAI UNETR with its default sizes (feature size 16, ViT-B: hidden 768, 12 heads, MLP 3072, 12 layers).

    UNETR's position embedding fixes the input size, so it is built for `patch_size` (the training patch,
    which is also the sliding-window size at inference) and takes inputs of that size only.
    Conditioned stages, the outputs of the four convolutional encoder blocks: encoder1 (image, full
    resolution, F), encoder2 (ViT layer 3, 1/2, 2F), encoder3 (layer 6, 1/4, 4F), encoder4 (layer 9, 1/8, 8F).
    The ViT's last output (1/16) is a token sequence reshaped inside UNETR.forward, not a module output, so
    it is not conditioned; the encoder keeps the ViT up to layer 9 and the four blocks (`UNETREncoder`).
    Width scales F = 16 like the other families and the ViT by its head count (round(12 x width), at
    least 1) at the reference 64 channels per head, hidden = 64 x heads, MLP = 4 x hidden.
    """

    reference_feature_size: ClassVar[int] = 16
    reference_heads: ClassVar[int] = 12
    head_dim: ClassVar[int] = 64
    stages = (("encoder1",), ("encoder2",), ("encoder3",), ("encoder4",))
    spatial_multiple = 16  # 16^3 ViT patches
    fixed_input_size = True
    conditioned_forward = staticmethod(unetr_forward)

    @classmethod
    def feature_size(cls, width: float) -> int:
        return scale_channels(cls.reference_feature_size, width)

    @classmethod
    def heads(cls, width: float) -> int:
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        return max(1, round(cls.reference_heads * width))

    @classmethod
    def build(
        cls, in_channels: int, out_channels: int, width: float, patch_size: Sequence[int] | None = None
    ) -> nn.Module:
        if patch_size is None:
            raise ValueError("unetr is built for one input size: give the patch size (NetworkConfig.patch_size)")
        hidden = cls.head_dim * cls.heads(width)
        network = UNETR(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=tuple(patch_size),
            feature_size=cls.feature_size(width),
            hidden_size=hidden,
            mlp_dim=4 * hidden,
            num_heads=cls.heads(width),
            spatial_dims=3,
        )
        # MONAI's TransformerBlock builds a LayerNorm for cross-attention even without cross-attention and
        # never runs it. Frozen, it is left out of DistributedDataParallel's gradient reduction (which
        # otherwise fails on parameters that get no gradient); the network and its state dict are unchanged.
        for block in network.vit.blocks:
            if not block.with_cross_attention:
                block.norm_cross_attn.requires_grad_(False)
        return network

    @classmethod
    def build_encoder(cls, image_channels: int, width: float, patch_size: Sequence[int] | None = None) -> nn.Module:
        return UNETREncoder(cls.build(image_channels, 1, width, patch_size))

    @classmethod
    def stage_channels(cls, width: float) -> tuple[int, ...]:
        f = cls.feature_size(width)
        return (f, 2 * f, 4 * f, 8 * f)


@BACKBONES.register("unet")
class MSSegDiffUNetBackbone(BasicUNetBackbone):
    """The paper's U-Net (`MSSegDiffUNetDenoiser`) with BasicUNet's down path as the image encoder.

    85.74 M parameters at width 1.0 (encoder 14.28 M, denoiser 71.46 M), the reference's count. Also built from
    any six feature sizes (NetworkConfig.features), as the reference takes them.
    """

    spatial_multiple = MSSEGDIFF_UNET_SPATIAL_MULTIPLE
    conditioning = "arguments"
    takes_features = True

    @classmethod
    def build_encoder(cls, image_channels: int, width: float, patch_size: Sequence[int] | None = None) -> nn.Module:
        return cls.encoder_with_features(image_channels, cls.features(width))

    @classmethod
    def build_denoiser(cls, in_channels: int, width: float, patch_size: Sequence[int] | None = None) -> nn.Module:
        return cls.denoiser_with_features(in_channels, cls.features(width))

    @classmethod
    def encoder_with_features(cls, image_channels: int, features: Sequence[int]) -> nn.Module:
        return DownPathEncoder.from_network(cls.basic_unet(image_channels, 1, features), cls.stages)

    @classmethod
    def denoiser_with_features(cls, in_channels: int, features: Sequence[int]) -> nn.Module:
        return MSSegDiffUNetDenoiser(in_channels, 1, features)


@BACKBONES.register("multiencoder")
class MultiEncoderBackbone(MSSegDiffUNetBackbone):
    """The paper's U-Net denoiser with one shared single-channel encoder for all modalities.

    The encoder is BasicUNet's down path with one input channel, applied to each image channel on its own;
    each stage's feature maps are summed over the channels (`ModalitySumEncoder`). Its size does not
    depend on the number of modalities: 85.73 M parameters at width 1.0.
    """

    @classmethod
    def encoder_with_features(cls, image_channels: int, features: Sequence[int]) -> nn.Module:
        return ModalitySumEncoder(super().encoder_with_features(1, features))


def spatial_multiple(backbone: str) -> int:
    """The number every input side must be a multiple of for this backbone."""
    return BACKBONES.get(backbone).spatial_multiple
