"""The MSSegDiff training objective: noise the mask at a uniform random step, predict the clean mask, score it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .schedule import DiffusionConfig, add_noise

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``net(image (B,C,X,Y,Z), noisy_mask (B,1,X,Y,Z), timesteps (B,) long) -> x0 logits (B,1,X,Y,Z)``."""


@runtime_checkable
class EncodingDenoiser(Protocol):
    """A denoiser whose image encoding can be computed once and reused: sampling then runs the encoder once per
    window instead of at every step for every sample. ``denoise(image, noisy, t, encode(image))`` must equal
    ``net(image, noisy, t)``, and ``encode`` must treat every image row on its own (so rows can be repeated)."""

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]: ...

    def denoise(
        self, image: torch.Tensor, noisy_mask: torch.Tensor, timesteps: torch.Tensor, stage_features: list[torch.Tensor]
    ) -> torch.Tensor: ...

# The reference's Dice smoothing (Diff-UNet's MONAI DiceLoss(sigmoid=True), added to numerator and denominator).
DICE_SMOOTHING = 1e-5


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms of the x0 loss; the paper weighs them equally."""

    dice: float = 1.0
    bce: float = 1.0
    mse: float = 1.0


def sigmoid_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI's DiceLoss(sigmoid=True), the reference's: 1 - soft Dice per sample and channel, then the mean.

    Written out because MONAI's DiceLoss reads its reduction axes back from a tensor (`.tolist()`), which
    `torch.compile` cannot trace: the training step would break into several graphs there.
    """
    probabilities = torch.sigmoid(logits)
    spatial = tuple(range(2, logits.ndim))
    overlap = (probabilities * target).sum(spatial)
    total = probabilities.sum(spatial) + target.sum(spatial)
    return (1.0 - (2.0 * overlap + DICE_SMOOTHING) / (total + DICE_SMOOTHING)).mean()


LOSS_TERMS = ("dice", "bce", "mse")


def x0_loss_terms(logits: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three unweighted terms of the x0 loss (`LOSS_TERMS`): Dice(sigmoid), BCE with logits and
    MSE(sigmoid(logits), mask); ``mask`` in {0, 1}, like ``logits``."""
    # The terms are computed in float32 whatever autocast produced: sigmoid and the Dice ratio are fragile in bf16.
    logits = logits.float()
    target = mask.to(logits.dtype)
    return {
        "dice": sigmoid_dice_loss(logits, target),
        "bce": F.binary_cross_entropy_with_logits(logits, target),
        "mse": F.mse_loss(torch.sigmoid(logits), target),
    }


def weighted_loss(terms: dict[str, torch.Tensor], weights: LossWeights = LossWeights()) -> torch.Tensor:
    """The loss from its terms: Dice, BCE and MSE weighted and summed in that order."""
    return weights.dice * terms["dice"] + weights.bce * terms["bce"] + weights.mse * terms["mse"]


def x0_loss(logits: torch.Tensor, mask: torch.Tensor, weights: LossWeights = LossWeights()) -> torch.Tensor:
    """Dice(sigmoid) + BCE-with-logits + MSE(sigmoid(logits), mask), weighted; ``mask`` in {0, 1}, like ``logits``."""
    return weighted_loss(x0_loss_terms(logits, mask), weights)


def diffusion_loss_terms(
    net: Denoiser,
    image: torch.Tensor,
    mask: torch.Tensor,
    config: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """`diffusion_loss`'s terms, unweighted (`x0_loss_terms`). ``timesteps`` (B,) and ``noise`` (like ``mask``),
    when given, are used instead of drawn (the fidelity check replays the reference's draws)."""
    if mask.ndim != image.ndim or mask.shape[0] != image.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B,1,...) matching image {tuple(image.shape)}, got {tuple(mask.shape)}")
    clean = 2.0 * mask.float() - 1.0
    t = timesteps
    if t is None:
        t = torch.randint(0, config.timesteps, (clean.shape[0],), device=clean.device, generator=generator)
    if noise is None:
        noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device, generator=generator)
    logits = net(image, add_noise(clean, noise, t, config), t)
    return x0_loss_terms(logits, mask)


def diffusion_loss(
    net: Denoiser,
    image: torch.Tensor,
    mask: torch.Tensor,
    config: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    weights: LossWeights = LossWeights(),
) -> torch.Tensor:
    """One training loss: t ~ U{0..T-1} per batch element, x_t = q(x_t | 2 * mask - 1), loss of net's x0 logits.

    ``image`` (B,C,X,Y,Z), ``mask`` (B,1,X,Y,Z) in {0, 1}. Random numbers are drawn on the mask's device (a given
    ``generator`` must live there), and nothing waits for the device, so the step can run ahead of the host.
    """
    return weighted_loss(diffusion_loss_terms(net, image, mask, config, generator), weights)
