"""Diffusion for MSSegDiff: the forward process, the x0 training loss and DDIM sampling that keeps every step."""

from .sampling import X0Map, ddim_trajectory, ddim_update, sample_scan, sample_scan_fused
from .schedule import DiffusionConfig, add_noise, alphas_cumprod, betas, ddim_timesteps, x0_from_logits
from .training import Denoiser, EncodingDenoiser, LossWeights, diffusion_loss, x0_loss

__all__ = [
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
    "sample_scan",
    "sample_scan_fused",
    "x0_from_logits",
    "x0_loss",
]
