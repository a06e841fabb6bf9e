from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
)

from msx.models.data.transforms import (
    GridRestore,
    augmentation_transforms,
    prepare_scan_for_inference,
    preprocessing_transforms,
)

INPUT_SHAPE = (30, 14, 22)
PATCH = (16, 16, 16)


def _scan(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2-channel 'brain': an irregular positive blob off-centre, channel 1 reaching where channel 0 is 0."""
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[: INPUT_SHAPE[0], : INPUT_SHAPE[1], : INPUT_SHAPE[2]]
    blob = ((x - 12) / 7.0) ** 2 + ((y - 6) / 4.5) ** 2 + ((z - 13) / 5.0) ** 2 + rng.uniform(0, 0.5, INPUT_SHAPE) < 1
    image = np.zeros((2, *INPUT_SHAPE), np.float32)
    image[:, blob] = rng.uniform(50, 150, size=(2, blob.sum()))
    image[1, 26, 3, 20] = 80.0  # foreground in channel 1 only: widens the box along every axis
    label = np.zeros((1, *INPUT_SHAPE), np.uint8)
    label[0, 10:13, 5:7, 12:15] = 1
    return image, label


def _by_hand(image: np.ndarray, label: np.ndarray, patch=PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the box of voxels > 0 in any channel, pad symmetrically (extra voxel after), z-score non-zeros."""
    foreground = (image > 0).any(axis=0)
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(foreground))
    cropped_image, cropped_label = image[(slice(None), *box)], label[(slice(None), *box)]
    pads = [
        (max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
        for p, s in zip(patch, cropped_image.shape[1:], strict=True)
    ]
    padded_image = np.pad(cropped_image, [(0, 0), *pads])
    padded_label = np.pad(cropped_label, [(0, 0), *pads])
    normalized = np.zeros_like(padded_image, dtype=np.float64)
    for c, channel in enumerate(padded_image):
        values = channel[channel != 0].astype(np.float64)
        normalized[c][channel != 0] = (values - values.mean()) / values.std()
    return normalized, padded_label


def test_preprocessing_crops_pads_and_normalizes_like_the_recipe():
    image, label = _scan()
    expected_image, expected_label = _by_hand(image, label)

    out = preprocessing_transforms(PATCH)({"image": image, "label": label})

    assert set(out) == {"image", "label"}
    for key in out:
        assert type(out[key]) is torch.Tensor and out[key].dtype == torch.float32
    # The foreground box (widened by the channel-1 voxel) exceeds the patch along x and is padded along y, z.
    assert expected_image.shape[1] > PATCH[0] and expected_image.shape[2:] == PATCH[1:]
    np.testing.assert_allclose(out["image"].numpy(), expected_image, atol=1e-5)
    np.testing.assert_array_equal(out["label"].numpy(), expected_label)


def test_normalization_is_per_channel_over_non_zero_voxels():
    image, label = _scan(seed=1)
    image[1] *= 40.0  # a channel on another scale
    out = preprocessing_transforms(PATCH)({"image": image, "label": label})["image"]
    for channel in out:
        values = channel[channel != 0].double()
        assert abs(values.mean().item()) < 1e-5
        assert abs(values.std(unbiased=False).item() - 1) < 1e-5
    assert (out[:, 0, 0, 0] == 0).all()  # padding stays zero


def test_augmentation_draws_a_patch_and_keeps_image_and_label_aligned():
    image, label = _scan()
    prepared = preprocessing_transforms(PATCH)({"image": image, "label": label})
    # Tie image to label: a label scattered everywhere, and channel 0 = 2 on it and 1 elsewhere. Scaling
    # and shifting intensities keep that order, so after any crop and flip the label is the brighter voxels.
    prepared["label"] = (prepared["image"][1:] > 0).float()
    prepared["image"][0] = 1.0 + prepared["label"][0]
    augment = augmentation_transforms((8, 8, 8))
    for seed in range(12):
        augment.set_random_state(seed)
        out = augment({key: value.clone() for key, value in prepared.items()})
        assert out["image"].shape == (2, 8, 8, 8) and out["label"].shape == (1, 8, 8, 8)
        assert type(out["image"]) is torch.Tensor and out["image"].dtype == torch.float32
        channel = out["image"][0]
        assert out["label"].any()
        assert torch.equal(channel > channel.min(), out["label"][0] > 0)
        # Intensities were scaled and shifted (the image only: the label stays binary).
        assert not set(channel.unique().tolist()) <= {1.0, 2.0}
        assert set(out["label"].unique().tolist()) == {0.0, 1.0}


def test_augmentation_flips_each_axis_sometimes():
    ramp = torch.arange(8 * 8 * 8, dtype=torch.float32).reshape(1, 8, 8, 8)
    augment = augmentation_transforms((8, 8, 8))  # patch = volume: only flips move voxels
    flipped = np.zeros(3, int)
    for seed in range(20):
        augment.set_random_state(seed)
        out = augment({"image": ramp.clone(), "label": ramp.clone()})["label"][0]
        # Label is not intensity-augmented: its ramp tells which axes were reversed.
        flipped += [bool(out.select(axis, 0).sum() > out.select(axis, 7).sum()) for axis in range(3)]
    assert ((flipped > 3) & (flipped < 17)).all(), flipped


def _reference_augmentation(patch) -> Compose:
    """The augmentation as it was before lesion-biased sampling existed: a uniform random crop first."""
    keys = ("image", "label")
    return Compose(
        [
            RandSpatialCropd(keys=keys, roi_size=patch, random_size=False),
            *(RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        ]
    )


def test_lesion_patch_fraction_zero_is_the_uniform_crop_under_the_same_seed():
    image, label = _scan()
    prepared = preprocessing_transforms(PATCH)({"image": image, "label": label})
    default, explicit_zero, reference = (
        augmentation_transforms((8, 8, 8)),
        augmentation_transforms((8, 8, 8), lesion_patch_fraction=0.0),
        _reference_augmentation((8, 8, 8)),
    )
    for seed in range(6):
        outputs = []
        for augment in (default, explicit_zero, reference):
            augment.set_random_state(seed)
            outputs.append(augment({key: value.clone() for key, value in prepared.items()}))
        for out in outputs[:2]:
            assert isinstance(out, dict)
            for key in ("image", "label"):
                assert torch.equal(out[key], outputs[2][key])


def test_lesion_patch_fraction_one_puts_lesion_voxels_in_every_patch():
    image, label = _scan()
    prepared = preprocessing_transforms(PATCH)({"image": image, "label": label})
    biased, uniform = augmentation_transforms((8, 8, 8), 1.0), augmentation_transforms((8, 8, 8))
    uniform_hits = []
    for seed in range(16):
        biased.set_random_state(seed)
        uniform.set_random_state(seed)
        (out,) = biased({key: value.clone() for key, value in prepared.items()})
        assert out["image"].shape == (2, 8, 8, 8) and out["label"].shape == (1, 8, 8, 8)
        assert type(out["label"]) is torch.Tensor and out["label"].dtype == torch.float32
        assert out["label"].any(), f"seed {seed}: a patch without lesion voxels"
        uniform_hits.append(bool(uniform({key: value.clone() for key, value in prepared.items()})["label"].any()))
    assert not all(uniform_hits)  # the lesion is small: uniform patches do miss it, so the check above means something


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_a_scan_without_lesions_gets_patches_centred_in_the_brain(fraction):
    # A small "brain" of z-scored values below the mean (negative) in a corner of a large zero background.
    image = torch.zeros((1, 32, 32, 32))
    image[0, 2:6, 2:6, 2:6] = -1.0
    empty = {"image": image, "label": torch.zeros((1, 32, 32, 32))}
    biased, uniform = augmentation_transforms((8, 8, 8), fraction), augmentation_transforms((8, 8, 8))
    uniform_hits = []
    for seed in range(10):
        biased.set_random_state(seed)
        uniform.set_random_state(seed)
        with pytest.warns(UserWarning, match="Num foregrounds 0"):  # MONAI falls back to brain centres
            (out,) = biased(dict(empty))
        assert not out["label"].any()
        # The patch is larger than the brain: it holds brain voxels exactly when its values are not all equal.
        assert out["image"].unique().numel() == 2, f"seed {seed}: a patch outside the brain"
        uniform_hits.append(uniform(dict(empty))["image"].unique().numel() == 2)
    assert not all(uniform_hits)


def test_lesion_patch_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=r"lesion_patch_fraction must be in \[0, 1\], got 1.5"):
        augmentation_transforms(PATCH, 1.5)


def test_inference_preparation_matches_training_preprocessing():
    image, label = _scan(seed=2)
    prepared, _ = prepare_scan_for_inference(image, PATCH)
    training = preprocessing_transforms(PATCH)({"image": image, "label": label})["image"]
    assert type(prepared) is torch.Tensor and prepared.dtype == torch.float32
    torch.testing.assert_close(prepared, training)


def test_restore_puts_a_prepared_space_mask_on_the_right_input_voxels():
    image, _ = _scan(seed=3)
    prepared, restore = prepare_scan_for_inference(image, PATCH)
    foreground_prepared = (prepared != 0).any(dim=0)

    restored = restore.restore(foreground_prepared)

    assert restored.shape == INPUT_SHAPE and restored.dtype == torch.bool
    np.testing.assert_array_equal(restored.numpy(), (image > 0).any(axis=0))


def test_restore_maps_values_back_voxel_exactly_numpy_and_torch_with_leading_axes():
    image, _ = _scan(seed=4)
    prepared, restore = prepare_scan_for_inference(image, PATCH)
    # Independent expectation: the input z-scored per channel over its own foreground, zero elsewhere.
    expected = np.zeros(image.shape, np.float64)
    for c, channel in enumerate(image):
        values = channel[channel != 0].astype(np.float64)
        expected[c][channel != 0] = (values - values.mean()) / values.std()

    restored_numpy = restore.restore(prepared.numpy()[None])  # (1, C, x, y, z)
    restored_torch = restore.restore(prepared)

    assert isinstance(restored_numpy, np.ndarray) and restored_numpy.dtype == np.float32
    assert restored_numpy.shape == (1, 2, *INPUT_SHAPE)
    np.testing.assert_allclose(restored_numpy[0], expected, atol=1e-5)
    assert isinstance(restored_torch, torch.Tensor)
    np.testing.assert_array_equal(restored_torch.numpy(), restored_numpy[0])


def test_grid_restore_by_hand():
    restore = GridRestore(
        input_shape=(5, 4, 3), crop_start=(1, 0, 1), crop_end=(3, 4, 2), pad_before=(1, 0, 2), prepared_shape=(4, 4, 4)
    )
    volume = np.arange(64).reshape(4, 4, 4)
    restored = restore.restore(volume)
    expected = np.zeros((5, 4, 3), volume.dtype)
    expected[1:3, 0:4, 1:2] = volume[1:3, 0:4, 2:3]
    np.testing.assert_array_equal(restored, expected)
    with pytest.raises(ValueError, match=r"\(4, 4, 5\) is not the prepared grid \(4, 4, 4\)"):
        restore.restore(np.zeros((4, 4, 5)))


def test_scan_larger_than_patch_is_only_cropped():
    image = np.zeros((1, 40, 40, 40), np.float32)
    image[0, 3:37, 5:30, 2:39] = 1.0 + np.random.default_rng(5).random((34, 25, 37), dtype=np.float32)
    prepared, restore = prepare_scan_for_inference(image, PATCH)
    assert prepared.shape == (1, 34, 25, 37)
    assert restore.crop_start == (3, 5, 2) and restore.crop_end == (37, 30, 39) and restore.pad_before == (0, 0, 0)


@pytest.mark.parametrize(
    ("image", "patch", "message"),
    [
        (np.zeros((1, 8, 8, 8), np.float32), PATCH, "no voxel > 0"),
        (np.ones((8, 8, 8), np.float32), PATCH, r"\(C, X, Y, Z\)"),
        (np.ones((1, 8, 8, 8), np.float32), (16, 16), "three positive sizes"),
    ],
)
def test_inference_input_errors(image, patch, message):
    with pytest.raises(ValueError, match=message):
        prepare_scan_for_inference(image, patch)
