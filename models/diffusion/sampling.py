"""Deterministic DDIM sampling (eta = 0) that keeps every step's predicted x0, per window and for a whole scan.

The DDIM update is written here rather than taken from ``monai.networks.schedulers.DDIMScheduler.step``: that
method jumps from t to ``t - T // num_steps``, which is not the next step of the grid its own ``set_timesteps``
makes (999 -> 899 instead of 999 -> 888 for 10 steps; the same defect as diffusers issue #12633), so the network
would be told a noise level the sample does not have. MONAI's grid itself is used (``ddim_timesteps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.utils import convert_to_tensor

from .schedule import DiffusionConfig, ddim_timesteps, x0_from_logits
from .training import Denoiser, EncodingDenoiser

X0Map = Callable[[torch.Tensor], torch.Tensor]
"""Logits -> the predicted clean mask in [-1, 1] that the DDIM update uses (an inference protocol's choice)."""


def _alpha_bars_float64(config: DiffusionConfig) -> list[float]:
    """alpha_bar_t as Python floats computed in float64, as guided-diffusion (the reference's sampler) does."""
    betas = torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).tolist()


def _float32(value: float) -> float:
    return float(np.float32(value))


def ddim_update(
    noisy: torch.Tensor, predicted_x0: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """One DDIM step with eta = 0 (Song et al. 2021, eq. 12): x_t -> x_prev given the predicted x0.

    eps = (x_t / sqrt(a_t) - x0) / sqrt(1 / a_t - 1);  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    Written as guided-diffusion computes it (the reference's sampler): the coefficients from float64 schedules
    rounded to float32, then the same float32 operations in the same order, so that a trajectory is the
    reference's to the last bit on the same machine. The coefficients are Python floats: kernel arguments,
    no device tensor to index or copy.
    """
    recip = _float32(math.sqrt(1.0 / alpha_bar_t))
    recip_minus_one = _float32(math.sqrt(1.0 / alpha_bar_t - 1.0))
    previous = torch.tensor(alpha_bar_prev, dtype=torch.float32)
    # torch's float32 square roots of float32 values, as the reference takes them (on the CPU they can differ
    # from the correctly rounded ones in the last bit).
    keep_x0, keep_noise = previous.sqrt().item(), (1.0 - previous).sqrt().item()
    predicted_noise = (recip * noisy - predicted_x0) / recip_minus_one
    return predicted_x0 * keep_x0 + keep_noise * predicted_noise


@torch.inference_mode()
def ddim_trajectory(
    net: Denoiser,
    image: torch.Tensor,
    num_steps: int,
    num_samples: int = 1,
    config: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    x0: X0Map = x0_from_logits,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted-x0 logits at every DDIM step for ``num_samples`` chains per image:
    (B, num_steps, num_samples, X, Y, Z).

    ``image`` (B,C,X,Y,Z). Steps are ordered noisiest first (``ddim_timesteps``). The samples of all images run as one
    batch of B * num_samples per network call, and the outputs stay on the image's device. The initial noise comes
    from ``generator`` (which must live on the image's device), so the result is reproducible for a deterministic
    ``net``; put the net in eval mode first. ``autocast_dtype`` (e.g. torch.bfloat16) runs the net under autocast;
    the DDIM arithmetic and the returned logits stay float32. A ``net`` that is an ``EncodingDenoiser`` has its
    encoder run once per image, its features reused for every step and sample. ``x0`` maps the logits to the
    clean-mask estimate the update uses (msx's ``2 sigmoid(l) - 1`` by default). ``noise`` (B * num_samples, 1,
    X, Y, Z), when given, is the starting x_T instead of a draw from ``generator``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    timesteps = ddim_timesteps(num_steps, config)
    # Python floats: the step coefficients become kernel arguments, with no device tensor to index or copy.
    alpha_bar = _alpha_bars_float64(config)
    batch, spatial, device = image.shape[0], tuple(image.shape[2:]), image.device
    chains = batch * num_samples
    if noise is not None and tuple(noise.shape) != (chains, 1, *spatial):
        raise ValueError(f"noise must be {(chains, 1, *spatial)} (one x_T per chain), got {tuple(noise.shape)}")

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

    if noise is None:
        noisy = torch.randn((chains, 1, *spatial), dtype=torch.float32, device=device, generator=generator)
    else:
        noisy = noise.to(device=device, dtype=torch.float32)
    trajectory = torch.empty((batch, len(timesteps), num_samples, *spatial), dtype=torch.float32, device=device)
    for step, t in enumerate(timesteps):
        with autocast:
            logits = predict(noisy, torch.full((chains,), t, dtype=torch.long, device=device))
        if logits.shape != noisy.shape:
            raise ValueError(f"net must return x0 logits of shape {tuple(noisy.shape)}, got {tuple(logits.shape)}")
        logits = logits.float()
        trajectory[:, step] = logits.view(batch, num_samples, *spatial)
        if step + 1 < len(timesteps):
            noisy = ddim_update(noisy, x0(logits), alpha_bar[t], alpha_bar[timesteps[step + 1]])
    return trajectory


WindowFusion = Callable[[torch.Tensor], torch.Tensor]
"""(windows, num_steps, num_samples, *roi) step logits -> (windows, channels, *roi) maps to stitch."""


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
    x0: X0Map = x0_from_logits,
    pad_windows: bool = False,
) -> torch.Tensor:
    """Every step's predicted-x0 logits for a whole scan ``image`` (C,X,Y,Z): (num_steps, num_samples, X, Y, Z).

    Windows of ``roi_size`` are sampled ``sw_batch_size`` at a time (each window with all its samples in one batch)
    and MONAI's sliding-window inference stitches all steps x samples as channels in a single pass, averaging
    overlaps with equal weights. The scan should be at least ``roi_size`` (pad first; MONAI would zero-pad it).
    Memory beyond the windows in flight: the float32 output and one scan-sized overlap count.
    """

    if image.ndim != 4:
        raise ValueError(f"image must be (C,X,Y,Z), got shape {tuple(image.shape)}")

    def all_steps(trajectories: torch.Tensor) -> torch.Tensor:
        return trajectories.flatten(1, 2)  # (windows, num_steps * num_samples, *roi): channel = step * s + sample

    stitched = sample_scan_fused(
        net, image, num_steps, num_samples, roi_size, all_steps, overlap, sw_batch_size, config, generator,
        autocast_dtype, x0, pad_windows,
    )
    return stitched.view(num_steps, num_samples, *image.shape[1:])


@torch.inference_mode()
def sample_scan_fused(
    net: Denoiser,
    image: torch.Tensor,
    num_steps: int,
    num_samples: int,
    roi_size: int | Sequence[int],
    fuse: WindowFusion,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    config: DiffusionConfig = DiffusionConfig(),
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    x0: X0Map = x0_from_logits,
    pad_windows: bool = False,
) -> torch.Tensor:
    """``sample_scan`` with each window's trajectories reduced by ``fuse`` before stitching: (channels, X, Y, Z).

    The reference protocol fuses its strategies window by window and stitches the fused maps; this does that
    from the same single sampling pass per window.

    ``image`` may also be a batch (B,C,X,Y,Z) of scans of one shape: MONAI then batches the windows of all of them
    together, and the result is (B, channels, X, Y, Z). ``pad_windows``: the last, smaller batch of windows is padded
    to ``sw_batch_size`` with blank windows (their noise zeros, their outputs dropped), so that every network call
    has the same shape and a compiled network (`compilation.compiled_denoiser`) is not recompiled for it. The real
    windows draw the same noise from ``generator`` as unpadded, and a network in eval mode treats every row on its
    own, so the result is the same.
    """
    if image.ndim not in (4, 5):
        raise ValueError(f"image must be (C,X,Y,Z) or (B,C,X,Y,Z), got shape {tuple(image.shape)}")

    def predict_windows(windows: torch.Tensor) -> torch.Tensor:
        count = windows.shape[0]
        if not pad_windows or count == sw_batch_size:
            return fuse(ddim_trajectory(net, windows, num_steps, num_samples, config, generator, autocast_dtype, x0))
        blank = sw_batch_size - count
        noise = torch.randn(
            (count * num_samples, 1, *windows.shape[2:]),
            dtype=torch.float32,
            device=windows.device,
            generator=generator,
        )
        windows = torch.cat([windows, windows.new_zeros((blank, *windows.shape[1:]))])
        noise = torch.cat([noise, noise.new_zeros((blank * num_samples, *noise.shape[1:]))])
        trajectory = ddim_trajectory(net, windows, num_steps, num_samples, config, None, autocast_dtype, x0, noise)
        return fuse(trajectory[:count])

    # MONAI stitches in the input's dtype and would carry a MetaTensor's metadata through: give it plain float32.
    scans = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
    if image.ndim == 4:
        scans = scans[None]
    stitched = sliding_window_inference(scans, roi_size, sw_batch_size, predict_windows, overlap=overlap)
    return stitched[0] if image.ndim == 4 else stitched
