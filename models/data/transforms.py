"""MONAI dictionary transforms of the MSSegDiff recipe, and the inverse map for whole-scan inference.

Samples are ``{"image": (C, X, Y, Z) float32, "label": (1, X, Y, Z)}``. Preprocessing crops to the
images' foreground (any channel > 0, which is the brain in skull-stripped data), pads to at least the
patch size and z-scores each channel over its non-zero voxels; augmentation draws a patch (uniformly,
or centred on a lesion voxel with a chosen probability), flips it and jitters intensities. Predictions
must be scored and written on the input's grid, so inference keeps a :class:`GridRestore` that undoes
the crop and the padding voxel-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    Lambdad,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

Volume = TypeVar("Volume", np.ndarray, torch.Tensor)

_KEYS = ("image", "label")
_BRAIN_KEY = "brain_magnitude"


def _spatial_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(s) for s in patch_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"patch_size must be three positive sizes, got {tuple(patch_size)}")
    return size  # type: ignore[return-value]


def _plain_float_tensors(keys: Sequence[str]) -> EnsureTyped:
    # Without MONAI's metadata: nothing downstream reads it, and plain tensors collate and move faster.
    return EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False)


def _crop_pad_normalize(
    keys: Sequence[str], patch_size: tuple[int, int, int]
) -> tuple[CropForegroundd, SpatialPadd, NormalizeIntensityd, EnsureTyped]:
    # Crop coordinates are not written into the sample (start/end_coord_key=None) so batches hold only
    # tensors; inference gets the geometry from GridRestore instead.
    return (
        CropForegroundd(keys=keys, source_key="image", start_coord_key=None, end_coord_key=None),
        SpatialPadd(keys=keys, spatial_size=patch_size),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        _plain_float_tensors(keys),
    )


def preprocessing_transforms(patch_size: Sequence[int]) -> Compose:
    """Deterministic (cacheable) crop to foreground, pad to at least ``patch_size``, per-channel z-score."""
    return Compose(list(_crop_pad_normalize(_KEYS, _spatial_size(patch_size))))


def augmentation_transforms(patch_size: Sequence[int], lesion_patch_fraction: float = 0.0) -> Compose:
    """Random ``patch_size`` crop, flip on each axis (p 0.5), intensity scale and shift (0.1) of the image.

    ``lesion_patch_fraction`` 0 draws the crop uniformly (the reference recipe). Above 0, the crop is centred
    on a lesion voxel with that probability and on a brain voxel otherwise, and the transform returns a
    list of one sample: batch such samples with ``monai.data.list_data_collate``. A scan without lesion
    voxels gets brain-centred crops (MONAI warns that it cannot balance the classes). The candidate centres
    are found by the deterministic first transforms; a ``CacheDataset`` computes them once per scan.
    """
    size = _spatial_size(patch_size)
    if not 0.0 <= lesion_patch_fraction <= 1.0:
        raise ValueError(f"lesion_patch_fraction must be in [0, 1], got {lesion_patch_fraction}")
    return Compose(
        [
            *(_lesion_biased_crop(size, lesion_patch_fraction) if lesion_patch_fraction > 0 else _uniform_crop(size)),
            *(RandFlipd(keys=_KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            _plain_float_tensors(_KEYS),
        ]
    )


def _uniform_crop(size: tuple[int, int, int]) -> tuple[RandSpatialCropd]:
    return (RandSpatialCropd(keys=_KEYS, roi_size=size, random_size=False),)


def _lesion_biased_crop(
    size: tuple[int, int, int], lesion_patch_fraction: float
) -> tuple[Lambdad, FgBgToIndicesd, DeleteItemsd, RandCropByPosNegLabeld]:
    # Negative centres must lie in the brain. After the z-score the brain holds negative values too and only
    # the background is exactly 0, so MONAI's `image > threshold` test is run on |image| (a scratch key).
    # The centres are precomputed as flat indices (deterministic, so cacheable): searching a full-size scan
    # for them on every draw costs several times more than the rest of the augmentation.
    return (
        Lambdad(keys="image", func=abs, overwrite=_BRAIN_KEY),
        FgBgToIndicesd(keys="label", image_key=_BRAIN_KEY, image_threshold=0.0),
        DeleteItemsd(keys=_BRAIN_KEY),
        RandCropByPosNegLabeld(
            keys=_KEYS,
            label_key="label",
            spatial_size=size,
            pos=lesion_patch_fraction,
            neg=1.0 - lesion_patch_fraction,
            num_samples=1,
            fg_indices_key="label_fg_indices",  # FgBgToIndicesd's names; the crop removes them from the sample
            bg_indices_key="label_bg_indices",
        ),
    )


@dataclass(frozen=True)
class GridRestore:
    """Maps a volume on the cropped and padded grid back onto the input grid (zeros outside the crop)."""

    input_shape: tuple[int, int, int]
    crop_start: tuple[int, int, int]  # foreground box on the input grid, end exclusive
    crop_end: tuple[int, int, int]
    pad_before: tuple[int, int, int]  # padding added in front of the box on each axis
    prepared_shape: tuple[int, int, int]

    def restore(self, volume: Volume) -> Volume:
        """``volume`` has the prepared grid as its last three axes; leading axes are kept."""
        if tuple(volume.shape[-3:]) != self.prepared_shape:
            raise ValueError(
                f"volume's spatial shape {tuple(volume.shape[-3:])} is not the prepared grid {self.prepared_shape}"
            )
        unpadded = volume[
            (
                ...,
                *(slice(p, p + e - s) for p, s, e in zip(self.pad_before, self.crop_start, self.crop_end, strict=True)),
            )
        ]
        shape = (*volume.shape[:-3], *self.input_shape)
        restored = volume.new_zeros(shape) if isinstance(volume, torch.Tensor) else np.zeros(shape, dtype=volume.dtype)
        restored[(..., *(slice(s, e) for s, e in zip(self.crop_start, self.crop_end, strict=True)))] = unpadded
        return restored


def prepare_scan_for_inference(image: np.ndarray, patch_size: Sequence[int]) -> tuple[torch.Tensor, GridRestore]:
    """The whole ``(C, X, Y, Z)`` scan preprocessed as in training, and the map back to its grid."""
    size = _spatial_size(patch_size)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {image.shape}")
    if not (image > 0).any():
        raise ValueError("image has no voxel > 0, so there is no foreground to crop to")

    crop, pad, normalize, to_tensor = _crop_pad_normalize(("image",), size)
    prepared = Compose([crop, pad, normalize, to_tensor])({"image": image})["image"]
    # The very transforms that ran, asked for the geometry they applied.
    start, end = crop.cropper.compute_bounding_box(torch.as_tensor(image))
    crop_start, crop_end = tuple(int(v) for v in start), tuple(int(v) for v in end)
    cropped_shape = [e - s for s, e in zip(crop_start, crop_end, strict=True)]
    pad_width = pad.padder.compute_pad_width(cropped_shape)[1:]
    restore = GridRestore(
        input_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        crop_start=crop_start,  # type: ignore[arg-type]
        crop_end=crop_end,  # type: ignore[arg-type]
        pad_before=tuple(int(before) for before, _ in pad_width),  # type: ignore[arg-type]
        prepared_shape=tuple(int(s) for s in prepared.shape[1:]),  # type: ignore[arg-type]
    )
    return prepared, restore
