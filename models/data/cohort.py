"""Discover and load an ISBI 2015-style longitudinal MS cohort.

Files are found by name anywhere under the root (copies of the challenge data nest them differently),
so only the ISBI naming matters: ``trainingPP_TT_{flair,mprage,t2,pd}_pp.nii[.gz]`` for images and
``trainingPP_TT_mask{1,2}.nii[.gz]`` for the two raters' masks. Nothing is ever written under the root.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

MODALITIES = ("flair", "mprage", "t2", "pd")
DEFAULT_MODALITIES = ("flair", "mprage", "t2")
RATERS = (1, 2)

_IMAGE_NAME = re.compile(r"^training(\d+)_(\d+)_(flair|mprage|t2|pd)_pp\.nii(?:\.gz)?$")
_MASK_NAME = re.compile(r"^training(\d+)_(\d+)_mask([12])\.nii(?:\.gz)?$")
_AFFINE_ATOL = 1e-3
# Everything nibabel raises for a file that is missing, truncated, corrupt or not NIfTI at all.
_UNREADABLE = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def parse_isbi_name(name: str) -> tuple[int, int, str | int] | None:
    """(patient, time point, modality or rater number) of an ISBI file name; None for any other name."""
    if image := _IMAGE_NAME.match(name):
        return int(image[1]), int(image[2]), image[3]
    if mask := _MASK_NAME.match(name):
        return int(mask[1]), int(mask[2]), int(mask[3])
    return None


class CohortError(ValueError):
    """The files of a cohort are missing, ambiguous or not usable; the message names the file."""


@dataclass(frozen=True)
class Scan:
    """One time point of one patient: its image file per modality and mask file per rater."""

    patient: int
    timepoint: int
    images: Mapping[str, Path]
    masks: Mapping[int, Path]

    @property
    def scan_id(self) -> str:
        return f"training{self.patient:02d}_{self.timepoint:02d}"


@dataclass(frozen=True)
class Cohort:
    """Scans of a folder or a manifest (``root``), each checked to have ``modalities`` and the ``rater``'s mask.

    ``rater`` None: masks are optional, as for new scans to segment.
    """

    root: Path
    modalities: tuple[str, ...]
    rater: int | None
    scans: tuple[Scan, ...]

    @property
    def patients(self) -> tuple[int, ...]:
        return tuple(sorted({scan.patient for scan in self.scans}))

    def scans_of(self, patients: Iterable[int]) -> tuple[Scan, ...]:
        wanted = set(patients)
        return tuple(scan for scan in self.scans if scan.patient in wanted)


@dataclass(frozen=True)
class LoadedScan:
    """Voxel data of one scan: ``image`` is (C, X, Y, Z) float32, ``mask`` is (X, Y, Z) uint8 in {0, 1}."""

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def check_choices(modalities: Sequence[str], rater: int | None) -> tuple[str, ...]:
    """Validate a modality selection and a rater (None: no mask wanted); returns the modalities as a tuple."""
    if isinstance(modalities, str):
        raise ValueError(f"modalities must be a sequence of names such as {DEFAULT_MODALITIES}, not {modalities!r}")
    chosen = tuple(modalities)
    unknown = [name for name in chosen if name not in MODALITIES]
    if unknown or not chosen:
        raise ValueError(f"unknown modalities {unknown or chosen}; valid modalities: {', '.join(MODALITIES)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"modalities {chosen} name one modality twice")
    if rater is not None and rater not in RATERS:
        raise ValueError(f"unknown rater {rater!r}; valid raters: {', '.join(map(str, RATERS))}")
    return chosen


def find_isbi_cohort(
    root: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, rater: int | None = 1
) -> Cohort:
    """Find every ISBI-named scan under ``root`` (recursively) and check it is complete.

    ``rater`` None: masks are optional (new scans to segment).
    """
    chosen = check_choices(modalities, rater)
    root = Path(root)
    if not root.is_dir():
        problem = "does not exist" if not root.exists() else "is not a folder"
        raise CohortError(f"cohort root {root} {problem}")

    # (patient, time point) -> {"flair": path, ..., 1: mask path, 2: mask path}
    found: dict[tuple[int, int], dict[str | int, Path]] = {}
    for path in sorted(root.rglob("training*")):
        parsed = parse_isbi_name(path.name)
        if parsed is None or not path.is_file():
            continue
        patient, timepoint, key = parsed
        files = found.setdefault((patient, timepoint), {})
        if key in files:
            what = key if isinstance(key, str) else f"rater {key} mask"
            raise CohortError(
                f"patient {patient} time point {timepoint} has two {what} files: {files[key]} and {path}"
            )
        files[key] = path

    if not found:
        raise CohortError(
            f"no ISBI-named files (trainingPP_TT_<modality>_pp.nii[.gz], trainingPP_TT_mask<rater>.nii[.gz]) "
            f"under {root}"
        )

    scans = []
    for (patient, timepoint), files in sorted(found.items()):
        scan = Scan(
            patient=patient,
            timepoint=timepoint,
            images={name: files[name] for name in MODALITIES if name in files},
            masks={r: files[r] for r in RATERS if r in files},
        )
        if problem := missing_files_problem(scan, chosen, rater, root):
            raise CohortError(problem)
        scans.append(scan)
    return Cohort(root=root, modalities=chosen, rater=rater, scans=tuple(scans))


def missing_files_problem(scan: Scan, modalities: Sequence[str], rater: int | None, root: Path) -> str | None:
    """What ``scan`` lacks of ``modalities`` and the ``rater``'s mask, in one line, or None if nothing.

    Under a folder, files are found by name, so the line names the files looked for and the folder holding
    the scan's other files: a misspelt name is then plain to see.
    """
    missing = [name for name in modalities if name not in scan.images]
    missing += [f"mask{rater}"] if rater is not None and rater not in scan.masks else []
    if not missing:
        return None
    problem = f"scan {scan.scan_id} under {root} lacks {', '.join(missing)}"
    if not Path(root).is_dir():
        return problem  # a manifest: its own checks name the row and the column
    looked_for = []
    for name in missing:
        is_mask = name.startswith("mask")
        # ISBI copies keep images and masks in different folders (preprocessed/, masks/): name the one of its kind.
        kin = scan.masks if is_mask else scan.images
        folders = sorted({str(path.parent) for path in (kin or {**scan.images, **scan.masks}).values()})
        file_name = f"{scan.scan_id}_{name}{'' if is_mask else '_pp'}.nii[.gz]"
        looked_for.append(
            f"{file_name} in {' or '.join(folders)} or anywhere else" if folders else f"{file_name} anywhere"
        )
    return f"{problem}: no {'; no '.join(looked_for)} under {root}"


def load_scan(scan: Scan, modalities: Sequence[str] = DEFAULT_MODALITIES, rater: int = 1) -> LoadedScan:
    """Read one scan's chosen modalities and rater mask, checking they share one voxel grid."""
    chosen = check_choices(modalities, rater)
    missing = [name for name in chosen if name not in scan.images] + (
        [f"mask{rater}"] if rater not in scan.masks else []
    )
    if missing:
        raise CohortError(f"scan {scan.scan_id} lacks {', '.join(missing)}")

    paths = [scan.images[name] for name in chosen] + [scan.masks[rater]]
    volumes, affines = zip(*(_read_volume(path) for path in paths), strict=True)
    reference_path, reference_shape, reference_affine = paths[0], volumes[0].shape, affines[0]
    for path, volume, affine in zip(paths[1:], volumes[1:], affines[1:], strict=True):
        if volume.shape != reference_shape:
            raise CohortError(f"{path} has shape {volume.shape} but {reference_path} has {reference_shape}")
        if not np.allclose(affine, reference_affine, atol=_AFFINE_ATOL):
            raise CohortError(f"{path} has a different affine (voxel-to-world map) from {reference_path}")

    for path, volume in zip(paths[:-1], volumes[:-1], strict=True):
        if not np.isfinite(volume).all():
            raise CohortError(f"{path} contains NaN or infinite voxels")
    mask_path, mask = paths[-1], volumes[-1]
    if not np.isin(mask, (0.0, 1.0)).all():
        unexpected = np.unique(mask[~np.isin(mask, (0.0, 1.0))])[:5]
        raise CohortError(f"{mask_path} is not a binary mask: it holds values such as {unexpected.tolist()}")

    spacing = tuple(float(size) for size in nib.affines.voxel_sizes(reference_affine))
    return LoadedScan(
        image=np.stack(volumes[:-1]),
        mask=mask.astype(np.uint8),
        affine=reference_affine,
        spacing=spacing,  # type: ignore[arg-type]
    )


def _read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float32, scaling applied) and affine of a 3-D NIfTI file."""
    try:
        # Some exports carry a trailing length-1 time axis; dropping it is lossless.
        image = nib.funcs.squeeze_image(nib.load(path))
        volume = image.get_fdata(dtype=np.float32)
    except _UNREADABLE as error:
        raise CohortError(f"cannot read {path}: {' '.join(str(error).split())}") from error
    if volume.ndim != 3:
        raise CohortError(f"{path} is {volume.ndim}-D with shape {volume.shape}; a 3-D volume is required")
    return volume, image.affine
