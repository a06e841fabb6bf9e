from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from msx.models.diffusion import (
    LOSS_TERMS,
    DiffusionConfig,
    LossWeights,
    alphas_cumprod,
    diffusion_loss,
    diffusion_loss_terms,
    weighted_loss,
    x0_loss,
)
from msx.models.diffusion.training import sigmoid_dice_loss

from .stand_ins import OracleNet, RecordingNet, TinyConvNet, image_with_mask, oracle_logits


def random_mask(shape: tuple[int, ...], generator: torch.Generator, fraction: float = 0.3) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) < fraction).float()


def test_loss_of_a_constant_prediction_by_hand() -> None:
    mask = torch.zeros((2, 1, 3, 3, 3))
    mask.view(2, -1)[0, :5] = 1.0
    mask.view(2, -1)[1, 3:15] = 1.0
    c = 0.7
    weights = LossWeights(dice=2.0, bce=0.5, mse=3.0)

    loss = diffusion_loss(lambda image, noisy, t: torch.full_like(noisy, c), mask, mask, weights=weights)

    p = 1.0 / (1.0 + np.exp(-c))
    m = mask.numpy().reshape(2, -1).astype(np.float64)
    dice = np.mean([1.0 - (2 * p * n + 1e-5) / (p * 27 + n + 1e-5) for n in m.sum(axis=1)])
    bce = np.mean(-(m * np.log(p) + (1 - m) * np.log(1 - p)))
    mse = np.mean((p - m) ** 2)
    assert loss.item() == pytest.approx(2.0 * dice + 0.5 * bce + 3.0 * mse, rel=1e-5)


def test_dice_term_is_monais_dice_loss_with_sigmoid() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn((3, 1, 8, 8, 8), generator=generator)
    mask = random_mask((3, 1, 8, 8, 8), generator)
    mask[1] = 0.0  # an empty mask too: the smoothing decides its score
    expected = DiceLoss(sigmoid=True)(logits, mask)
    torch.testing.assert_close(sigmoid_dice_loss(logits, mask), expected, rtol=1e-6, atol=1e-7)


def test_oracle_has_almost_no_loss_and_its_opposite_a_large_one() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = random_mask((2, 1, 6, 6, 6), generator)
    image = image_with_mask(mask, generator)

    oracle = diffusion_loss(OracleNet(), image, mask, generator=generator)
    opposite = diffusion_loss(lambda image, noisy, t: -oracle_logits(image), image, mask, generator=generator)

    assert oracle.ndim == 0
    assert 0.0 <= oracle.item() < 1e-3
    assert opposite.item() > 10.0  # Dice ~1 + BCE >= 10 + MSE ~1


def test_net_sees_the_mask_noised_at_uniform_steps() -> None:
    batch = 2048
    generator = torch.Generator().manual_seed(1)
    mask = random_mask((batch, 1, 2, 2, 2), generator)
    net = RecordingNet()

    diffusion_loss(net, torch.zeros((batch, 1, 2, 2, 2)), mask, generator=generator)

    (_, noisy, t, _), = net.calls
    assert t.dtype == torch.long and t.shape == (batch,)
    assert t.min().item() >= 0 and t.max().item() <= 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=3 * 288.7 / np.sqrt(batch))
    assert len(torch.unique(t)) > 800

    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[t.numpy()].reshape(-1, 1, 1, 1, 1)
    noise = (noisy.numpy() - np.sqrt(alpha_bar) * (2 * mask.numpy() - 1)) / np.sqrt(1 - alpha_bar)
    assert abs(noise.mean()) < 0.03
    assert noise.std() == pytest.approx(1.0, abs=0.03)


def test_uses_the_configured_number_of_steps() -> None:
    net = RecordingNet()
    diffusion_loss(net, torch.zeros((256, 1, 1, 1, 1)), torch.ones((256, 1, 1, 1, 1)), DiffusionConfig(timesteps=5))
    assert set(net.calls[0][2].tolist()) == {0, 1, 2, 3, 4}


def test_loss_is_reproducible_with_a_seeded_generator() -> None:
    mask = random_mask((2, 1, 4, 4, 4), torch.Generator().manual_seed(2))
    net = RecordingNet()
    first = diffusion_loss(net, mask, mask, generator=torch.Generator().manual_seed(3))
    again = diffusion_loss(net, mask, mask, generator=torch.Generator().manual_seed(3))
    other = diffusion_loss(net, mask, mask, generator=torch.Generator().manual_seed(4))
    assert first.item() == again.item() and first.item() != other.item()


def test_loss_backpropagates_into_the_net() -> None:
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    net = TinyConvNet(image_channels=2)
    mask = random_mask((2, 1, 5, 5, 5), generator)
    loss = diffusion_loss(net, image_with_mask(mask, generator), mask, generator=generator)
    loss.backward()
    for parameter in (net.conv.weight, net.conv.bias):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    assert net.time_bias.weight.grad.abs().sum() > 0


def test_x0_loss_accepts_bf16_logits_and_bool_masks() -> None:
    mask = torch.zeros((1, 1, 2, 2, 2), dtype=torch.bool)
    mask[0, 0, 0] = True
    logits = torch.where(mask, 3.0, -3.0)
    reference = x0_loss(logits, mask.float())
    assert x0_loss(logits.bfloat16(), mask).item() == pytest.approx(reference.item(), rel=1e-6)


def test_rejects_a_mask_that_is_not_one_channel() -> None:
    with pytest.raises(ValueError):
        diffusion_loss(OracleNet(), torch.zeros((1, 2, 2, 2, 2)), torch.zeros((1, 2, 2, 2, 2)))


def test_loss_terms_with_given_steps_and_noise_are_the_loss_of_that_draw() -> None:
    generator = torch.Generator().manual_seed(6)
    mask = random_mask((2, 1, 4, 4, 4), generator)
    net = RecordingNet()
    diffusion_loss(net, mask, mask, generator=torch.Generator().manual_seed(7))
    (_, noisy, t, _), = net.calls
    alpha_bar = alphas_cumprod(DiffusionConfig())[t].view(-1, 1, 1, 1, 1)
    noise = (noisy - alpha_bar.sqrt() * (2 * mask - 1)) / (1 - alpha_bar).sqrt()  # the draw, recovered

    weights = LossWeights(dice=2.0, bce=0.5, mse=3.0)
    terms = diffusion_loss_terms(net, mask, mask, timesteps=t, noise=noise)
    assert set(terms) == set(LOSS_TERMS) == {"dice", "bce", "mse"}
    torch.testing.assert_close(net.calls[1][1], noisy, rtol=0, atol=1e-6)
    assert torch.equal(net.calls[1][2], t)
    logits = net.calls[1][3]
    torch.testing.assert_close(weighted_loss(terms, weights), x0_loss(logits, mask, weights), rtol=0, atol=0)
    assert terms["dice"].item() == pytest.approx(sigmoid_dice_loss(logits, mask).item(), rel=1e-7)
    drawn = diffusion_loss(net, mask, mask, generator=torch.Generator().manual_seed(7), weights=weights)
    assert weighted_loss(terms, weights).item() == pytest.approx(drawn.item(), rel=1e-5)
