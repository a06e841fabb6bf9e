"""Check a cohort's files thoroughly and summarise its lesions, reporting every problem at once.

:func:`check_cohort` reads every chosen file of every scan (one file at a time) and collects all
problems instead of stopping at the first, so a user fixes a cohort in one pass; :func:`check_cohort_root`
does the same for a folder or a manifest file, also reporting what
:func:`~msx.models.data.manifest.open_cohort` would refuse (missing and duplicate files, bad manifest
rows). :func:`summarise_cohort` gives the per-scan numbers ``msx data inspect`` prints. Nothing under
the cohort root, or named by a manifest, is ever written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from .cohort import (
    _AFFINE_ATOL,
    _UNREADABLE,
    DEFAULT_MODALITIES,
    MODALITIES,
    RATERS,
    Cohort,
    CohortError,
    Scan,
    _read_volume,
    check_choices,
    missing_files_problem,
    parse_isbi_name,
)
from .folds import FoldSplits, check_folds, resolve_folds
from .manifest import MANIFEST_SUFFIXES, parse_manifest

_PATIENT_FOLDER = re.compile(r"^training(\d+)$")
_SPACING_ATOL = 1e-3
# Lesions are 6-connected (face-sharing) components, as the study's metrics count them by default.
_LESION_STRUCTURE = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class CohortReport:
    """Problems found in a cohort: errors make it unusable, warnings are worth a look. One line each."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass(frozen=True)
class ScanSummary:
    """One row of ``msx data inspect``: lesions and volume per rater present, inter-rater Dice (None if one rater)."""

    patient: int
    timepoint: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    lesions: dict[int, int]
    volume_ml: dict[int, float]
    dice: float | None


def check_cohort(cohort: Cohort, folds: str | Sequence[FoldSplits] | None = None) -> CohortReport:
    """Read every chosen file of every scan of ``cohort`` and report every problem found.

    Errors: unreadable or truncated files, missing modalities or rater mask, modalities of one scan on
    different grids (shape or affine), masks with values outside {0, 1}, NaN or infinite voxels,
    duplicate (patient, time point) scans, and folds (a plan name or explicit folds, see
    :func:`~msx.models.data.folds.resolve_folds`) the cohort's patients cannot fill.
    Warnings: voxel spacing other than 1 mm, empty masks.
    """
    errors: list[str] = []
    warnings: list[str] = []
    seen: dict[tuple[int, int], Scan] = {}
    for scan in cohort.scans:
        key = (scan.patient, scan.timepoint)
        if key in seen:
            errors.append(
                f"scan {scan.scan_id}: patient {scan.patient} time point {scan.timepoint} appears twice "
                f"({_first_file(seen[key])} and {_first_file(scan)})"
            )
            continue
        seen[key] = scan
        _check_scan(scan, cohort.modalities, cohort.rater, cohort.root, errors, warnings)
    if folds is not None:
        errors.extend(_fold_problems(folds, cohort))
    return CohortReport(errors=tuple(errors), warnings=tuple(warnings))


def check_cohort_root(
    root: str | Path,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    rater: int = 1,
    folds: str | Sequence[FoldSplits] | None = None,
) -> CohortReport:
    """:func:`check_cohort` for a folder or a manifest file, also reporting what would stop it opening.

    A folder: duplicate files and patient folders with no scans (files are found by ISBI name as
    :func:`~msx.models.data.cohort.find_isbi_cohort` does, but checking keeps going where it would raise).
    A manifest: every bad row (see :func:`~msx.models.data.manifest.parse_manifest`).
    ``modalities`` and ``rater`` must be valid choices (ValueError otherwise).
    """
    chosen = check_choices(modalities, rater)
    root = Path(root)
    if root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
        try:
            contents = parse_manifest(root, chosen, rater)
        except CohortError as error:
            return CohortReport(errors=(str(error),))
        report = check_cohort(Cohort(root=root, modalities=chosen, rater=rater, scans=contents.scans), folds)
        return CohortReport(errors=contents.problems + report.errors, warnings=report.warnings)
    if not root.is_dir():
        problem = (
            "does not exist"
            if not root.exists()
            else f"is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
        return CohortReport(errors=(f"cohort root {root} {problem}",))

    errors: list[str] = []
    found: dict[tuple[int, int], dict[str | int, Path]] = {}
    patient_folders: dict[int, Path] = {}
    for path in sorted(root.rglob("training*")):
        if folder := _PATIENT_FOLDER.match(path.name):
            if path.is_dir():
                patient_folders.setdefault(int(folder[1]), path)
            continue
        parsed = parse_isbi_name(path.name)
        if parsed is None or not path.is_file():
            continue
        patient, timepoint, key = parsed
        files = found.setdefault((patient, timepoint), {})
        if key in files:
            what = key if isinstance(key, str) else f"rater {key} mask"
            errors.append(
                f"{path}: patient {patient} time point {timepoint} has two {what} files "
                f"(this one and {files[key]}); keep one"
            )
            continue
        files[key] = path

    if not found:
        errors.append(
            f"no ISBI-named files (trainingPP_TT_<modality>_pp.nii[.gz], trainingPP_TT_mask<rater>.nii[.gz]) "
            f"under {root}"
        )
    present = {patient for patient, _ in found}
    for patient, folder in sorted(patient_folders.items()):
        if patient not in present:
            errors.append(f"patient {patient} has no time points: {folder} holds no ISBI-named scan files")

    scans = tuple(
        Scan(
            patient=patient,
            timepoint=timepoint,
            images={name: files[name] for name in MODALITIES if name in files},
            masks={r: files[r] for r in RATERS if r in files},
        )
        for (patient, timepoint), files in sorted(found.items())
    )
    report = check_cohort(Cohort(root=root, modalities=chosen, rater=rater, scans=scans), folds)
    return CohortReport(errors=tuple(errors) + report.errors, warnings=report.warnings)


def summarise_cohort(cohort: Cohort) -> list[ScanSummary]:
    """Per scan: shape and spacing, lesion count (6-connected components) and volume in mL per rater, inter-rater Dice.

    Shape and spacing are those of the scan's first chosen modality (from its header). Raises
    CohortError naming the file if a mask cannot be read; run :func:`check_cohort` first for the full story.
    """
    rows = []
    for scan in cohort.scans:
        reference = next((scan.images[m] for m in cohort.modalities if m in scan.images), None)
        if reference is None:
            reference = next(iter(scan.masks.values()), None)
        if reference is None:
            raise CohortError(f"scan {scan.scan_id} has no files")
        shape, spacing = _header_grid(reference)
        lesions: dict[int, int] = {}
        volume_ml: dict[int, float] = {}
        masks: dict[int, np.ndarray] = {}
        for rater, path in sorted(scan.masks.items()):
            volume, affine = _read_volume(path)
            mask = volume > 0.5
            masks[rater] = mask
            _, lesions[rater] = ndimage.label(mask, structure=_LESION_STRUCTURE)
            voxel_ml = float(np.prod(nib.affines.voxel_sizes(affine))) / 1000.0
            volume_ml[rater] = int(mask.sum()) * voxel_ml
        dice = None
        if len(masks) == 2:
            first, second = masks[1], masks[2]
            if first.shape != second.shape:
                raise CohortError(f"{scan.masks[2]} has shape {second.shape} but {scan.masks[1]} has {first.shape}")
            total = int(first.sum()) + int(second.sum())
            dice = 2 * int((first & second).sum()) / total if total else 1.0
        rows.append(
            ScanSummary(
                patient=scan.patient,
                timepoint=scan.timepoint,
                shape=shape,
                spacing=spacing,
                lesions=lesions,
                volume_ml=volume_ml,
                dice=dice,
            )
        )
    return rows


def _check_scan(
    scan: Scan, modalities: Sequence[str], rater: int, root: Path, errors: list[str], warnings: list[str]
) -> None:
    if problem := missing_files_problem(scan, modalities, rater, root):
        errors.append(problem)

    images = [scan.images[name] for name in modalities if name in scan.images]
    mask_path = scan.masks.get(rater)
    reference: tuple[Path, tuple[int, ...], np.ndarray] | None = None
    for path in images + ([mask_path] if mask_path is not None else []):
        try:
            volume, affine = _read_volume(path)
        except CohortError as error:
            errors.append(str(error))
            continue
        if reference is None:
            reference = (path, volume.shape, affine)
            spacing = tuple(float(size) for size in nib.affines.voxel_sizes(affine))
            if not np.allclose(spacing, 1.0, atol=_SPACING_ATOL):
                warnings.append(
                    f"{path}: voxel spacing {_format_spacing(spacing)} mm, not the 1 mm of the ISBI preprocessed data"
                )
        else:
            reference_path, reference_shape, reference_affine = reference
            if volume.shape != reference_shape:
                errors.append(f"{path} has shape {volume.shape} but {reference_path} has {reference_shape}")
            elif not np.allclose(affine, reference_affine, atol=_AFFINE_ATOL):
                errors.append(f"{path} has a different affine (voxel-to-world map) from {reference_path}")
        if path == mask_path:
            binary = np.isin(volume, (0.0, 1.0))
            if not binary.all():
                unexpected = np.unique(volume[~binary])
                errors.append(
                    f"{path} is not a binary mask: {int((~binary).sum())} voxels hold values such as "
                    f"{unexpected[:5].tolist()} (only 0 and 1 are allowed)"
                )
            elif not volume.any():
                warnings.append(f"{path}: rater {rater} mask is empty (no lesion voxels)")
        else:
            bad = int((~np.isfinite(volume)).sum())
            if bad:
                errors.append(f"{path} contains {bad} NaN or infinite voxels")


def _fold_problems(folds: str | Sequence[FoldSplits], cohort: Cohort) -> list[str]:
    try:
        resolved = resolve_folds(folds, cohort.patients)
    except ValueError as error:  # also an unknown plan name (UnknownNameError)
        return [f"{cohort.root}: {error}"]
    try:
        check_folds(resolved, cohort.patients)
    except ValueError as error:
        needed = sorted({p for fold in resolved for p in (*fold.train, *fold.validation, *fold.test)})
        return [f"fold plan needs patients {needed} but {cohort.root} has {list(cohort.patients)}: {error}"]
    return []


def _first_file(scan: Scan) -> Path | str:
    files = [*scan.images.values(), *scan.masks.values()]
    return files[0] if files else "no files"


def _header_grid(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    try:
        image = nib.funcs.squeeze_image(nib.load(path))
    except _UNREADABLE as error:
        raise CohortError(f"cannot read {path}: {' '.join(str(error).split())}") from error
    spacing = tuple(float(size) for size in nib.affines.voxel_sizes(image.affine))
    return tuple(int(size) for size in image.shape), spacing


def _format_spacing(spacing: Sequence[float]) -> str:
    return " x ".join(f"{size:g}" if math.isfinite(size) else str(size) for size in spacing)
