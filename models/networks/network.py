"""The MSSegDiff network: an image encoder conditioning a denoiser of the same backbone family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones import BACKBONES, scale_channels
from .conditioning import TimestepEmbedding

REFERENCE_TIME_EMBEDDING_DIM = 512


@dataclass(frozen=True)
class NetworkConfig:
    """Which backbone, how many image channels, and `width` times the reference feature sizes.

    `patch_size` is the input size (X, Y, Z) for a backbone built for one size ("unetr"), where it is
    required; other backbones take any size that is a multiple of their `spatial_multiple` and ignore it.
    `features`, for a family that takes them ("unet", "multiencoder"), are six explicit feature sizes as
    BasicUNet takes them (five down stages, the last up stage), used instead of `width` x the reference's.
    """

    backbone: str = "unet"
    image_channels: int = 3
    width: float = 1.0
    patch_size: tuple[int, int, int] | None = None
    features: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        backbone = BACKBONES.get(self.backbone)  # an unknown name fails here, listing the registered ones
        if self.image_channels < 1:
            raise ValueError(f"image_channels must be at least 1, got {self.image_channels}")
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.patch_size is not None:
            size = tuple(self.patch_size)  # a list read back from JSON becomes the tuple it was
            if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
                raise ValueError(f"patch_size must be three positive integers, got {self.patch_size!r}")
            if any(s % backbone.spatial_multiple for s in size):
                raise ValueError(
                    f"{self.backbone} needs every patch side to be a multiple of {backbone.spatial_multiple}, "
                    f"got {size}"
                )
            object.__setattr__(self, "patch_size", size)
        elif backbone.fixed_input_size:
            raise ValueError(
                f"{self.backbone} is built for one input size: set patch_size to the training patch size"
            )
        if self.features is not None:
            if not backbone.takes_features:
                takers = ", ".join(name for name in BACKBONES.names() if BACKBONES.get(name).takes_features)
                raise ValueError(f"{self.backbone} is sized by width only; explicit features suit: {takers}")
            features = tuple(self.features)
            if len(features) != 6 or not all(
                isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in features
            ):
                raise ValueError(f"features must be six positive integers, got {self.features!r}")
            object.__setattr__(self, "features", features)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; unset optional fields are left out (as before they existed)."""
        record = dataclasses.asdict(self)
        for name in ("patch_size", "features"):
            if record[name] is None:
                del record[name]
            else:
                record[name] = list(record[name])
        return record


class DiffusionSegmentationNet(nn.Module):
    """Predicts the logits of the clean mask x0 from the image, the noisy mask x_t and the time step t.

    The encoder runs the backbone's down path on the image; the denoiser, a network of the same family, takes
    concat(image, x_t), the time step and the encoder's stage features. A backbone conditioned by "arguments"
    (the paper's U-Net) builds a denoiser that takes them in its forward. For one conditioned by "additions" (a
    MONAI network used as it is) the denoiser is the complete network, run by the family's
    `conditioned_forward`: at every down-path stage its feature map gets the encoder's feature map of that
    stage plus a per-stage projection of the time embedding added to it. Either way every input reaches the
    networks as an argument, so `torch.compile` traces the whole forward as one graph.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        backbone = BACKBONES.get(config.backbone)
        self.config = config
        self.spatial_multiple = backbone.spatial_multiple
        self.fixed_input_size = config.patch_size if backbone.fixed_input_size else None
        self.conditioned_by_arguments = backbone.conditioning == "arguments"
        if config.features is not None:  # only families conditioned by arguments take them (NetworkConfig)
            self.encoder = backbone.encoder_with_features(config.image_channels, config.features)
            self.denoiser = backbone.denoiser_with_features(config.image_channels + 1, config.features)
            return
        self.encoder = backbone.build_encoder(config.image_channels, config.width, config.patch_size)
        if self.conditioned_by_arguments:
            self.denoiser = backbone.build_denoiser(config.image_channels + 1, config.width, config.patch_size)
            return
        self.denoiser = backbone.build(config.image_channels + 1, 1, config.width, config.patch_size)
        time_dim = scale_channels(REFERENCE_TIME_EMBEDDING_DIM, config.width)
        self.time_embedding = TimestepEmbedding(time_dim)
        self.time_projections = nn.ModuleList(nn.Linear(time_dim, c) for c in backbone.stage_channels(config.width))
        self.conditioned_forward = backbone.conditioned_forward

    def forward(self, image: torch.Tensor, noisy_mask: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """image (B, C, X, Y, Z), noisy_mask (B, 1, X, Y, Z), timesteps (B,) -> x0 logits (B, 1, X, Y, Z)."""
        self._check_inputs(image, noisy_mask, timesteps)
        return self._denoise(image, noisy_mask, timesteps, self.encoder(image))

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's stage features of image (B, C, X, Y, Z).

        They depend on the image alone, not on the noisy mask or the time step, so sampling computes them once
        per window and passes them to `denoise` at every step and for every sample.
        """
        self._check_image(image)
        return self.encoder(image)

    def denoise(
        self,
        image: torch.Tensor,
        noisy_mask: torch.Tensor,
        timesteps: torch.Tensor,
        stage_features: list[torch.Tensor],
    ) -> torch.Tensor:
        """`forward` with the encoder's output given: `stage_features` must be `encode(image)`, row for row."""
        self._check_inputs(image, noisy_mask, timesteps)
        if any(feature.shape[0] != image.shape[0] for feature in stage_features):
            raise ValueError(f"stage_features must have one row per image ({image.shape[0]})")
        return self._denoise(image, noisy_mask, timesteps, stage_features)

    def _denoise(
        self,
        image: torch.Tensor,
        noisy_mask: torch.Tensor,
        timesteps: torch.Tensor,
        stage_features: list[torch.Tensor],
    ) -> torch.Tensor:
        if self.conditioned_by_arguments:
            return self.denoiser(torch.cat([image, noisy_mask], dim=1), timesteps, stage_features)
        time = self.time_embedding(timesteps)
        additions = [
            feature + project(time)[:, :, None, None, None]
            for feature, project in zip(stage_features, self.time_projections, strict=True)
        ]
        return self.conditioned_forward(self.denoiser, torch.cat([image, noisy_mask], dim=1), additions)

    def _check_inputs(self, image: torch.Tensor, noisy_mask: torch.Tensor, timesteps: torch.Tensor) -> None:
        self._check_image(image)
        expected_mask = (image.shape[0], 1, *image.shape[2:])
        if noisy_mask.shape != expected_mask:
            raise ValueError(f"noisy_mask must be {expected_mask}, got {tuple(noisy_mask.shape)}")
        if timesteps.shape != image.shape[:1]:
            raise ValueError(f"timesteps must be ({image.shape[0]},), got {tuple(timesteps.shape)}")

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 5 or image.shape[1] != self.config.image_channels:
            raise ValueError(f"image must be (B, {self.config.image_channels}, X, Y, Z), got {tuple(image.shape)}")
        if any(side % self.spatial_multiple for side in image.shape[2:]):
            raise ValueError(
                f"{self.config.backbone} needs every spatial side to be a multiple of {self.spatial_multiple}, "
                f"got {tuple(image.shape[2:])}"
            )
        if self.fixed_input_size is not None and tuple(image.shape[2:]) != self.fixed_input_size:
            raise ValueError(
                f"{self.config.backbone} is built for inputs of size {self.fixed_input_size} (its patch_size), "
                f"got {tuple(image.shape[2:])}"
            )


def build_network(config: NetworkConfig) -> DiffusionSegmentationNet:
    """A freshly initialised network for `config`."""
    return DiffusionSegmentationNet(config)
