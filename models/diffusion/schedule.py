"""The forward (noising) process of MSSegDiff: linear betas over T steps on masks in {-1, +1}.

The schedule is MONAI's ``linear_beta`` (the one ``DDPMScheduler``/``DDIMScheduler`` build, checked equal in the
tests), but it is computed here on the caller's device rather than read from a MONAI scheduler instance: the
scheduler keeps its schedule on the CPU, so every training step would copy it to the GPU (a blocking
host-to-device copy), and ``Scheduler.add_noise`` casts its stored schedule in place to the sample's dtype, which
under bf16 would permanently lose precision in a shared instance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDIMScheduler


@dataclass(frozen=True)
class DiffusionConfig:
    """Forward-process settings; the defaults are the paper's (T = 1000, betas linear from 1e-4 to 0.02)."""

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )


def betas(config: DiffusionConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-step noise variances beta_t, t = 0..T-1, float32 (same values as MONAI's ``linear_beta``)."""
    return torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float32, device=device)


def alphas_cumprod(config: DiffusionConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """alpha_bar_t = prod_{k<=t} (1 - beta_k), t = 0..T-1, float32;
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
    return torch.cumprod(1.0 - betas(config, device), dim=0)


def add_noise(
    clean_pm1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, config: DiffusionConfig
) -> torch.Tensor:
    """Sample x_t from q(x_t | x_0): ``clean_pm1`` (B, ...) in {-1, +1}, ``noise`` like it, ``t`` (B,) long."""
    alpha_bar = alphas_cumprod(config, clean_pm1.device)[t].view(-1, *([1] * (clean_pm1.ndim - 1)))
    return alpha_bar.sqrt() * clean_pm1 + (1.0 - alpha_bar).sqrt() * noise


def ddim_timesteps(num_steps: int, config: DiffusionConfig) -> tuple[int, ...]:
    """The respaced DDIM time steps, noisiest first: ``round(linspace(T - 1, 0, num_steps))``.

    For T = 1000 and 10 steps: 999, 888, ..., 111, 0. This is MONAI's ``DDIMScheduler.set_timesteps`` grid and the
    same set that guided-diffusion's ``space_timesteps(T, [num_steps])`` (used by Diff-UNet and the MSSegDiff
    reference) picks. The steps are distinct for any ``1 <= num_steps <= T``.
    """
    if not 1 <= num_steps <= config.timesteps:
        raise ValueError(f"num_steps must be in [1, {config.timesteps}], got {num_steps}")
    scheduler = DDIMScheduler(
        num_train_timesteps=config.timesteps,
        schedule="linear_beta",
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type="sample",
    )
    scheduler.set_timesteps(num_steps)
    return tuple(scheduler.timesteps.tolist())


def x0_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The predicted clean mask in [-1, 1] from the network's logits: 2 * sigmoid(logits) - 1."""
    # tanh(l / 2) == 2 * sigmoid(l) - 1 exactly, in one kernel instead of three.
    return torch.tanh(0.5 * logits)
