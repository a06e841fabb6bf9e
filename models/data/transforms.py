"""MONAI dictionary transforms of the MSSegDiff recipe, and the inverse map for whole-scan inference.

Samples are ``{"image": (C, X, Y, Z) float32, "label": (1, X, Y, Z)}``. Preprocessing crops to the
images' foreground (any channel > 0, which is the brain in skull-stripped data), pads to at least the
patch size and z-scores each channel over its non-zero voxels; augmentation draws a random patch,
flips it and jitters intensities. Predictions must be scored and written on the input's grid, so
inference keeps a :class:`GridRestore` that undoes the crop and the padding voxel-exactly.
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
    EnsureTyped,
    NormalizeIntensityd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

Volume = TypeVar("Volume", np.ndarray, torch.Tensor)

_KEYS = ("image", "label")


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


def augmentation_transforms(patch_size: Sequence[int]) -> Compose:
    """Random ``patch_size`` crop, flip on each axis (p 0.5), intensity scale and shift (0.1) of the image."""
    size = _spatial_size(patch_size)
    return Compose(
        [
            RandSpatialCropd(keys=_KEYS, roi_size=size, random_size=False),
            *(RandFlipd(keys=_KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            _plain_float_tensors(_KEYS),
        ]
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
            (..., *(slice(p, p + e - s) for p, s, e in zip(self.pad_before, self.crop_start, self.crop_end)))
        ]
        shape = (*volume.shape[:-3], *self.input_shape)
        if isinstance(volume, torch.Tensor):
            restored = volume.new_zeros(shape)
        else:
            restored = np.zeros(shape, dtype=volume.dtype)
        restored[(..., *(slice(s, e) for s, e in zip(self.crop_start, self.crop_end)))] = unpadded
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
    cropped_shape = [e - s for s, e in zip(crop_start, crop_end)]
    pad_width = pad.padder.compute_pad_width(cropped_shape)[1:]
    restore = GridRestore(
        input_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        crop_start=crop_start,  # type: ignore[arg-type]
        crop_end=crop_end,  # type: ignore[arg-type]
        pad_before=tuple(int(before) for before, _ in pad_width),  # type: ignore[arg-type]
        prepared_shape=tuple(int(s) for s in prepared.shape[1:]),  # type: ignore[arg-type]
    )
    return prepared, restore
