from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from msx.models.data.cohort import MODALITIES, find_isbi_cohort, load_scan
from msx.models.data.synth import write_synthetic_cohort

SHAPE = (48, 56, 48)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic_cohort(root, patients=5, shape=SHAPE, seed=0)


@pytest.fixture(scope="module")
def scans(written):
    """scan id -> (image (4, X, Y, Z) in MODALITIES order, rater 1 mask, rater 2 mask)."""
    cohort = find_isbi_cohort(written[0], modalities=MODALITIES)
    return {
        scan.scan_id: (
            load_scan(scan, MODALITIES, rater=1).image,
            load_scan(scan, ("flair",), rater=1).mask.astype(bool),
            load_scan(scan, ("flair",), rater=2).mask.astype(bool),
        )
        for scan in cohort.scans
    }


def _arrays(paths: list[Path]) -> list[np.ndarray]:
    return [np.asanyarray(nib.load(p).dataobj) for p in paths]


def test_files_are_gzipped_isbi_named_nifti_with_isbi_time_points(written):
    root, paths = written
    assert sorted(paths) == sorted(p for p in root.rglob("*") if p.is_file())
    assert len(paths) == 21 * 6
    assert all(p.read_bytes()[:2] == b"\x1f\x8b" for p in paths)  # gzip magic
    cohort = find_isbi_cohort(root, modalities=MODALITIES)
    timepoints = [len(cohort.scans_of([p])) for p in cohort.patients]
    assert cohort.patients == (1, 2, 3, 4, 5) and timepoints == [4, 4, 5, 4, 4]
    assert all(set(scan.masks) == {1, 2} for scan in cohort.scans)

    flair = nib.load(cohort.scans[0].images["flair"])
    mask = nib.load(cohort.scans[0].masks[2])
    assert flair.shape == SHAPE and flair.get_data_dtype() == np.float32
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(np.abs(np.diag(flair.affine))[:3], 1.0)
    np.testing.assert_allclose(flair.affine, mask.affine)


def test_time_point_pattern_repeats_beyond_five_patients(tmp_path):
    write_synthetic_cohort(tmp_path, patients=7, shape=(16, 16, 16))
    cohort = find_isbi_cohort(tmp_path)
    assert [len(cohort.scans_of([p])) for p in cohort.patients] == [4, 4, 5, 4, 4, 4, 4]


def test_same_seed_same_arrays_other_seed_different(tmp_path):
    shape = (24, 28, 24)
    first = write_synthetic_cohort(tmp_path / "a", patients=2, shape=shape, seed=7)
    again = write_synthetic_cohort(tmp_path / "b", patients=2, shape=shape, seed=7)
    other = write_synthetic_cohort(tmp_path / "c", patients=2, shape=shape, seed=8)
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in again]
    for x, y, z in zip(_arrays(first), _arrays(again), _arrays(other)):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
        assert not np.array_equal(x, z)


def test_a_patient_does_not_depend_on_how_many_are_written(tmp_path):
    shape = (24, 28, 24)
    alone = write_synthetic_cohort(tmp_path / "one", patients=1, shape=shape, seed=2)
    among = write_synthetic_cohort(tmp_path / "three", patients=3, shape=shape, seed=2)
    for x, y in zip(_arrays(alone), _arrays(among[: len(alone)])):
        np.testing.assert_array_equal(x, y)


def test_skull_stripped_background_is_exactly_zero(scans):
    for image, rater1, rater2 in scans.values():
        brain = image[0] > 0
        assert 0.05 < brain.mean() < 0.5
        for channel in image:
            # Every modality is non-zero exactly on the brain, and never negative.
            np.testing.assert_array_equal(channel > 0, brain)
            assert channel.min() == 0.0
        assert not (rater1 & ~brain).any() and not (rater2 & ~brain).any()
        # The brain does not touch the edge of the field of view, so cropping to it is meaningful.
        for axis in range(3):
            assert not np.take(brain, [0, -1], axis=axis).any()


def test_lesions_bright_on_flair_t2_pd_and_dark_on_mprage(scans):
    flair, mprage, t2, pd = (MODALITIES.index(m) for m in ("flair", "mprage", "t2", "pd"))
    for scan_id, (image, lesion, _) in scans.items():
        normal = (image[0] > 0) & ~ndimage.binary_dilation(lesion, iterations=2)
        lesion_mean = image[:, lesion].mean(axis=1)
        normal_mean = image[:, normal].mean(axis=1)
        assert lesion_mean[flair] > 1.5 * normal_mean[flair], scan_id
        assert lesion_mean[t2] > 1.2 * normal_mean[t2], scan_id
        assert lesion_mean[pd] > 1.05 * normal_mean[pd], scan_id
        assert lesion_mean[mprage] < 0.9 * normal_mean[mprage], scan_id


def test_csf_is_dark_on_flair_and_bright_on_t2(scans):
    image, _, _ = scans["training01_01"]
    flair, t2 = image[MODALITIES.index("flair")], image[MODALITIES.index("t2")]
    brain = flair > 0
    # The darkest FLAIR tenth of the brain (CSF) is among the brightest on T2.
    csf_like = brain & (flair < np.percentile(flair[brain], 10))
    assert t2[csf_like].mean() > np.percentile(t2[brain], 75)


def test_lesions_are_a_small_fraction_of_the_brain_and_a_few_voxels_wide(scans):
    for scan_id, (image, lesion, _) in scans.items():
        fraction = lesion.sum() / (image[0] > 0).sum()
        assert 0.002 < fraction < 0.03, scan_id
        labels, count = ndimage.label(lesion)
        assert count >= 3, scan_id
        sizes = np.bincount(labels.ravel())[1:]
        # A sphere of radius 2 voxels holds 33 voxels.
        assert np.median(sizes) >= 20, scan_id


def test_second_rater_differs_from_first_as_raters_do(scans):
    rater1 = np.concatenate([s[1].ravel() for s in scans.values()])
    rater2 = np.concatenate([s[2].ravel() for s in scans.values()])
    assert 0.5 < _dice(rater1, rater2) < 0.95
    assert all(not np.array_equal(r1, r2) for _, r1, r2 in scans.values())
    # Rater 2 both adds and removes voxels, and misses some lesions entirely.
    assert (rater2 & ~rater1).any() and (rater1 & ~rater2).any()
    missed = 0
    for _, r1, r2 in scans.values():
        labels, count = ndimage.label(r1)
        missed += sum(not r2[labels == i].any() for i in range(1, count + 1))
    assert missed > 0


def test_lesions_persist_and_change_over_time(scans):
    appeared = 0
    for patient in range(1, 6):
        masks = [m for scan_id, (_, m, _) in sorted(scans.items()) if scan_id.startswith(f"training{patient:02d}_")]
        for earlier, later in zip(masks, masks[1:]):
            assert _dice(earlier, later) > 0.6  # most lesion voxels persist
        assert not all(np.array_equal(masks[0], m) for m in masks[1:])
        labels, count = ndimage.label(masks[-1])
        appeared += sum(not masks[0][labels == i].any() for i in range(1, count + 1))
    assert appeared > 0  # some lesions are new at follow-up


def test_a_flair_threshold_finds_the_lesions(scans):
    """Learnable: even the crudest classifier separates lesions, so a small network will."""
    for scan_id, (image, lesion, _) in scans.items():
        flair = image[MODALITIES.index("flair")]
        brain = flair > 0
        z = (flair - flair[brain].mean()) / flair[brain].std()
        assert _dice(brain & (z > 2.5), lesion) > 0.6, scan_id


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (8, 16, 16)}, "at least 16"),
        ({"shape": (16, 16)}, "three sizes"),
        ({"patients": 0}, "at least 1"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_cohort(tmp_path, **{"shape": (16, 16, 16), **kwargs})
    assert not any(tmp_path.iterdir())
