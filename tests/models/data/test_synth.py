from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from msx.models.data.baseline import brain_zscore, flair_threshold_baseline
from msx.models.data.cohort import MODALITIES, find_isbi_cohort, load_scan
from msx.models.data.synth import (
    ISBI_SHAPE,
    _template_path,
    grid_affine,
    lesion_locations,
    patient_anatomy,
    write_synthetic_cohort,
)

SHAPE = (48, 56, 48)  # the smoke study's grid
FLAIR, MPRAGE = MODALITIES.index("flair"), MODALITIES.index("mprage")


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


@pytest.fixture(scope="module")
def anatomies():
    return {patient: patient_anatomy(SHAPE, patient, seed=0) for patient in range(1, 6)}


def _normal_white_matter(anatomy, rater1: np.ndarray, rater2: np.ndarray) -> np.ndarray:
    """Voxels mostly white matter and at least 2 voxels from any lesion either rater drew."""
    return anatomy.brain & ~ndimage.binary_dilation(rater1 | rater2, iterations=2) & (anatomy.white_matter > 0.8)


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
    np.testing.assert_allclose(flair.affine, grid_affine(SHAPE))
    np.testing.assert_allclose(flair.affine, mask.affine)
    assert nib.aff2axcodes(flair.affine) == ("R", "A", "S")


def test_the_full_size_grid_is_isbis_mni_box():
    affine = grid_affine(ISBI_SHAPE)
    np.testing.assert_allclose(affine[:3, :3], np.eye(3))
    np.testing.assert_allclose(affine[:3, 3], (-90, -126, -72))  # the 181 x 217 x 181 MNI grid at 1 mm
    # Smaller grids keep 1 mm voxels and the same centre.
    np.testing.assert_allclose(nib.affines.apply_affine(grid_affine((49, 57, 49)), (24, 28, 24)), (0, -18, 18))


def test_missing_template_file_says_to_install_nilearn():
    with pytest.raises(FileNotFoundError, match="install nilearn"):
        _template_path("no-such-map")


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
    for x, y, z in zip(_arrays(first), _arrays(again), _arrays(other), strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
        assert not np.array_equal(x, z)


def test_a_patient_does_not_depend_on_how_many_are_written(tmp_path):
    shape = (24, 28, 24)
    alone = write_synthetic_cohort(tmp_path / "one", patients=1, shape=shape, seed=2)
    among = write_synthetic_cohort(tmp_path / "three", patients=3, shape=shape, seed=2)
    for x, y in zip(_arrays(alone), _arrays(among[: len(alone)]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_anatomy_is_a_brain_with_central_ventricles_and_an_outer_cortex(anatomies):
    brains = []
    for anatomy in anatomies.values():
        brain = anatomy.brain
        brains.append(brain.sum() / anatomy.voxels_per_mm**3 / 1000)  # mL
        np.testing.assert_allclose((anatomy.csf + anatomy.grey_matter + anatomy.white_matter)[brain], 1.0, atol=1e-5)
        ventricles = anatomy.ventricle_distance < 0.5
        assert anatomy.csf[ventricles].mean() > 0.5
        centre = np.array(ndimage.center_of_mass(ventricles))
        assert np.all(np.abs(centre - np.array(ndimage.center_of_mass(brain))) < 0.15 * np.array(SHAPE))
        # Grey matter lies mostly at the surface (cortex), white matter inside it.
        depth = ndimage.distance_transform_edt(brain)
        assert depth[brain & (anatomy.grey_matter > 0.5)].mean() < depth[brain & (anatomy.white_matter > 0.5)].mean()
    assert all(1000 < volume < 2100 for volume in brains)  # an adult brain inside the skull-stripping mask
    assert np.ptp(brains) > 20  # head size varies between patients


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


def test_contrasts_follow_mri_physics_per_modality(scans, anatomies):
    """On average lesions are bright on FLAIR, T2 and PD and darker than white matter on MPRAGE; CSF dark on
    FLAIR and MPRAGE."""
    for scan_id, (image, lesion, _) in scans.items():
        anatomy = anatomies[int(scan_id[8:10])]
        healthy = anatomy.brain & ~ndimage.binary_dilation(lesion, iterations=2)
        mean = {
            name: {
                "lesion": image[MODALITIES.index(name)][lesion].mean(),
                "grey": image[MODALITIES.index(name)][healthy & (anatomy.grey_matter > 0.8)].mean(),
                "white": image[MODALITIES.index(name)][healthy & (anatomy.white_matter > 0.8)].mean(),
                "csf": image[MODALITIES.index(name)][healthy & (anatomy.csf > 0.8)].mean(),
            }
            for name in MODALITIES
        }
        flair, mprage, t2, pd = (mean[name] for name in ("flair", "mprage", "t2", "pd"))
        assert (
            flair["lesion"] > 1.2 * flair["white"] and flair["lesion"] > flair["grey"] > flair["white"] > flair["csf"]
        ), scan_id
        assert mprage["white"] > mprage["grey"] > mprage["csf"] and mprage["white"] > 1.2 * mprage["lesion"], scan_id
        assert mprage["lesion"] > mprage["csf"], scan_id
        assert t2["csf"] > t2["lesion"] > 1.3 * t2["white"] and t2["grey"] > t2["white"], scan_id
        assert pd["lesion"] > 1.1 * pd["white"] and pd["grey"] > pd["white"], scan_id


def test_lesion_count_and_load_are_within_documented_ranges(scans):
    for scan_id, (image, lesion, _) in scans.items():
        fraction = lesion.sum() / (image[0] > 0).sum()
        assert 0.005 < fraction < 0.03, scan_id
        labels, count = ndimage.label(lesion)
        assert 5 <= count <= 30, scan_id
        sizes = np.bincount(labels.ravel())[1:]
        # A sphere of radius 2 voxels holds 33 voxels.
        assert np.median(sizes) >= 20, scan_id


def test_lesions_are_mostly_periventricular_or_juxtacortical(scans, anatomies):
    locations = []
    for scan_id, (_, lesion, _) in scans.items():
        locations += lesion_locations(lesion, anatomies[int(scan_id[8:10])])
    periventricular, juxtacortical = locations.count("periventricular"), locations.count("juxtacortical")
    assert periventricular > juxtacortical > 0
    assert (periventricular + juxtacortical) / len(locations) > 0.75


def test_second_rater_differs_from_first_as_raters_do(scans):
    dices = [_dice(r1, r2) for _, r1, r2 in scans.values()]
    assert 0.6 < np.median(dices) < 0.85 and min(dices) > 0.5
    rater1 = np.concatenate([s[1].ravel() for s in scans.values()])
    rater2 = np.concatenate([s[2].ravel() for s in scans.values()])
    # Rater 2 both adds and removes voxels, and misses some lesions entirely.
    assert (rater2 & ~rater1).any() and (rater1 & ~rater2).any()
    missed = 0
    for _, r1, r2 in scans.values():
        labels, count = ndimage.label(r1)
        missed += sum(not r2[labels == i].any() for i in range(1, count + 1))
    assert missed > 0


def test_raters_disagree_at_borders_and_about_faint_lesions(scans, anatomies):
    disagreeing = explained = 0
    contrast = {"both": [], "one": []}  # lesion FLAIR over normal white matter, by how many raters drew it
    for scan_id, (image, rater1, rater2) in scans.items():
        anatomy = anatomies[int(scan_id[8:10])]
        flair = image[FLAIR]
        white = flair[_normal_white_matter(anatomy, rater1, rater2)]
        borders = np.zeros_like(rater1)
        drawn_once = np.zeros_like(rater1)
        for mask, other in ((rater1, rater2), (rater2, rater1)):
            borders |= ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
            labels, count = ndimage.label(mask)
            for label in range(1, count + 1):
                lesion = labels == label
                seen_by_both = other[lesion].any()
                drawn_once |= lesion & ~seen_by_both
                if mask is rater1 or not seen_by_both:
                    contrast["both" if seen_by_both else "one"].append(flair[lesion].mean() / white.mean())
        disagreement = rater1 ^ rater2
        disagreeing += disagreement.sum()
        explained += (disagreement & (borders | drawn_once)).sum()
    # Almost every voxel they disagree on is on a lesion's border or in a lesion only one of them drew ...
    assert explained / disagreeing > 0.9
    # ... and the lesions only one of them drew are fainter than those both drew.
    assert len(contrast["one"]) >= 10
    assert np.mean(contrast["one"]) < np.mean(contrast["both"])


def test_lesions_persist_and_change_over_time(scans):
    appeared = 0
    for patient in range(1, 6):
        masks = [m for scan_id, (_, m, _) in sorted(scans.items()) if scan_id.startswith(f"training{patient:02d}_")]
        for earlier, later in zip(masks, masks[1:], strict=False):
            assert _dice(earlier, later) > 0.6  # most lesion voxels persist
        assert not all(np.array_equal(masks[0], m) for m in masks[1:])
        labels, count = ndimage.label(masks[-1])
        appeared += sum(not masks[0][labels == i].any() for i in range(1, count + 1))
    assert appeared > 0  # some lesions are new at follow-up


def test_one_flair_threshold_does_not_find_the_lesions(scans):
    """As on real FLAIR: the best single brightness cut misses faint lesions and takes look-alikes."""
    baseline = flair_threshold_baseline((image[FLAIR], rater1) for image, rater1, _ in scans.values())
    assert 0.2 < baseline.mean_dice < 0.65
    assert max(baseline.best_per_scan) < 0.75  # not even with a threshold chosen for each scan


def test_lesions_stand_out_from_the_tissue_around_them(scans, anatomies):
    """Learnable all the same: nearly every lesion is brighter on FLAIR than the tissue just around it, a
    local contrast that a network sees and a global threshold cannot use (a few lie in equally bright caps)."""
    contrasts = []
    for scan_id, (image, rater1, rater2) in scans.items():
        anatomy = anatomies[int(scan_id[8:10])]
        labels, count = ndimage.label(rater1)
        around = anatomy.brain & (anatomy.csf < 0.5) & ~ndimage.binary_dilation(rater1 | rater2)
        for label in range(1, count + 1):
            lesion = labels == label
            shell = ndimage.binary_dilation(lesion, iterations=2) & around
            if shell.sum() >= 5:
                contrasts.append(image[FLAIR][lesion].mean() / image[FLAIR][shell].mean())
    assert len(contrasts) > 100
    contrasts = np.array(contrasts)
    assert np.mean(contrasts > 1.05) > 0.95 and np.mean(contrasts > 1.15) > 0.8


def test_look_alikes_as_bright_as_lesions_lie_outside_them(scans, anatomies):
    """Confounders: outside the lesions, voxels as bright on FLAIR as the median lesion voxel, in grey matter
    and next to the ventricles (caps and bands), add up to a good part of the lesion volume."""
    lesion_voxels = 0
    found = {"grey matter": 0, "periventricular": 0}
    look_alikes = 0
    for scan_id, (image, rater1, rater2) in scans.items():
        anatomy = anatomies[int(scan_id[8:10])]
        z = brain_zscore(image[FLAIR])
        bright = anatomy.brain & ~ndimage.binary_dilation(rater1 | rater2, iterations=2) & (z >= np.median(z[rater1]))
        lesion_voxels += rater1.sum()
        look_alikes += bright.sum()
        periventricular = bright & (anatomy.csf <= 0.5) & (anatomy.ventricle_distance <= 2)
        found["periventricular"] += periventricular.sum()
        found["grey matter"] += (bright & ~periventricular & (anatomy.grey_matter > 0.5)).sum()
    assert look_alikes > 0.3 * lesion_voxels
    assert all(count > 0.1 * look_alikes for count in found.values()), found


def test_some_lesions_are_black_holes_on_mprage_most_are_not(scans, anatomies):
    darkness = []  # each lesion's MPRAGE core over normal white matter
    for scan_id, (image, rater1, rater2) in scans.items():
        anatomy = anatomies[int(scan_id[8:10])]
        mprage = image[MPRAGE]
        white = mprage[_normal_white_matter(anatomy, rater1, rater2)]
        labels, count = ndimage.label(rater1)
        for label in range(1, count + 1):
            core = ndimage.binary_erosion(labels == label)
            darkness.append(mprage[core if core.any() else labels == label].mean() / white.mean())
    darkness = np.array(darkness)
    # Darker than grey matter (0.62 of white matter): black holes, a minority; the rest iso- to mildly hypointense.
    assert 0.05 < np.mean(darkness < 0.62) < 0.4
    assert np.mean(darkness > 0.75) > 0.4


def test_scans_differ_in_intensity_scale_and_bias_field(scans, anatomies):
    """Raw scans have no common unit, and the residual bias field changes from scan to scan (scanner drift)."""
    white_levels, front_to_back = [], []
    for scan_id, (image, rater1, rater2) in scans.items():
        anatomy = anatomies[int(scan_id[8:10])]
        white = _normal_white_matter(anatomy, rater1, rater2)
        flair = image[FLAIR]
        white_levels.append(np.median(flair[white]))
        front, back = white.copy(), white.copy()
        front[:, : SHAPE[1] // 2] = False
        back[:, SHAPE[1] // 2 :] = False
        front_to_back.append(flair[front].mean() / flair[back].mean())
    assert max(white_levels) / min(white_levels) > 1.5
    assert np.std(front_to_back) > 0.02


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
