"""Diffusion for MSSegDiff: the forward process, the x0 training loss and DDIM sampling that keeps every step."""

from .sampling import X0Map, ddim_trajectory, ddim_update, sample_scan, sample_scan_fused
from .schedule import DiffusionConfig, add_noise, alphas_cumprod, betas, ddim_timesteps, x0_from_logits
from .training import (
    LOSS_TERMS,
    Denoiser,
    EncodingDenoiser,
    LossWeights,
    diffusion_loss,
    diffusion_loss_terms,
    weighted_loss,
    x0_loss,
    x0_loss_terms,
)

__all__ = [
    "LOSS_TERMS",
    "X0Map",
    "Denoiser",
    "DiffusionConfig",
    "EncodingDenoiser",
    "LossWeights",
    "add_noise",
    "alphas_cumprod",
    "betas",
    "ddim_timesteps",
    "ddim_trajectory",
    "ddim_update",
    "diffusion_loss",
    "diffusion_loss_terms",
    "sample_scan",
    "sample_scan_fused",
    "x0_from_logits",
    "weighted_loss",
    "x0_loss",
    "x0_loss_terms",
]
