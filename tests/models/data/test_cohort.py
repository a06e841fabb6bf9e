from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from msx.models.data.cohort import (
    DEFAULT_MODALITIES,
    MODALITIES,
    CohortError,
    find_isbi_cohort,
    load_scan,
)
from tests.helpers import save_nifti, write_isbi_scan

SHAPE = (6, 7, 5)
AFFINE = np.diag([2.0, 1.5, 1.0, 1.0])
AFFINE[:3, 3] = (-10.0, 20.0, 5.0)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    return save_nifti(path, data, affine)


def _image_values(patient: int, timepoint: int, modality: str) -> np.ndarray:
    """Distinct, recognisable voxels per file: 1000 * patient + 100 * time point + 10 * modality + ramp."""
    ramp = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) / 1000
    return 1000 * patient + 100 * timepoint + 10 * MODALITIES.index(modality) + ramp


def _mask_values(patient: int, timepoint: int, rater: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[patient : patient + 2, timepoint : timepoint + rater + 1, 1:3] = 1
    return mask


def _write_scan(
    folder: Path,
    patient: int,
    timepoint: int,
    suffix: str = ".nii.gz",
    modalities: tuple[str, ...] = MODALITIES,
    raters: tuple[int, ...] = (1, 2),
) -> dict[str, Path]:
    return write_isbi_scan(
        folder, patient, timepoint,
        {name: _image_values(patient, timepoint, name) for name in modalities},
        {rater: _mask_values(patient, timepoint, rater) for rater in raters},
        AFFINE, suffix,
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_flat_folder_is_discovered_sorted_with_every_modality_and_rater(tmp_path):
    for patient, timepoint in [(2, 1), (1, 2), (1, 1)]:
        _write_scan(tmp_path, patient, timepoint, suffix=".nii")

    cohort = find_isbi_cohort(tmp_path)

    assert cohort.root == tmp_path
    assert cohort.modalities == DEFAULT_MODALITIES
    assert cohort.rater == 1
    assert [scan.scan_id for scan in cohort.scans] == ["training01_01", "training01_02", "training02_01"]
    assert cohort.patients == (1, 2)
    first = cohort.scans[0]
    assert (first.patient, first.timepoint) == (1, 1)
    assert dict(first.images) == {name: tmp_path / f"training01_01_{name}_pp.nii" for name in MODALITIES}
    assert dict(first.masks) == {1: tmp_path / "training01_01_mask1.nii", 2: tmp_path / "training01_01_mask2.nii"}
    assert [s.scan_id for s in cohort.scans_of([2])] == ["training02_01"]
    assert cohort.scans_of([]) == ()


def test_nested_folders_any_depth_and_mixed_compression(tmp_path):
    _write_scan(tmp_path / "ISBI_Training_01", 1, 1, suffix=".nii")
    _write_scan(tmp_path / "a" / "b" / "ISBI_Training_07", 3, 2, suffix=".nii.gz")
    # Images and masks of one scan may even sit in different folders (as in the ISBI archive).
    _write_scan(tmp_path / "training05" / "preprocessed", 5, 1, raters=())
    _write_scan(tmp_path / "training05" / "masks", 5, 1, modalities=(), raters=(1,))
    # Files that only look similar are ignored.
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / "training01_01_flair.nii.gz", np.zeros(SHAPE, np.float32))  # no _pp
    _save(tmp_path / "brainmask.nii.gz", np.zeros(SHAPE, np.uint8))
    (tmp_path / "training09_09_t2_pp.nii").mkdir()  # a folder, not a file

    cohort = find_isbi_cohort(tmp_path, modalities=("flair", "t2"), rater=1)

    assert [scan.scan_id for scan in cohort.scans] == ["training01_01", "training03_02", "training05_01"]
    assert cohort.patients == (1, 3, 5)
    assert cohort.scans[1].images["t2"] == tmp_path / "a/b/ISBI_Training_07/training03_02_t2_pp.nii.gz"
    assert cohort.scans[2].masks == {1: tmp_path / "training05/masks/training05_01_mask1.nii.gz"}


def test_discovery_and_loading_write_nothing_into_the_users_folder(tmp_path):
    _write_scan(tmp_path / "scan", 1, 1)
    before = _snapshot(tmp_path)

    cohort = find_isbi_cohort(tmp_path)
    load_scan(cohort.scans[0], cohort.modalities, cohort.rater)

    assert _snapshot(tmp_path) == before


def test_missing_root_and_root_that_is_a_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CohortError, match=f"{re.escape(str(missing))} does not exist"):
        find_isbi_cohort(missing)
    a_file = tmp_path / "file.nii"
    a_file.write_text("x")
    with pytest.raises(CohortError, match=f"{re.escape(str(a_file))} is not a folder"):
        find_isbi_cohort(a_file)


def test_folder_without_isbi_files(tmp_path):
    _save(tmp_path / "sub" / "patient1_flair.nii.gz", np.ones(SHAPE, np.float32))
    with pytest.raises(CohortError, match=f"no ISBI-named files.*under {re.escape(str(tmp_path))}$"):
        find_isbi_cohort(tmp_path)


def test_scan_missing_a_chosen_modality_is_named(tmp_path):
    _write_scan(tmp_path, 1, 1)
    _write_scan(tmp_path, 2, 3, modalities=("flair", "mprage", "pd"))

    with pytest.raises(CohortError, match="training02_03.*lacks t2") as error:
        find_isbi_cohort(tmp_path)
    assert "\n" not in str(error.value)
    assert f"no training02_03_t2_pp.nii[.gz] in {tmp_path}" in str(error.value)
    # Not choosing T2 makes the same folder valid.
    assert len(find_isbi_cohort(tmp_path, modalities=("flair", "mprage")).scans) == 2


def test_scan_missing_the_chosen_raters_mask_is_named(tmp_path):
    _write_scan(tmp_path, 1, 1, raters=(2,))

    with pytest.raises(CohortError, match="training01_01.*lacks mask1"):
        find_isbi_cohort(tmp_path, rater=1)
    assert find_isbi_cohort(tmp_path, rater=2).scans[0].masks.keys() == {2}


def test_without_a_rater_masks_are_optional(tmp_path):
    _write_scan(tmp_path, 1, 1, raters=())
    _write_scan(tmp_path, 1, 2, raters=(2,))
    cohort = find_isbi_cohort(tmp_path, rater=None)
    assert cohort.rater is None
    assert [dict(scan.masks) for scan in cohort.scans] == [{}, {2: tmp_path / "training01_02_mask2.nii.gz"}]


def test_same_file_found_twice_names_both(tmp_path):
    first = _write_scan(tmp_path / "copy_a", 1, 1, suffix=".nii")["flair"]
    second = _save(tmp_path / "copy_b" / "training01_01_flair_pp.nii.gz", np.ones(SHAPE, np.float32))

    with pytest.raises(CohortError, match="patient 1 time point 1 has two flair files") as error:
        find_isbi_cohort(tmp_path)
    assert str(first) in str(error.value) and str(second) in str(error.value)


def test_duplicate_mask_is_reported_as_a_mask(tmp_path):
    _write_scan(tmp_path / "a", 4, 2)
    _save(tmp_path / "b" / "training04_02_mask2.nii", np.zeros(SHAPE, np.uint8))
    with pytest.raises(CohortError, match="two rater 2 mask files"):
        find_isbi_cohort(tmp_path)


@pytest.mark.parametrize(
    ("modalities", "rater", "message"),
    [
        (("flair", "t1"), 1, "unknown modalities.*t1.*valid modalities: flair, mprage, t2, pd"),
        ((), 1, "valid modalities"),
        ("flair", 1, "sequence of names"),
        (("flair", "flair"), 1, "twice"),
        (("flair",), 3, "unknown rater 3; valid raters: 1, 2"),
    ],
)
def test_invalid_choices_list_the_valid_values(tmp_path, modalities, rater, message):
    _write_scan(tmp_path, 1, 1)
    with pytest.raises(ValueError, match=message):
        find_isbi_cohort(tmp_path, modalities=modalities, rater=rater)
    scan = find_isbi_cohort(tmp_path).scans[0]
    with pytest.raises(ValueError, match=message):
        load_scan(scan, modalities, rater)


def test_load_scan_round_trip(tmp_path):
    _write_scan(tmp_path / "s", 2, 3)
    scan = find_isbi_cohort(tmp_path).scans[0]

    loaded = load_scan(scan, modalities=("t2", "flair"), rater=2)

    assert loaded.image.dtype == np.float32 and loaded.image.shape == (2, *SHAPE)
    np.testing.assert_array_equal(loaded.image[0], _image_values(2, 3, "t2"))
    np.testing.assert_array_equal(loaded.image[1], _image_values(2, 3, "flair"))
    assert loaded.mask.dtype == np.uint8
    np.testing.assert_array_equal(loaded.mask, _mask_values(2, 3, rater=2))
    np.testing.assert_allclose(loaded.affine, AFFINE)
    assert loaded.spacing == (2.0, 1.5, 1.0)


def test_float_mask_and_trailing_singleton_axis_are_accepted(tmp_path):
    files = _write_scan(tmp_path, 1, 1)
    _save(files["mask1"], _mask_values(1, 1, 1).astype(np.float32)[..., None])
    loaded = load_scan(find_isbi_cohort(tmp_path).scans[0])
    np.testing.assert_array_equal(loaded.mask, _mask_values(1, 1, 1))
    assert loaded.mask.dtype == np.uint8


def test_affines_equal_within_tolerance_are_accepted(tmp_path):
    files = _write_scan(tmp_path, 1, 1)
    nudged = AFFINE.copy()
    nudged[0, 3] += 5e-4
    _save(files["t2"], _image_values(1, 1, "t2"), nudged)
    assert load_scan(find_isbi_cohort(tmp_path).scans[0]).image.shape == (3, *SHAPE)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cut_tail(path: Path) -> None:
    """Header intact, last voxels missing (an interrupted copy)."""
    path.write_bytes(path.read_bytes()[:-12])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a nifti file" * 20)


def _corrupt_gzip_stream(path: Path) -> None:
    payload = bytearray(gzip.compress(b"\x00" * 1000))
    payload[20:40] = b"\xff" * 20
    path.write_bytes(bytes(payload))


def _replace(values: np.ndarray, affine: np.ndarray = AFFINE):
    return lambda path: _save(path, values, affine)


def _with_voxel(value: float):
    def write(path: Path) -> None:
        data = _image_values(1, 1, "flair")
        data[2, 3, 1] = value
        _save(path, data)

    return write


_SHIFTED = AFFINE.copy()
_SHIFTED[1, 3] += 0.01
_BAD_MASK = np.zeros(SHAPE, np.uint8)
_BAD_MASK[1, 1, 1] = 2


@pytest.mark.parametrize(
    ("target", "damage", "message"),
    [
        ("flair", _truncate, "cannot read"),
        ("mask1", _truncate, "cannot read"),
        ("mask1", _cut_tail, "cannot read"),
        ("flair", _cut_tail, "cannot read"),
        ("mprage", _garbage, "cannot read"),
        ("t2", _corrupt_gzip_stream, "cannot read"),
        ("flair", _replace(np.ones((*SHAPE, 2), np.float32)), r"4-D with shape \(6, 7, 5, 2\)"),
        ("t2", _replace(np.ones((6, 7, 6), np.float32)), r"shape \(6, 7, 6\)"),
        ("mask1", _replace(np.zeros((6, 7, 6), np.uint8)), r"shape \(6, 7, 6\)"),
        ("mprage", _replace(np.ones(SHAPE, np.float32), _SHIFTED), "different affine"),
        ("mask1", _replace(np.zeros(SHAPE, np.uint8), _SHIFTED), "different affine"),
        ("flair", _with_voxel(np.nan), "NaN or infinite"),
        ("flair", _with_voxel(np.inf), "NaN or infinite"),
        ("mask1", _replace(_BAD_MASK), r"not a binary mask.*\[2\.0\]"),
    ],
)
def test_load_scan_errors_name_the_file(tmp_path, target, damage, message):
    files = _write_scan(tmp_path, 1, 1)
    damage(files[target])
    scan = find_isbi_cohort(tmp_path).scans[0]

    with pytest.raises(CohortError, match=message) as error:
        load_scan(scan)
    assert str(files[target]) in str(error.value)
    assert "\n" not in str(error.value)


def test_files_not_chosen_are_not_read(tmp_path):
    files = _write_scan(tmp_path, 1, 1)
    _garbage(files["pd"])
    _garbage(files["mask2"])
    assert load_scan(find_isbi_cohort(tmp_path).scans[0]).image.shape == (3, *SHAPE)


def test_load_scan_with_a_modality_the_scan_lacks(tmp_path):
    _write_scan(tmp_path, 1, 1, modalities=("flair", "mprage", "t2"))
    scan = find_isbi_cohort(tmp_path).scans[0]
    with pytest.raises(CohortError, match="training01_01 lacks pd"):
        load_scan(scan, modalities=("flair", "pd"))
