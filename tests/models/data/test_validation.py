from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msx.models.data.cohort import Cohort, find_isbi_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.data.validation import (
    CohortReport,
    check_cohort,
    check_cohort_root,
    summarise_cohort,
)
from tests.helpers import save_nifti, write_isbi_cohort

SHAPE = (6, 7, 5)
MODALITIES = ("flair", "mprage", "t2")


def _mask(timepoint: int = 1) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:3, timepoint : timepoint + 2, 1:3] = 1
    return mask


def write_cohort(root: Path, patients=(1, 2, 3, 4, 5), timepoints=2, affine=None, ext=".nii.gz") -> Path:
    """A tiny, valid ISBI-named cohort: three modalities and both raters' masks per scan."""
    return write_isbi_cohort(
        root, patients, range(1, timepoints + 1),
        image=lambda patient, timepoint, _: (
            np.random.default_rng(patient * 10 + timepoint).random(SHAPE, dtype=np.float32)
        ),
        mask=lambda _, timepoint, __: _mask(timepoint),
        affine=affine, suffix=ext, modalities=MODALITIES,
    )


def _file(root: Path, patient: int, timepoint: int, suffix: str, ext: str = ".nii.gz") -> Path:
    return root / f"training{patient:02d}" / f"training{patient:02d}_{timepoint:02d}_{suffix}{ext}"


def _only_error(report: CohortReport) -> str:
    assert len(report.errors) == 1, report.errors
    assert "\n" not in report.errors[0]
    return report.errors[0]


def test_a_clean_cohort_has_no_problems(tmp_path):
    root = write_cohort(tmp_path)
    assert check_cohort_root(root, folds="paper") == CohortReport()
    report = check_cohort(find_isbi_cohort(root), "paper")
    assert report.ok and report.warnings == ()


def test_a_small_synthetic_cohort_passes(tmp_path):
    write_synthetic_cohort(tmp_path, patients=5, shape=(24, 28, 24), seed=0)
    report = check_cohort_root(tmp_path, folds="paper")
    assert report.errors == ()


def test_truncated_gzip_file_is_an_error_naming_it(tmp_path):
    root = write_cohort(tmp_path)
    path = _file(root, 2, 1, "flair_pp")
    path.write_bytes(path.read_bytes()[:40])
    error = _only_error(check_cohort_root(root))
    assert str(path) in error and "cannot read" in error


def test_nan_voxel_is_an_error(tmp_path):
    root = write_cohort(tmp_path)
    image = np.ones(SHAPE, dtype=np.float32)
    image[2, 3, 1] = np.nan
    image[0, 0, 0] = np.inf
    path = save_nifti(_file(root, 3, 2, "t2_pp"), image)
    error = _only_error(check_cohort_root(root))
    assert error == f"{path} contains 2 NaN or infinite voxels"


def test_mask_value_outside_0_1_is_an_error(tmp_path):
    root = write_cohort(tmp_path)
    mask = _mask()
    mask[0, 0, 0] = 2
    path = save_nifti(_file(root, 1, 1, "mask1"), mask)
    error = _only_error(check_cohort_root(root))
    assert error.startswith(f"{path} is not a binary mask: 1 voxels hold values such as [2.0]")


def test_shape_mismatch_is_an_error(tmp_path):
    root = write_cohort(tmp_path)
    path = save_nifti(_file(root, 4, 1, "t2_pp"), np.zeros((6, 7, 6), dtype=np.float32))
    error = _only_error(check_cohort_root(root))
    assert error == f"{path} has shape (6, 7, 6) but {_file(root, 4, 1, 'flair_pp')} has {SHAPE}"


def test_affine_mismatch_is_an_error(tmp_path):
    root = write_cohort(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    path = save_nifti(_file(root, 5, 2, "mask1"), _mask(2), shifted)
    error = _only_error(check_cohort_root(root))
    assert error.startswith(f"{path} has a different affine")


def test_missing_modality_and_rater_mask_are_errors(tmp_path):
    root = write_cohort(tmp_path)
    _file(root, 2, 2, "t2_pp").unlink()
    _file(root, 3, 1, "mask1").unlink()
    _file(root, 4, 1, "mask2").unlink()  # rater 2 is not the chosen rater: fine
    report = check_cohort_root(root)
    # The file looked for and the folder it was expected in, so that a misspelt name is plain to see.
    assert report.errors == (
        f"scan training02_02 under {root} lacks t2: no training02_02_t2_pp.nii[.gz] in {root / 'training02'} "
        f"or anywhere else under {root}",
        f"scan training03_01 under {root} lacks mask1: no training03_01_mask1.nii[.gz] in {root / 'training03'} "
        f"or anywhere else under {root}",
    )
    assert check_cohort_root(root, modalities=("flair", "mprage"), rater=2).errors == (
        f"scan training04_01 under {root} lacks mask2: no training04_01_mask2.nii[.gz] in {root / 'training04'} "
        f"or anywhere else under {root}",
    )


def test_a_misspelt_file_is_named_with_the_name_looked_for(tmp_path):
    root = write_cohort(tmp_path)
    typo = _file(root, 2, 3 - 1, "t2_pp")
    typo.rename(typo.with_name("training02_02_T2_pp.nii.gz"))
    error = _only_error(check_cohort_root(root))
    assert "lacks t2: no training02_02_t2_pp.nii[.gz] in " + str(root / "training02") in error


def test_duplicate_time_point_as_nii_and_nii_gz_is_an_error(tmp_path):
    root = write_cohort(tmp_path)
    save_nifti(_file(root, 1, 2, "flair_pp", ext=".nii"), np.ones(SHAPE, dtype=np.float32))
    error = _only_error(check_cohort_root(root))
    assert "patient 1 time point 2 has two flair files" in error
    assert str(_file(root, 1, 2, "flair_pp", ext=".nii")) in error and str(_file(root, 1, 2, "flair_pp")) in error


def test_duplicate_scan_in_a_cohort_object_is_an_error(tmp_path):
    cohort = find_isbi_cohort(write_cohort(tmp_path, patients=(1,), timepoints=1))
    doubled = Cohort(root=cohort.root, modalities=cohort.modalities, rater=cohort.rater, scans=cohort.scans * 2)
    error = _only_error(check_cohort(doubled))
    assert error.startswith("scan training01_01: patient 1 time point 1 appears twice")


def test_too_few_patients_for_the_paper_folds_is_an_error(tmp_path):
    root = write_cohort(tmp_path, patients=(1, 2, 3))
    assert check_cohort_root(root).ok  # no fold plan asked for
    error = _only_error(check_cohort_root(root, folds="paper"))
    assert error.startswith(f"fold plan needs patients [1, 2, 3, 4, 5] but {root} has [1, 2, 3]")


def test_patient_folder_without_time_points_is_an_error(tmp_path):
    root = write_cohort(tmp_path, patients=(1, 2))
    (root / "training03" / "masks").mkdir(parents=True)
    error = _only_error(check_cohort_root(root))
    assert error == f"patient 3 has no time points: {root / 'training03'} holds no ISBI-named scan files"


def test_every_problem_is_reported_at_once(tmp_path):
    root = write_cohort(tmp_path)
    nan_image = np.zeros(SHAPE, dtype=np.float32)
    nan_image[0, 0, 0] = np.nan
    save_nifti(_file(root, 1, 1, "flair_pp"), nan_image)
    save_nifti(_file(root, 1, 1, "mask1"), _mask() * 3)
    _file(root, 5, 2, "mprage_pp").write_bytes(b"not a nifti")
    _file(root, 4, 1, "t2_pp").unlink()
    report = check_cohort_root(root, folds="paper")
    assert len(report.errors) == 4, report.errors


def test_non_1mm_spacing_and_empty_mask_are_warnings(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    root = write_cohort(tmp_path, patients=(1,), timepoints=1, affine=affine)
    empty = save_nifti(_file(root, 1, 1, "mask1"), np.zeros(SHAPE, dtype=np.uint8), affine)
    report = check_cohort_root(root)
    assert report.errors == ()
    assert report.warnings == (
        f"{_file(root, 1, 1, 'flair_pp')}: voxel spacing 2 x 2 x 2 mm, not the 1 mm of the ISBI preprocessed data",
        f"{empty}: rater 1 mask is empty (no lesion voxels)",
    )


def test_missing_root_is_reported(tmp_path):
    assert check_cohort_root(tmp_path / "absent").errors == (f"cohort root {tmp_path / 'absent'} does not exist",)
    assert check_cohort_root(tmp_path).errors[0].startswith("no ISBI-named files")


def test_uncompressed_truncated_file_is_an_error(tmp_path):
    root = write_cohort(tmp_path, patients=(1,), timepoints=1, ext=".nii")
    path = root / "training01" / "training01_01_mprage_pp.nii"
    path.write_bytes(path.read_bytes()[:400])
    assert str(path) in _only_error(check_cohort_root(root))


def test_summary_counts_lesions_volume_and_inter_rater_dice(tmp_path):
    affine = np.diag([2.0, 1.0, 1.5, 1.0])  # 3 mm^3 voxels
    stem = tmp_path / "training01_01"
    for name in MODALITIES:
        save_nifti(Path(f"{stem}_{name}_pp.nii"), np.zeros(SHAPE, dtype=np.float32), affine)
    rater1 = np.zeros(SHAPE, dtype=np.uint8)
    rater1[0:2, 0:2, 0:2] = 1  # 8 voxels
    rater1[2, 2, 2] = 1  # touches the block only at a corner: its own 6-connected lesion
    rater1[4:6, 5, 3] = 1  # 2 voxels
    rater2 = np.zeros(SHAPE, dtype=np.uint8)
    rater2[0:2, 0:2, 0:2] = 1  # 8 voxels, all shared
    rater2[5, 0, 0] = 1  # 1 voxel, not shared
    save_nifti(Path(f"{stem}_mask1.nii"), rater1, affine)
    save_nifti(Path(f"{stem}_mask2.nii"), rater2, affine)
    stem2 = tmp_path / "training02_03"
    for name in MODALITIES:
        save_nifti(Path(f"{stem2}_{name}_pp.nii.gz"), np.zeros(SHAPE, dtype=np.float32))
    save_nifti(Path(f"{stem2}_mask1.nii.gz"), rater1)  # only rater 1, 1 mm

    first, second = summarise_cohort(find_isbi_cohort(tmp_path))
    assert (first.patient, first.timepoint, first.shape, first.spacing) == (1, 1, SHAPE, (2.0, 1.0, 1.5))
    assert first.lesions == {1: 3, 2: 2}
    assert first.volume_ml == pytest.approx({1: 11 * 3 / 1000, 2: 9 * 3 / 1000})
    assert first.dice == pytest.approx(2 * 8 / (11 + 9))
    assert (second.patient, second.timepoint, second.spacing) == (2, 3, (1.0, 1.0, 1.0))
    assert second.lesions == {1: 3} and second.volume_ml == pytest.approx({1: 0.011}) and second.dice is None


def test_check_reads_without_writing(tmp_path):
    root = write_cohort(tmp_path, patients=(1,), timepoints=1)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    check_cohort_root(root)
    summarise_cohort(find_isbi_cohort(root))
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()} == before


def test_a_manifest_reports_its_bad_rows_and_its_files_problems_together(tmp_path):
    root = write_cohort(tmp_path / "data", patients=(1, 2, 3), timepoints=1)
    nan = np.zeros(SHAPE, dtype=np.float32)
    nan[1, 1, 1] = np.nan
    save_nifti(_file(root, 2, 1, "flair_pp"), nan)
    manifest = tmp_path / "manifest.csv"
    lines = ["patient,timepoint,flair,mprage,t2,mask1"]
    for patient in (1, 2, 3):
        files = [_file(root, patient, 1, name) for name in ("flair_pp", "mprage_pp", "t2_pp", "mask1")]
        lines.append(f"{patient},1," + ",".join(map(str, files)))
    lines.append(lines[-1])  # patient 3 time point 1 twice
    manifest.write_text("\n".join(lines) + "\n")

    report = check_cohort_root(manifest, folds="loso")

    assert report.errors == (
        f"{manifest}: line 5: patient, timepoint: patient 3 time point 1 is already listed at line 4",
        f"{_file(root, 2, 1, 'flair_pp')} contains 1 NaN or infinite voxels",
    )
    paper = check_cohort_root(manifest, folds="paper")
    assert paper.errors[:2] == report.errors
    assert paper.errors[2].startswith(f"fold plan needs patients [1, 2, 3, 4, 5] but {manifest} has [1, 2, 3]")
