"""The inference protocols: the reference code's way (clamped x0, one-chain strategies, its STAPLE, fusion per
window) against msx's. test_fidelity.py holds the reference's own numbers; these pin each rule on its own."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from msx.models.data.transforms import prepare_scan_for_inference
from msx.models.diffusion import ddim_trajectory, ddim_update, sample_scan_fused, x0_from_logits
from msx.models.diffusion.sampling import _alpha_bars_float64
from msx.models.diffusion.schedule import DiffusionConfig
from msx.models.engine import InferenceConfig, segment_scan
from msx.models.protocols import MSX, PROTOCOLS, REFERENCE, clamped_x0, reference_staple
from msx.models.registry import UnknownNameError
from msx.models.strategies import STRATEGIES

from .diffusion.stand_ins import RecordingNet

ONE_CHAIN = ("last", "mean", "mean-var", "staple", "majority")


def random_logits(seed: int, steps: int = 6, chains: int = 3, shape=(4, 5, 3)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn((steps, chains, *shape), generator=generator)


def test_the_registry_holds_both_protocols_and_lists_them_on_a_miss():
    assert PROTOCOLS.names() == ("msx", "reference")
    with pytest.raises(UnknownNameError, match="valid names: msx, reference"):
        PROTOCOLS.get("paper")
    with pytest.raises(UnknownNameError, match="valid names: last"):
        REFERENCE.scores(random_logits(0), ["mean", "median"])


def test_reference_x0_is_the_clamped_logits_and_msx_the_sigmoid_map():
    logits = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 7.0])
    assert clamped_x0(logits).tolist() == [-1.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.0]
    torch.testing.assert_close(MSX.x0(logits), 2 * torch.sigmoid(logits) - 1)


@pytest.mark.parametrize("protocol", [REFERENCE, MSX])
def test_the_ddim_update_uses_the_protocols_x0(protocol):
    net = RecordingNet()
    image = torch.rand((1, 1, 3, 3, 3), generator=torch.Generator().manual_seed(1))
    ddim_trajectory(net, image, num_steps=3, num_samples=2, generator=torch.Generator().manual_seed(2), x0=protocol.x0)
    (_, x_first, _, logits_first), (_, x_second, _, _) = net.calls[:2]
    alpha_bar = _alpha_bars_float64(DiffusionConfig())
    expected = ddim_update(x_first, protocol.x0(logits_first), alpha_bar[999], alpha_bar[500])
    torch.testing.assert_close(x_second, expected, rtol=0, atol=0)
    other = MSX if protocol is REFERENCE else REFERENCE
    assert not torch.allclose(x_second, ddim_update(x_first, other.x0(logits_first), alpha_bar[999], alpha_bar[500]))


def test_the_reference_reads_one_chain_for_all_but_uncertainty():
    logits = random_logits(3)
    changed = logits.clone()
    changed[:, 1:] = random_logits(4)[:, 1:]
    for name in STRATEGIES.names():
        same = torch.equal(REFERENCE.strategy(name)(logits), REFERENCE.strategy(name)(changed))
        assert same == (name in ONE_CHAIN), name
        assert not torch.equal(MSX.strategy(name)(logits), MSX.strategy(name)(changed)), name


def test_reference_strategies_by_hand():
    logits = random_logits(5)
    x0 = logits.clamp(-1, 1)
    first = x0[:, 0]
    torch.testing.assert_close(REFERENCE.strategy("last")(logits), first[-1])
    torch.testing.assert_close(REFERENCE.strategy("mean")(logits), first.mean(0))
    torch.testing.assert_close(REFERENCE.strategy("mean-var")(logits), first.mean(0) - first.var(0, correction=1))
    steps = logits.shape[0]
    expected = torch.zeros(logits.shape[2:])
    for i in range(steps):  # as the reference: per step, the chains' mean logits weigh every chain's x0
        confidence = torch.sigmoid(logits[i].mean(0)).clamp_min(1e-3)
        weight = torch.exp(torch.sigmoid(torch.tensor((i + 1) / steps)) * (1 + confidence * torch.log(confidence)))
        expected += (weight * x0[i]).sum(0)
    torch.testing.assert_close(REFERENCE.strategy("uncertainty")(logits), expected, rtol=1e-5, atol=1e-5)


def sitk_staple_of_int16_steps(x0_steps: np.ndarray) -> np.ndarray:
    """What the reference runs: each step's x0 cast to int16, SimpleITK's STAPLE with foreground value 1."""
    images = [sitk.GetImageFromArray(step.astype(np.int16)) for step in x0_steps]
    return sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0))


def test_reference_staple_is_simpleitks_on_int16_cast_steps():
    logits = random_logits(6, steps=10, chains=1, shape=(6, 5, 4))
    posterior = reference_staple(logits)
    expected = sitk_staple_of_int16_steps(logits[:, 0].clamp(-1, 1).numpy())
    np.testing.assert_allclose(posterior.numpy(), expected, rtol=0, atol=1e-6)
    # Only x0 == 1 (logits >= 1) votes: logits of 0.9 everywhere are no vote at all, so SimpleITK gives NaN.
    assert torch.isnan(reference_staple(torch.full((10, 1, 2, 2, 2), 0.9))).all()
    assert np.isnan(sitk_staple_of_int16_steps(np.full((10, 2, 2, 2), 0.9, np.float32))).all()


def test_reference_staple_calls_lesion_where_the_float32_sigmoid_of_the_posterior_exceeds_half_and_msx_half():
    # Ten steps that agree on a lesion (the first half of the volume) but for 5% of each step's votes flipped.
    generator = torch.Generator().manual_seed(0)
    truth = torch.arange(8).view(8, 1, 1).expand(8, 8, 8) < 4
    votes = truth ^ (torch.rand((10, 1, 8, 8, 8), generator=generator) < 0.05)
    logits = torch.where(votes, 3.0, -3.0)
    posterior = reference_staple(logits)
    lesion = REFERENCE.mask(REFERENCE.strategy("staple")(logits))
    assert torch.equal(lesion, torch.sigmoid(posterior.float()) > 0.5)
    doubtful = (posterior > 1e-6) & (posterior < 0.5)
    assert doubtful.any() and lesion[doubtful].all()  # lesion under the reference's rule, background under msx's
    # A voxel no step voted for keeps a tiny positive posterior: lesion under "> 0", background under the reference.
    unvoted = ~votes.any(dim=(0, 1))
    assert unvoted.any() and (posterior[unvoted] > 0).all() and (posterior[unvoted] < 1e-12).all()
    assert not lesion[unvoted].any()
    # msx: STAPLE over the steps' x0 > 0 masks, lesion where the posterior is >= 0.5.
    from msx.models.strategies import staple

    msx_posterior = staple(logits[:, 0] > 0)
    assert torch.equal(MSX.strategy("staple")(logits) > 0, msx_posterior >= 0.5)


def test_window_fusion_stitches_each_windows_fused_maps_with_equal_weights():
    image = torch.zeros((1, 8, 8, 12))
    calls = []

    def fuse(trajectories: torch.Tensor) -> torch.Tensor:
        calls.append(trajectories.shape)
        return torch.full((trajectories.shape[0], 2, *trajectories.shape[3:]), float(len(calls)))

    stitched = sample_scan_fused(
        RecordingNet(), image, num_steps=2, num_samples=3, roi_size=(8, 8, 8), fuse=fuse, overlap=0.5, sw_batch_size=1,
    )
    # Windows at z = 0 and z = 4 (interval 4): the first alone below 4, both from 4 to 7, the second from 8.
    assert calls == [(1, 2, 3, 8, 8, 8)] * 2 and stitched.shape == (2, 8, 8, 12)
    assert stitched[..., :4].eq(1).all() and stitched[..., 4:8].eq(1.5).all() and stitched[..., 8:].eq(2).all()


class StepDependentNet(torch.nn.Module):
    """Deterministic logits from the image and the time step (not x_t): the steps disagree near the edge."""

    def forward(self, image: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return 4.0 * image[:, :1] + (timesteps.float() / 999.0 - 0.5).view(-1, 1, 1, 1, 1) * 4.0 * image[:, 1:2]


def test_segment_scan_under_the_reference_fuses_each_window_before_stitching():
    rng = np.random.default_rng(7)
    image = rng.uniform(1.0, 2.0, (2, 8, 8, 12)).astype(np.float32)  # no background: nothing is cropped
    # Channel 0 high below z = 4 only: there the steps vote lesion (logits >= 1); the second window (z from 4)
    # gets no vote at all, which SimpleITK's STAPLE answers with NaN, background once stitched.
    image[0] = np.where(np.arange(12) < 4, 2.0, 1.0)
    config = InferenceConfig(ddim_steps=4, samples=2, roi_size=(8, 8, 8), overlap=0.5, sw_batch_size=1,
                             strategies=tuple(STRATEGIES.names()), protocol="reference")
    masks = segment_scan(StepDependentNet(), image, config, torch.device("cpu"))

    prepared, _ = prepare_scan_for_inference(image, config.roi_size)
    windows = [prepared[None, :, :, :, :8], prepared[None, :, :, :, 4:]]
    timesteps = torch.tensor([999, 666, 333, 0])
    for name in STRATEGIES.names():
        per_window = []
        for window in windows:
            logits = torch.stack([StepDependentNet()(window, window[:, :1], t.view(1))[0, 0] for t in timesteps])
            per_window.append(REFERENCE.strategy(name)(logits[:, None].expand(-1, 2, -1, -1, -1)).float())
        expected = torch.zeros((8, 8, 12))
        expected[..., :4] = per_window[0][..., :4]
        expected[..., 4:8] = (per_window[0][..., 4:] + per_window[1][..., :4]) / 2
        expected[..., 8:] = per_window[1][..., 4:]
        np.testing.assert_array_equal(masks[name], REFERENCE.mask(expected).numpy(), err_msg=name)
        if name == "staple":  # the second window's NaN reaches every voxel it covers
            assert torch.isnan(expected[..., 4:]).all() and not torch.isnan(expected[..., :4]).any()
    assert masks["staple"][..., :4].all() and not masks["staple"][..., 4:].any()


def test_an_unknown_protocol_fails_before_sampling():
    net = RecordingNet()
    config = InferenceConfig(ddim_steps=2, samples=1, roi_size=(8, 8, 8), protocol="paper")
    with pytest.raises(UnknownNameError, match="valid names: msx, reference"):
        segment_scan(net, np.ones((1, 8, 8, 8), np.float32), config, torch.device("cpu"))
    assert net.calls == []


def test_the_mask_rules():
    """The reference thresholds the float32 sigmoid at 0.5 (exactly 0.5 below about 1e-7); msx the sign."""
    maps = torch.tensor([-1.0, -1e-12, 0.0, 5e-13, 5e-8, 2e-7, 0.3, float("nan")])
    assert REFERENCE.mask(maps).tolist() == [False, False, False, False, False, True, True, False]
    assert MSX.mask(maps).tolist() == [False, False, False, True, True, True, True, False]
    assert REFERENCE.mask(maps.double()).tolist() == REFERENCE.mask(maps).tolist()


def test_msx_protocol_is_todays_fusion_on_the_stitched_trajectories():
    logits = random_logits(8)
    for name in STRATEGIES.names():
        torch.testing.assert_close(MSX.strategy(name)(logits), STRATEGIES.get(name)(logits, x0=x0_from_logits))
