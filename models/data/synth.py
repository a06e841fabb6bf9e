"""ISBI 2015-shaped synthetic longitudinal MS patients, so that msx runs without the real data.

The real data cannot be shipped, and no maintained library simulates longitudinal MS MRI with two
raters (BrainWeb downloads at run time and has no time course), so the patients are made here on top
of real anatomy: the MNI ICBM152 2009a template (grey and white matter probability maps and the
skull-stripped T1) that nilearn ships inside its wheel, read with nibabel from nilearn's package
folder without importing nilearn. ISBI's preprocessed images live in this MNI space at 1 mm, so the
template cropped to 181 x 217 x 181 is the ISBI grid. Per patient: a smooth random deformation and
head size, and ventricles enlarged by a random amount (atrophy); white-matter lesions, mostly
periventricular and juxtacortical, that persist, grow, shrink or appear over time, from faint to
bright on FLAIR, with fuzzy borders, a minority of them black holes on T1; and the FLAIR look-alikes
that defeat a brightness threshold on real scans: periventricular caps and bands, brighter grey-matter
regions, CSF that escapes suppression and flow artefacts. Per scan: its own intensity scale, noise
level and residual bias field (scanner drift), zero outside the brain like ISBI's skull-stripped
``_pp`` images. Two raters outline each lesion where its contrast reaches their own level, so they
disagree at fuzzy borders and about faint lesions. A smaller shape resamples the same head onto fewer
voxels (written as 1 mm voxels, as the rest of msx expects), with lesions at least 2 voxels in radius
and look-alikes at least a voxel or two wide so that both stay seen.

Anatomy, lesions, confounders, contrasts and raters are separate functions so each can be made more
realistic alone. ``docs/SYNTHETIC.md`` lists the measured statistics, among them the FLAIR threshold
baseline (:mod:`msx.models.data.baseline`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from .cohort import MODALITIES

ISBI_SHAPE = (181, 217, 181)
TIMEPOINT_PATTERN = (4, 4, 5, 4, 4)  # ISBI 2015 training patients 1..5

# nilearn's copy of the template: 197 x 233 x 189 voxels at 1 mm from MNI (-98, -134, -72). The ISBI grid
# (the classic 181 x 217 x 181 MNI box from (-90, -126, -72)) is the crop below.
_TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_TEMPLATE_CROP = (slice(8, 189), slice(8, 225), slice(0, 181))
_ISBI_CENTRE_MM = np.array([0.0, -18.0, 18.0])  # MNI position of the ISBI grid's central voxel

# Relative signal of (CSF, grey matter, white matter, lesion) per sequence, from the usual appearance of
# 3T MS scans: lesions bright on FLAIR/T2/PD and darker than white matter on MPRAGE; CSF nulled on FLAIR.
# The lesion level is that of the brightest lesions: each lesion reaches a random part of the way to it.
_TISSUE_SIGNAL = {
    "flair": (0.12, 0.62, 0.50, 0.92),
    "mprage": (0.25, 0.62, 1.00, 0.45),
    "t2": (1.00, 0.62, 0.45, 0.90),
    "pd": (0.85, 0.85, 0.70, 0.98),
}
_SIGNAL_SCALE = 1000.0

# Confounders: relative signal change per unit of periventricular hyperintensity (caps and bands: more
# water, so bright on FLAIR, T2 and PD and about iso on MPRAGE) and of a brighter grey matter region
# (insula, cingulate and mesial temporal cortex are brighter than the rest on FLAIR).
_PERIVENTRICULAR_EFFECT = {"flair": 1.0, "mprage": -0.04, "t2": 0.6, "pd": 0.3}
_GREY_BOOST_EFFECT = {"flair": 1.0, "mprage": 0.0, "t2": 0.4, "pd": 0.2}

# Acquisition, drawn per scan (so per time point: scanner drift) and per sequence.
_GAIN_RANGE = (0.5, 2.0)  # intensity scale, log-uniform: raw scans have no common unit
_NOISE_RANGE = (0.02, 0.05)  # Rician noise sigma as a fraction of white-matter signal
_BIAS_RANGE = (0.04, 0.12)  # amplitude of the residual bias field's logarithm (ISBI images are bias-corrected)

_CORTEX_DEPTH_MM = 25.0  # grey matter closer than this to the brain surface is cortex; deep nuclei lie deeper
_NEAR_MM = 3.0  # a lesion this close to the ventricles or the cortex is periventricular or juxtacortical
_LOCATION_ODDS = {"periventricular": 0.5, "juxtacortical": 0.3, "deep": 0.2}

_MIN_LESION_RADIUS = 2.0  # voxels: smaller lesions vanish at coarse grids and cannot be learned
_LESION_MEDIAN_RADIUS_MM = 2.0
_MAX_LESION_LOAD = (0.01, 0.03)  # range of lesion voxels / brain voxels at the largest extent


@dataclass(frozen=True)
class _Rater:
    """How an expert draws: the faintest lesion contrast they outline (a fraction of the brightest lesions'),
    which also sets where on a fuzzy border they put the outline, and how often they overlook a small lesion."""

    contrast: float
    lapse: float


# Two raters of similar skill; each one's contrast level varies by about a third from lesion to lesion and a
# little between time points.
_RATERS = (_Rater(contrast=0.25, lapse=0.05), _Rater(contrast=0.28, lapse=0.12))
_RATER_SPREAD = 0.35  # log-sd of a rater's contrast level between lesions
_RATER_JITTER = 0.1  # log-sd of the same between time points, for one lesion


@dataclass(frozen=True)
class Anatomy:
    """Tissue fractions of one patient on the output grid; white matter is the rest of the brain."""

    brain: np.ndarray  # bool
    csf: np.ndarray  # float32 in [0, 1]
    grey_matter: np.ndarray  # float32 in [0, 1]
    ventricle_distance: np.ndarray  # float32, voxels to the nearest lateral ventricle voxel (0 inside)
    cortex_distance: np.ndarray  # float32, voxels to the nearest cortical grey matter voxel (0 inside)
    voxels_per_mm: float

    @property
    def white_matter(self) -> np.ndarray:
        return np.where(self.brain, 1.0 - self.csf - self.grey_matter, 0.0).astype(np.float32)


@dataclass(frozen=True)
class _Lesion:
    """One lesion's shape (an irregular union of ellipsoidal lobes) and its course over time."""

    center: np.ndarray  # voxel coordinates
    rotation: np.ndarray  # rows: the lobes' principal axes
    radii: np.ndarray  # voxels, at scale 1
    lobe_offsets: np.ndarray  # (k, 3) in units of radii; the first lobe is at the centre
    lobe_sizes: np.ndarray  # (k,) relative
    ripple_directions: np.ndarray  # (m, 3) unit vectors that make the border irregular
    ripple_cycles: np.ndarray  # (m,)
    ripple_phases: np.ndarray  # (m,)
    ripple_amplitude: float
    strength: float  # contrast on FLAIR, T2 and PD: the fraction of the way to the brightest lesions' signal
    fuzz: float  # voxels: width of the border's ramp from background to full lesion signal (partial volume)
    t1_darkness: float  # how far towards the lesion signal it darkens MPRAGE: iso-intense to a black hole
    rater_bias: tuple[float, ...]  # per rater: log-factor of their contrast level for this lesion, kept over time
    onset: int  # first time point index at which it is visible
    growth: float  # relative change of its radius per time point

    def scale_at(self, timepoint: int) -> float:
        """Radius scale at a time point; 0 before onset and once it has resolved."""
        if timepoint < self.onset:
            return 0.0
        scale = 1.0 + self.growth * (timepoint - self.onset)
        return scale if scale >= 0.55 else 0.0  # shrunk to about half its size: resolved


def write_synthetic_cohort(
    out_dir: str | Path,
    patients: int = 5,
    shape: tuple[int, int, int] = ISBI_SHAPE,
    seed: int = 0,
) -> list[Path]:
    """Write ISBI-named gzipped NIfTI files (4 modalities, rater 1 and 2 masks per scan); returns their paths.

    The layout copies the ISBI training archive: ``trainingPP/preprocessed/trainingPP_TT_<modality>_pp.nii.gz``
    and ``trainingPP/masks/trainingPP_TT_mask<rater>.nii.gz``. Patients get 4/4/5/4/4 time points (the
    pattern repeats beyond five). The same seed gives identical files, and patient p does not depend
    on how many patients are written. Needs nilearn installed (for its template files).
    """
    shape = _checked(shape, patients, seed)
    out_dir = Path(out_dir)
    affine = grid_affine(shape)
    written: list[Path] = []
    for patient in range(1, patients + 1):
        patient_rng = np.random.default_rng([seed, patient])
        n_timepoints = TIMEPOINT_PATTERN[(patient - 1) % len(TIMEPOINT_PATTERN)]
        anatomy = patient_anatomy(shape, patient, seed)
        lesions = _lesion_course(anatomy, n_timepoints, patient_rng)
        confounders = _patient_confounders(anatomy, patient_rng)
        folder = out_dir / f"training{patient:02d}"
        for timepoint in range(n_timepoints):
            scan_rng = np.random.default_rng([seed, patient, timepoint + 1])
            lesion_weight, t1_weight, masks = _lesions_at(lesions, timepoint, anatomy, scan_rng)
            images = _modalities(anatomy, confounders, lesion_weight, t1_weight, scan_rng)
            stem = f"training{patient:02d}_{timepoint + 1:02d}"
            for name in MODALITIES:
                written.append(_save(images[name], affine, folder / "preprocessed" / f"{stem}_{name}_pp.nii.gz"))
            for rater, mask in enumerate(masks, start=1):
                written.append(_save(mask.astype(np.uint8), affine, folder / "masks" / f"{stem}_mask{rater}.nii.gz"))
    return written


def grid_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """RAS affine of the written files: 1 mm voxels, the grid's centre at the ISBI grid's centre in MNI space.

    At ISBI_SHAPE this is the ISBI grid itself (origin at MNI (-90, -126, -72)).
    """
    affine = np.eye(4)
    affine[:3, 3] = _ISBI_CENTRE_MM - (np.asarray(shape) - 1) / 2
    return affine


def patient_anatomy(shape: tuple[int, int, int], patient: int, seed: int = 0) -> Anatomy:
    """The anatomy of synthetic patient ``patient`` (from 1) as :func:`write_synthetic_cohort` draws it."""
    shape = _checked(shape, patient, seed)
    rng = np.random.default_rng([seed, patient, 0])  # scans use [seed, patient, t >= 1], lesions [seed, patient]
    template = _template(shape)
    grid_mm = (np.asarray(ISBI_SHAPE) - 1) / (np.asarray(shape) - 1)  # template mm per output voxel, per axis
    voxels_per_mm = float(1 / grid_mm.mean())

    # Head size varies by a few percent; a smooth displacement of a few mm bends the anatomy.
    axes = _unit_axes(shape)
    scale = rng.uniform(0.94, 1.04, size=3)
    warp_mm = rng.uniform(1.5, 3.5)
    centre = (np.asarray(shape) - 1) / 2
    template_centre = (np.asarray(ISBI_SHAPE) - 1) / 2
    coordinates = np.stack(
        [
            np.broadcast_to(
                np.float32(template_centre[axis])
                + (np.arange(size, dtype=np.float32) - np.float32(centre[axis])).reshape(axes[axis].shape)
                * np.float32(grid_mm[axis] / scale[axis]),
                shape,
            )
            + np.float32(warp_mm) * _smooth_field(axes, rng, terms=6, max_cycles=2.0)
            for axis, size in enumerate(shape)
        ]
    )
    # Beyond the template's box the maps continue as at its faces: background, and distances that stay large.
    warped = {
        name: ndimage.map_coordinates(volume, coordinates, order=1, mode="nearest") for name, volume in template.items()
    }
    del coordinates

    brain = warped["brain"] > 0.5
    # The outer layer of voxels stays background, as skull stripping cuts the medulla short of the image edge.
    edge = max(1, round(4 * voxels_per_mm))
    interior = np.zeros(shape, dtype=bool)
    interior[edge:-edge, edge:-edge, edge:-edge] = True
    brain &= interior
    grey = np.clip(warped["grey_matter"], 0.0, 1.0)
    white = np.clip(warped["white_matter"], 0.0, 1.0 - grey)
    ventricle_distance = np.maximum(warped["ventricle_distance"], 0.0) * np.float32(voxels_per_mm)

    # Atrophy: the ventricles widen by up to a few mm into the surrounding tissue, whose fractions shrink.
    widening_mm = rng.uniform(0.0, 3.0)
    widened = special.expit((np.float32(widening_mm * voxels_per_mm) - ventricle_distance) / np.float32(0.6))
    widened *= np.float32(widening_mm > 0)
    tissue_kept = 1.0 - widened
    grey = np.where(brain, grey * tissue_kept, 0.0).astype(np.float32)
    white = np.where(brain, white * tissue_kept, 0.0).astype(np.float32)
    csf = np.where(brain, 1.0 - grey - white, 0.0).astype(np.float32)
    ventricle_distance = np.maximum(ventricle_distance - np.float32(widening_mm * voxels_per_mm), 0.0)
    return Anatomy(
        brain=brain,
        csf=csf,
        grey_matter=grey,
        ventricle_distance=ventricle_distance.astype(np.float32),
        cortex_distance=(np.maximum(warped["cortex_distance"], 0.0) * np.float32(voxels_per_mm)).astype(np.float32),
        voxels_per_mm=voxels_per_mm,
    )


def lesion_locations(mask: np.ndarray, anatomy: Anatomy) -> list[str]:
    """Location of each lesion (3-D 6-connected component) of ``mask``, in label order.

    Periventricular if it comes within 3 mm of a lateral ventricle, else juxtacortical if within 3 mm of
    the cortex, else deep white matter (at least 1.5 voxels at coarse grids, where 3 mm is under a voxel).
    """
    near = max(_NEAR_MM * anatomy.voxels_per_mm, 1.5)
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    ventricle = ndimage.minimum(anatomy.ventricle_distance, labels, index)
    cortex = ndimage.minimum(anatomy.cortex_distance, labels, index)
    return [
        "periventricular" if v <= near else "juxtacortical" if c <= near else "deep"
        for v, c in zip(np.atleast_1d(ventricle), np.atleast_1d(cortex), strict=True)
    ]


def _checked(shape, patients: int, seed: int) -> tuple[int, int, int]:
    shape = tuple(int(size) for size in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return shape  # type: ignore[return-value]


def _template_path(name: str) -> Path:
    """A template file inside the installed nilearn package, found without importing nilearn (which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / _TEMPLATE_FILE.format(name)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the synthetic cohort's anatomy comes from the MNI ICBM152 template that nilearn ships "
        f"({_TEMPLATE_FILE.format(name)}), which was not found: install nilearn (pip install nilearn)"
    )


@functools.lru_cache(maxsize=1)
def _isbi_template() -> dict[str, np.ndarray]:
    """Template maps on the ISBI grid: brain, grey and white matter fractions, and distances in mm to the
    lateral ventricles and to the cortex. Cached (read-only) because every patient samples the same maps."""
    t1, grey, white = (
        np.asarray(nib.load(_template_path(name)).dataobj)[_TEMPLATE_CROP].astype(np.float32) / np.float32(255)
        for name in ("t1", "gm", "wm")
    )
    brain = t1 > 0  # the template T1 is skull-stripped
    csf = np.where(brain, np.clip(1.0 - grey - white, 0.0, 1.0), 0.0)
    depth = ndimage.distance_transform_edt(brain)
    # Lateral ventricles: the two largest deep CSF pools; the opening cuts the thin midline fissure off them.
    deep_csf = ndimage.binary_opening(csf > 0.5, iterations=2) & (depth > 15)
    labels, _ = ndimage.label(deep_csf)
    largest = np.argsort(np.bincount(labels.ravel())[1:])[::-1][:2] + 1
    ventricles = np.isin(labels, largest)
    cortex = (grey > 0.5) & (depth < _CORTEX_DEPTH_MM)
    maps = {
        "brain": brain.astype(np.float32),
        "grey_matter": grey,
        "white_matter": white,
        "ventricle_distance": ndimage.distance_transform_edt(~ventricles).astype(np.float32),
        "cortex_distance": ndimage.distance_transform_edt(~cortex).astype(np.float32),
    }
    for volume in maps.values():
        volume.flags.writeable = False
    return maps


@functools.lru_cache(maxsize=1)
def _template(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The ISBI-grid template maps, smoothed for sampling onto ``shape``."""
    maps = _isbi_template()
    # Coarser grids average over their larger voxels (partial volume) instead of aliasing the folds.
    sigma = [0.4 * (full - 1) / (size - 1) for full, size in zip(ISBI_SHAPE, shape, strict=True)]
    if max(sigma) <= 0.5:
        return maps
    smoothed = {name: ndimage.gaussian_filter(volume, sigma) for name, volume in maps.items()}
    for volume in smoothed.values():
        volume.flags.writeable = False
    return smoothed


def _save(volume: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def _unit_axes(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Per-axis coordinates in [-1, 1], shaped to broadcast."""
    axes = []
    for axis, size in enumerate(shape):
        coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        axes.append(coords.reshape([size if a == axis else 1 for a in range(3)]))
    return axes


def _smooth_field(axes: list[np.ndarray], rng: np.random.Generator, terms: int, max_cycles: float) -> np.ndarray:
    """A smooth random field of about unit variance: a sum of separable low-frequency cosine products.

    Separable terms cost one full-volume multiply each, far cheaper than filtering white noise.
    """
    field = np.zeros(np.broadcast_shapes(*(a.shape for a in axes)), dtype=np.float32)
    for _ in range(terms):
        factors = [
            np.cos(np.float32(math.pi * rng.uniform(0.25, max_cycles)) * a + np.float32(rng.uniform(0, 2 * math.pi)))
            for a in axes
        ]
        field += (factors[0] * factors[1]) * factors[2]
    return field * np.float32(math.sqrt(8.0 / terms))  # each product of three random cosines has variance 1/8


def _lesion_centres(anatomy: Anatomy, count: int, rng: np.random.Generator) -> np.ndarray:
    """Voxel coordinates of ``count`` lesion centres in white matter, by location: about half next to the
    ventricles, a third next to the cortex, the rest in deep white matter, as MS lesions are."""
    mm = anatomy.voxels_per_mm
    white = anatomy.white_matter
    ventricle, cortex = anatomy.ventricle_distance, anatomy.cortex_distance
    candidates = {
        "periventricular": np.flatnonzero((white > 0.5) & (ventricle > 0) & (ventricle <= max(5 * mm, 1.5))),
        "juxtacortical": np.flatnonzero(
            (white > 0.5) & (cortex > 0) & (cortex <= max(4 * mm, 1.5)) & (ventricle > max(10 * mm, 3))
        ),
        "deep": np.flatnonzero((white > 0.8) & (ventricle > max(8 * mm, 3)) & (cortex > max(6 * mm, 2))),
    }
    fallback = np.flatnonzero(white > 0.5)
    if fallback.size == 0:  # a grid too coarse for white matter to fill a voxel
        fallback = np.flatnonzero(anatomy.brain)
    kinds = rng.choice(list(_LOCATION_ODDS), size=count, p=list(_LOCATION_ODDS.values()))
    chosen = np.array(
        [rng.choice(candidates[kind] if candidates[kind].size else fallback) for kind in kinds], dtype=np.int64
    )
    return np.stack(np.unravel_index(chosen, anatomy.brain.shape), axis=1) + rng.uniform(-0.5, 0.5, size=(count, 3))


def _lesion_course(anatomy: Anatomy, n_timepoints: int, rng: np.random.Generator) -> list[_Lesion]:
    """A patient's lesions over all time points: most present at baseline, a few new ones later."""
    onsets = [0] * int(rng.integers(25, 60))
    for timepoint in range(1, n_timepoints):
        onsets += [timepoint] * int(rng.poisson(2.0))
    centers = _lesion_centres(anatomy, len(onsets), rng)

    lesions = []
    for center, onset in zip(centers, onsets, strict=True):
        radius = np.clip(rng.lognormal(math.log(_LESION_MEDIAN_RADIUS_MM), 0.45), 1.5, 7.0) * anatomy.voxels_per_mm
        n_lobes = int(rng.integers(1, 4))
        n_ripples = 4
        ripple_directions = rng.normal(size=(n_ripples, 3))
        # Borders blur over about 1 to 2.5 mm, or a good part of the radius: big lesions have wide, fuzzy edges.
        fuzz = max(
            rng.uniform(1.0, 2.5) * anatomy.voxels_per_mm, rng.uniform(0.3, 0.7) * max(radius, _MIN_LESION_RADIUS)
        )
        lesions.append(
            _Lesion(
                center=center,
                rotation=np.linalg.qr(rng.normal(size=(3, 3)))[0],
                radii=radius * np.array([rng.uniform(1.0, 1.7), 1.0, rng.uniform(0.8, 1.0)]),
                lobe_offsets=np.vstack([np.zeros(3), rng.uniform(-0.9, 0.9, size=(n_lobes - 1, 3))]),
                lobe_sizes=np.concatenate([[1.0], rng.uniform(0.5, 0.9, size=n_lobes - 1)]),
                ripple_directions=ripple_directions / np.linalg.norm(ripple_directions, axis=1, keepdims=True),
                ripple_cycles=rng.uniform(1.0, 3.0, size=n_ripples),
                ripple_phases=rng.uniform(0, 2 * math.pi, size=n_ripples),
                ripple_amplitude=rng.uniform(0.03, 0.08),
                # From faint (about grey matter's level on FLAIR) to bright, most in between.
                strength=float(np.clip(rng.lognormal(math.log(0.55), 0.45), 0.15, 1.0)),
                fuzz=max(fuzz, 0.6),
                # A quarter are black holes on T1; the rest are iso- to mildly hypointense.
                t1_darkness=rng.uniform(0.6, 1.0) if rng.random() < 0.25 else rng.uniform(0.0, 0.35),
                rater_bias=tuple(rng.normal(0.0, _RATER_SPREAD, size=len(_RATERS))),
                onset=onset,
                growth=_growth_rate(rng),
            )
        )
    return _within_load(lesions, anatomy, n_timepoints, rng)


def _growth_rate(rng: np.random.Generator) -> float:
    """Relative radius change per time point (about a year): a quarter of lesions grow, a fifth shrink, the
    rest hold."""
    course = rng.choice(("growing", "shrinking", "stable"), p=(0.25, 0.2, 0.55))
    low, high = {"growing": (0.06, 0.15), "shrinking": (-0.18, -0.08), "stable": (-0.03, 0.03)}[course]
    return rng.uniform(low, high)


def _within_load(
    lesions: list[_Lesion], anatomy: Anatomy, n_timepoints: int, rng: np.random.Generator
) -> list[_Lesion]:
    """Drop random lesions until the largest expected lesion load is below a per-patient cap.

    At 1 mm the cap rarely binds; at coarse grids, where lesions are held at 2 voxels in radius and so
    grow relative to the brain, it keeps the lesion load a few percent of the brain.
    """
    cap = rng.uniform(*_MAX_LESION_LOAD) * np.count_nonzero(anatomy.brain)
    volumes = []
    for lesion in lesions:
        largest = max(lesion.scale_at(t) for t in range(n_timepoints))
        radii = np.maximum(lesion.radii * largest, _MIN_LESION_RADIUS)
        volumes.append(4 / 3 * math.pi * float(np.prod(radii)) * float(np.sum(lesion.lobe_sizes**3)))
    kept = list(rng.permutation(len(lesions)))
    # One clearly visible lesion present at every time point goes last in line to be dropped, so that no scan
    # is lesion-free.
    persistent = [i for i in kept if lesions[i].onset == 0 and lesions[i].growth >= 0 and lesions[i].strength >= 0.6]
    if persistent:
        kept.remove(persistent[0])
        kept.insert(0, persistent[0])
    while len(kept) > 1 and sum(volumes[i] for i in kept) > cap:
        kept.pop()
    return [lesions[i] for i in sorted(kept)]


def _lesions_at(
    lesions: list[_Lesion], timepoint: int, anatomy: Anatomy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """At a time point: lesion weight on FLAIR/T2/PD and on MPRAGE (float32 in [0, 1], fuzzy borders) and
    each rater's mask (bool).

    A rater outlines a lesion where its contrast reaches the rater's level for it: bright lesions out to
    the foot of their fuzzy border, faint ones tighter, and the faintest not at all. So raters disagree
    most at borders and about faint lesions, as real ones do.
    """
    shape = anatomy.brain.shape
    weight = np.zeros(shape, dtype=np.float32)
    t1_weight = np.zeros(shape, dtype=np.float32)
    masks = tuple(np.zeros(shape, dtype=bool) for _ in _RATERS)
    small = 3.0 * anatomy.voxels_per_mm  # radius below which a lesion is small enough to overlook
    for lesion in lesions:
        scale = lesion.scale_at(timepoint)
        if scale == 0.0:
            continue
        box, depth = _rasterise(lesion, scale, shape)
        profile = np.clip(depth / np.float32(lesion.fuzz) + np.float32(0.5), 0.0, 1.0)
        weight[box] = np.maximum(weight[box], profile * np.float32(lesion.strength))
        t1_weight[box] = np.maximum(t1_weight[box], profile * np.float32(lesion.t1_darkness))
        for rater, bias, mask in zip(_RATERS, lesion.rater_bias, masks, strict=True):
            level = rater.contrast * math.exp(bias + rng.normal(0.0, _RATER_JITTER)) / lesion.strength
            overlooked = float(np.mean(lesion.radii)) * scale < small and rng.random() < rater.lapse
            if level < 0.9 and not overlooked:
                mask[box] |= depth >= np.float32(lesion.fuzz * (level - 0.5))
    # Lesions do not grow into CSF; raters do not draw the specks that CSF leaves of a lesion's rim, smaller
    # than a sphere 3 mm across.
    not_csf = np.where(anatomy.brain, 1.0 - anatomy.csf, 0.0).astype(np.float32)
    speck = max(14 * anatomy.voxels_per_mm**3, 2)
    for mask in masks:
        mask &= not_csf >= 0.5
        labels, _ = ndimage.label(mask)
        mask &= (np.bincount(labels.ravel()) >= speck)[labels]
    return weight * not_csf, t1_weight * not_csf, masks


def _rasterise(lesion: _Lesion, scale: float, shape) -> tuple[tuple[slice, ...], np.ndarray]:
    """The lesion's signed depth in voxels (positive inside, 0 on its border) inside a box around it."""
    radii = np.maximum(lesion.radii * scale, _MIN_LESION_RADIUS)
    reach = float(radii.max()) * (1.0 + np.abs(lesion.lobe_offsets).max() + 3 * lesion.ripple_amplitude)
    reach += lesion.fuzz + 2
    box = tuple(
        slice(max(int(c - reach), 0), min(int(math.ceil(c + reach)) + 1, size))
        for c, size in zip(lesion.center, shape, strict=True)
    )
    offsets = [
        np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]) - np.float32(c)
        for axis, (s, c) in enumerate(zip(box, lesion.center, strict=True))
    ]
    # Coordinates in the lesion frame, in units of its radii.
    local = [
        sum(np.float32(lesion.rotation[row, axis]) * offsets[axis] for axis in range(3)) / np.float32(radii[row])
        for row in range(3)
    ]
    radius = np.min(
        [
            np.sqrt(sum((local[a] - np.float32(offset[a])) ** 2 for a in range(3))) / np.float32(size)
            for offset, size in zip(lesion.lobe_offsets, lesion.lobe_sizes, strict=True)
        ],
        axis=0,
    )
    norm = np.sqrt(sum(component**2 for component in local)) + np.float32(1e-6)
    border = 1.0 + sum(
        np.float32(lesion.ripple_amplitude)
        * np.cos(
            np.float32(math.pi * cycles) * sum(np.float32(d[a]) * local[a] for a in range(3)) / norm
            + np.float32(phase)
        )
        for d, cycles, phase in zip(lesion.ripple_directions, lesion.ripple_cycles, lesion.ripple_phases, strict=True)
    )
    return box, ((border - radius) * np.float32(np.mean(radii))).astype(np.float32)


@dataclass(frozen=True)
class _Confounders:
    """A patient's FLAIR look-alikes of lesions, as maps on the output grid (float32, 0 where absent)."""

    periventricular: np.ndarray  # caps at the ventricles' horns and a thin band along them, in [0, 1]
    grey_boost: np.ndarray  # relative extra signal of grey matter in some regions
    csf_leak: np.ndarray  # in [0, 1]: where CSF tends to escape suppression on FLAIR (inferiorly, patchily)
    strength: float  # how bright the periventricular hyperintensity is, relative to white matter


def _patient_confounders(anatomy: Anatomy, rng: np.random.Generator) -> _Confounders:
    """What a FLAIR threshold mistakes for lesions in this patient: periventricular caps and bands, brighter
    cortex regions, and CSF that the inversion does not fully null."""
    mm = anatomy.voxels_per_mm
    shape = anatomy.brain.shape
    axes = _unit_axes(shape)
    distance = anatomy.ventricle_distance

    def plateau(width_mm: float, least_voxels: float) -> np.ndarray:
        # Full strength out to half the width, then fading to nothing at 1.5 widths; at least a voxel or two
        # wide on coarse grids, as lesions are held at 2 voxels, so that it stays seen.
        width = np.float32(max(width_mm * mm, least_voxels))
        return np.clip(np.float32(1.5) - distance / width, 0.0, 1.0)

    # A thin band lining the ventricles, patchy along them (where it thickens it looks like confluent lesions).
    patches = np.clip(np.float32(0.6) + np.float32(0.8) * _smooth_field(axes, rng, terms=6, max_cycles=4.0), 0.0, 1.0)
    band = plateau(rng.uniform(1.0, 2.0), rng.uniform(0.7, 1.2)) * patches * np.float32(rng.uniform(0.5, 0.9))
    # Caps: wider hyperintensity at the front and back ends (the frontal and occipital horns).
    ventricles = distance < 0.5
    ends = np.flatnonzero(ventricles.any(axis=(0, 2)))
    span = np.float32(max(0.2 * (ends[-1] - ends[0]), 2.0))
    y = np.arange(shape[1], dtype=np.float32).reshape(1, -1, 1)
    horns = np.clip((y - (ends[-1] - span)) / span, 0, 1) + np.clip(((ends[0] + span) - y) / span, 0, 1)
    caps = plateau(rng.uniform(2.0, 4.0), rng.uniform(1.0, 2.0)) * horns
    periventricular = np.where(distance > 0, np.maximum(band, caps), 0.0)
    grey_boost = np.float32(rng.uniform(0.06, 0.22)) * np.clip(
        np.float32(0.6) * _smooth_field(axes, rng, terms=8, max_cycles=5.0) - np.float32(0.2), 0.0, 1.5
    )
    inferior = np.clip(np.float32(0.1) - np.float32(1.2) * axes[2], 0.0, 1.0)
    leak = np.float32(0.5) * _smooth_field(axes, rng, terms=4, max_cycles=2.0) + np.float32(0.7) * inferior
    csf_leak = np.clip(leak - np.float32(0.2), 0.0, 1.0)
    return _Confounders(
        periventricular=periventricular.astype(np.float32),
        grey_boost=grey_boost.astype(np.float32),
        csf_leak=csf_leak.astype(np.float32),
        strength=float(rng.uniform(0.6, 1.0)),
    )


def _flow_artefacts(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """CSF pulsation artefacts of one scan on FLAIR: a few bright spots inside the ventricles, as CSF signal
    relative to white matter's (1.4 to 2.2 at their centres, 0 elsewhere)."""
    shape = anatomy.brain.shape
    spots = np.zeros(shape, dtype=np.float32)
    candidates = np.flatnonzero((anatomy.ventricle_distance < 0.5) & (anatomy.csf > 0.7))
    if candidates.size == 0:
        return spots
    for index in rng.choice(candidates, size=int(rng.integers(2, 7))):
        centre = np.array(np.unravel_index(index, shape), dtype=np.float32)
        radius = max(rng.uniform(1.5, 4.0) * anatomy.voxels_per_mm, 1.2)
        reach = int(math.ceil(2 * radius))
        box = tuple(
            slice(max(int(c) - reach, 0), min(int(c) + reach + 1, size)) for c, size in zip(centre, shape, strict=True)
        )
        squared = sum(
            (np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]) - c) ** 2
            for axis, (s, c) in enumerate(zip(box, centre, strict=True))
        )
        spot = np.exp(-squared / np.float32(2 * radius**2)) * np.float32(rng.uniform(1.4, 2.2))
        spots[box] = np.maximum(spots[box], spot)
    return spots


def _modalities(
    anatomy: Anatomy,
    confounders: _Confounders,
    lesion_weight: np.ndarray,
    t1_weight: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """FLAIR, MPRAGE, T2 and PD images of one scan: tissue mixtures with the patient's confounders, a scan's
    own intensity scale, bias field and Rician noise; 0 outside the brain."""
    axes = _unit_axes(anatomy.brain.shape)
    brain = anatomy.brain
    csf, grey = anatomy.csf[brain], anatomy.grey_matter[brain]
    white = 1.0 - csf - grey
    # Per time point, the confounders drift: how well CSF is nulled, where flow shows, how bright caps are.
    periventricular = confounders.periventricular[brain] * np.float32(confounders.strength * rng.uniform(0.85, 1.15))
    grey_weight = confounders.grey_boost[brain] * np.minimum(grey / np.float32(0.6), 1)
    grey_weight *= np.float32(rng.uniform(0.85, 1.15))
    # CSF's FLAIR signal relative to white matter's where it escapes suppression, and in flow artefacts.
    unsuppressed = np.maximum(
        confounders.csf_leak[brain] * np.float32(rng.uniform(0.6, 1.5)), _flow_artefacts(anatomy, rng)[brain]
    )
    noise = rng.uniform(*_NOISE_RANGE)
    images = {}
    for name in MODALITIES:
        lesion = (t1_weight if name == "mprage" else lesion_weight)[brain]
        gain = _SIGNAL_SCALE * math.exp(rng.uniform(*np.log(_GAIN_RANGE)))
        csf_signal, grey_signal, white_signal, lesion_signal = (
            np.float32(gain * level * rng.uniform(0.94, 1.06)) for level in _TISSUE_SIGNAL[name]
        )
        csf_level = csf_signal
        if name == "flair":
            csf_level = np.maximum(csf_signal, unsuppressed * white_signal)
        # Periventricular hyperintensity lies in whatever tissue lines the ventricles (white matter, caudate,
        # thalamus). A bright grey-matter region brightens a voxel in proportion to its grey matter, in full
        # from 60 % on, so that cortex stays bright on coarse grids, where few voxels are pure grey matter.
        tissue = csf * csf_level + (grey * grey_signal + white * white_signal) * (
            1
            + periventricular * np.float32(_PERIVENTRICULAR_EFFECT[name])
            + grey_weight * np.float32(_GREY_BOOST_EFFECT[name])
        )
        clean = tissue + lesion * (lesion_signal - tissue)
        bias = np.float32(rng.uniform(*_BIAS_RANGE))
        clean *= np.exp(bias * _smooth_field(axes, rng, terms=4, max_cycles=1.0))[brain]
        sigma = np.float32(noise * rng.uniform(0.8, 1.2)) * white_signal
        real = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
        image = np.zeros(brain.shape, dtype=np.float32)
        # Strictly positive inside the brain so that "non-zero" means "brain" to foreground cropping.
        image[brain] = np.maximum(np.sqrt(real**2 + imaginary**2), np.float32(1e-3))
        images[name] = image
    return images
