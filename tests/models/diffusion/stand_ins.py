"""Small denoisers standing in for the real network: net(image, noisy_mask, timesteps) -> x0 logits."""

from __future__ import annotations

import torch
from torch import nn


def oracle_logits(image: torch.Tensor) -> torch.Tensor:
    """The true x0 as logits: the sign comes from the mask in channel 0, the magnitude (10 + channel 1) varies by
    voxel."""
    return (2.0 * image[:, :1] - 1.0) * (10.0 + image[:, 1:2])


class OracleNet(nn.Module):
    """Knows the answer (it is written into the image) and ignores the noisy mask and the time step."""

    def forward(self, image: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return oracle_logits(image)


class RecordingNet(nn.Module):
    """A fixed function of all three inputs that keeps a copy of every call's inputs and output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, image: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        time = timesteps.to(noisy.dtype).view(-1, 1, 1, 1, 1)
        logits = 2.0 * noisy + image[:, :1] - 0.5 + 1e-3 * time
        self.calls.append((image.clone(), noisy.clone(), timesteps.clone(), logits.clone()))
        return logits


class TinyConvNet(nn.Module):
    """A trainable denoiser: one 3-D convolution over concat(image, noisy mask) plus a learned per-step bias."""

    def __init__(self, image_channels: int, timesteps: int = 1000) -> None:
        super().__init__()
        self.conv = nn.Conv3d(image_channels + 1, 1, kernel_size=3, padding=1)
        self.time_bias = nn.Embedding(timesteps, 1)

    def forward(self, image: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([image, noisy], dim=1)) + self.time_bias(timesteps).view(-1, 1, 1, 1, 1)


def image_with_mask(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,2,...) image for OracleNet: channel 0 the {0,1} mask (B,1,...), channel 1 a positive per-voxel magnitude."""
    magnitude = torch.rand(mask.shape, generator=generator) * 5.0
    return torch.cat([mask.float(), magnitude], dim=1)
