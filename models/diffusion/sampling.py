"""Deterministic DDIM sampling (eta = 0) that keeps every step's predicted x0, per window and for a whole scan.

The DDIM update is written here rather than taken from ``monai.networks.schedulers.DDIMScheduler.step``: that
method jumps from t to ``t - T // num_steps``, which is not the next step of the grid its own ``set_timesteps``
makes (999 -> 899 instead of 999 -> 888 for 10 steps; the same defect as diffusers issue #12633), so the network
would be told a noise level the sample does not have. MONAI's grid itself is used (``ddim_timesteps``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.utils import convert_to_tensor

from .schedule import DiffusionConfig, alphas_cumprod, ddim_timesteps, x0_from_logits
from .training import Denoiser, EncodingDenoiser


def ddim_update(
    noisy: torch.Tensor, predicted_x0: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """One DDIM step with eta = 0 (Song et al. 2021, eq. 12): x_t -> x_prev given the predicted x0.

    eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t);  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    """
    predicted_noise = (noisy - alpha_bar_t**0.5 * predicted_x0) / (1.0 - alpha_bar_t) ** 0.5
    return alpha_bar_prev**0.5 * predicted_x0 + (1.0 - alpha_bar_prev) ** 0.5 * predicted_noise


@torch.inference_mode()
def ddim_trajectory(
    net: Denoiser,
    image: torch.Tensor,
    num_steps: int,
    num_samples: int = 1,
    config: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Predicted-x0 logits at every DDIM step for ``num_samples`` chains per image: (B, num_steps, num_samples, X, Y, Z).

    ``image`` (B,C,X,Y,Z). Steps are ordered noisiest first (``ddim_timesteps``). The samples of all images run as one
    batch of B * num_samples per network call, and the outputs stay on the image's device. The initial noise comes
    from ``generator`` (which must live on the image's device), so the result is reproducible for a deterministic
    ``net``; put the net in eval mode first. ``autocast_dtype`` (e.g. torch.bfloat16) runs the net under autocast;
    the DDIM arithmetic and the returned logits stay float32. A ``net`` that is an ``EncodingDenoiser`` has its
    encoder run once per image, its features reused for every step and sample.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    timesteps = ddim_timesteps(num_steps, config)
    # Python floats: the step coefficients become kernel arguments, with no device tensor to index or copy.
    alpha_bar = alphas_cumprod(config).tolist()
    batch, spatial, device = image.shape[0], tuple(image.shape[2:]), image.device
    chains = batch * num_samples

    images = image.repeat_interleave(num_samples, dim=0)  # image b's samples are rows b*s .. b*s + s - 1
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    if isinstance(net, EncodingDenoiser):
        # The features depend on the image alone: encode each image once, not once per step and sample.
        with autocast:
            stage_features = [feature.repeat_interleave(num_samples, dim=0) for feature in net.encode(image)]

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net.denoise(images, noisy, t, stage_features)
    else:

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(images, noisy, t)

    noisy = torch.randn((chains, 1, *spatial), dtype=torch.float32, device=device, generator=generator)
    trajectory = torch.empty((batch, len(timesteps), num_samples, *spatial), dtype=torch.float32, device=device)
    for step, t in enumerate(timesteps):
        with autocast:
            logits = predict(noisy, torch.full((chains,), t, dtype=torch.long, device=device))
        if logits.shape != noisy.shape:
            raise ValueError(f"net must return x0 logits of shape {tuple(noisy.shape)}, got {tuple(logits.shape)}")
        logits = logits.float()
        trajectory[:, step] = logits.view(batch, num_samples, *spatial)
        if step + 1 < len(timesteps):
            noisy = ddim_update(noisy, x0_from_logits(logits), alpha_bar[t], alpha_bar[timesteps[step + 1]])
    return trajectory


@torch.inference_mode()
def sample_scan(
    net: Denoiser,
    image: torch.Tensor,
    num_steps: int,
    num_samples: int,
    roi_size: int | Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    config: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Every step's predicted-x0 logits for a whole scan ``image`` (C,X,Y,Z): (num_steps, num_samples, X, Y, Z).

    Windows of ``roi_size`` are sampled ``sw_batch_size`` at a time (each window with all its samples in one batch)
    and MONAI's sliding-window inference stitches all steps x samples as channels in a single pass, averaging
    overlaps with equal weights. The scan should be at least ``roi_size`` (pad first; MONAI would zero-pad it).
    Memory beyond the windows in flight: the float32 output and one scan-sized overlap count.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C,X,Y,Z), got shape {tuple(image.shape)}")

    def predict_windows(windows: torch.Tensor) -> torch.Tensor:
        steps = ddim_trajectory(net, windows, num_steps, num_samples, config, generator, autocast_dtype)
        return steps.flatten(1, 2)  # (windows, num_steps * num_samples, *roi): channel = step * s + sample

    # MONAI stitches in the input's dtype and would carry a MetaTensor's metadata through: give it plain float32.
    scan = convert_to_tensor(image, dtype=torch.float32, track_meta=False)[None]
    stitched = sliding_window_inference(scan, roi_size, sw_batch_size, predict_windows, overlap=overlap)
    return stitched[0].view(num_steps, num_samples, *image.shape[1:])
