from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from msx.models.diffusion import DiffusionConfig, add_noise, alphas_cumprod, betas, ddim_timesteps, x0_from_logits

T = 1000


def numpy_alphas_cumprod() -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def guided_diffusion_steps(num_timesteps: int, count: int) -> list[int]:
    """guided-diffusion's space_timesteps(num_timesteps, [count]) (one section), noisiest first."""
    stride = (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)}, reverse=True)


def test_betas_are_linear_from_1e4_to_002() -> None:
    values = betas(DiffusionConfig()).numpy()
    assert values.shape == (T,)
    assert values[0] == pytest.approx(1e-4, rel=1e-6)
    assert values[-1] == pytest.approx(0.02, rel=1e-6)
    assert values[500] == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-6)


@pytest.mark.parametrize("t", [0, 1, 499, 999])
def test_alphas_cumprod_matches_float64_numpy(t: int) -> None:
    assert alphas_cumprod(DiffusionConfig())[t].item() == pytest.approx(numpy_alphas_cumprod()[t], rel=1e-5)


def test_first_alpha_cumprod_by_hand() -> None:
    assert alphas_cumprod(DiffusionConfig())[0].item() == pytest.approx(0.9999, rel=1e-7)
    assert alphas_cumprod(DiffusionConfig())[1].item() == pytest.approx(0.9999 * (1 - (1e-4 + 0.0199 / 999)), rel=1e-6)


def test_schedule_is_monais() -> None:
    monai_scheduler = DDPMScheduler(num_train_timesteps=T, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(alphas_cumprod(DiffusionConfig()), monai_scheduler.alphas_cumprod)


def test_config_follows_its_fields() -> None:
    config = DiffusionConfig(timesteps=10, beta_start=0.1, beta_end=0.1)
    assert alphas_cumprod(config)[-1].item() == pytest.approx(0.9**10, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs", [{"timesteps": 0}, {"beta_start": 0.0}, {"beta_start": 0.03, "beta_end": 0.02}, {"beta_end": 1.0}]
)
def test_config_rejects_impossible_schedules(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DiffusionConfig(**kwargs)


def test_add_noise_without_noise_scales_each_element_by_its_own_step() -> None:
    clean = torch.tensor([1.0, -1.0, 1.0]).view(3, 1, 1, 1, 1).expand(3, 1, 2, 2, 2)
    t = torch.tensor([0, 500, 999])
    noisy = add_noise(clean, torch.zeros_like(clean), t, DiffusionConfig())
    expected = np.sqrt(numpy_alphas_cumprod()[[0, 500, 999]]) * np.array([1.0, -1.0, 1.0])
    np.testing.assert_allclose(noisy[:, 0, 0, 0, 0].numpy(), expected, rtol=1e-5)
    assert torch.all(noisy == noisy[:, :, :1, :1, :1])


@pytest.mark.parametrize("t", [100, 600])
def test_add_noise_has_the_forward_process_mean_and_variance(t: int) -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.where(torch.rand((2, 1, 40, 40, 40), generator=generator) < 0.3, 1.0, -1.0)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = add_noise(clean, noise, torch.full((2,), t), DiffusionConfig())
    alpha_bar = numpy_alphas_cumprod()[t]
    residual = (noisy - np.sqrt(alpha_bar) * clean).numpy()
    assert abs(residual.mean()) < 0.01
    assert residual.var() == pytest.approx(1.0 - alpha_bar, rel=0.02)
    lesion = noisy[clean > 0].numpy()
    assert lesion.mean() == pytest.approx(np.sqrt(alpha_bar), abs=0.02)


def test_ddim_timesteps_for_ten_steps() -> None:
    assert ddim_timesteps(10, DiffusionConfig()) == (999, 888, 777, 666, 555, 444, 333, 222, 111, 0)


@pytest.mark.parametrize("count", [2, 3, 7, 10, 50, 333, 1000])
def test_ddim_timesteps_are_guided_diffusions_respacing(count: int) -> None:
    steps = ddim_timesteps(count, DiffusionConfig())
    assert list(steps) == guided_diffusion_steps(T, count)
    assert len(set(steps)) == count and all(a > b for a, b in zip(steps, steps[1:], strict=False))


def test_one_ddim_step_starts_from_pure_noise_level() -> None:
    assert ddim_timesteps(1, DiffusionConfig()) == (999,)


@pytest.mark.parametrize("count", [0, 1001])
def test_ddim_timesteps_rejects_impossible_counts(count: int) -> None:
    with pytest.raises(ValueError):
        ddim_timesteps(count, DiffusionConfig())


def test_x0_from_logits_is_two_sigmoid_minus_one() -> None:
    logits = torch.tensor([-30.0, -2.0, 0.0, 0.5, 30.0])
    expected = 2.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64))) - 1.0
    np.testing.assert_allclose(x0_from_logits(logits).numpy(), expected, atol=1e-7)
