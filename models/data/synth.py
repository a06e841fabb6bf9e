"""ISBI 2015-shaped synthetic longitudinal MS patients, so that msx runs without the real data.

The real data cannot be shipped, and no maintained library simulates longitudinal MS MRI with two
raters (BrainWeb downloads at run time and has no time course), so the phantom is drawn here:
a skull-stripped brain (zero outside, like ISBI's preprocessed images) with cortex, deep grey
matter, white matter and ventricles, warped by a smooth random deformation per patient;
white-matter lesions, mostly periventricular, that persist, grow, shrink or appear over time;
qualitative MRI contrasts with Rician noise and a residual bias field; and a second rater who draws
some borders wider or tighter and misses some small lesions.

Anatomy, lesions, contrasts and raters are separate functions so each can be made more realistic alone.
Arrays are float32 and built with broadcasting, so a full 181 x 217 x 181 cohort takes about a minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

from .cohort import MODALITIES

ISBI_SHAPE = (181, 217, 181)
TIMEPOINT_PATTERN = (4, 4, 5, 4, 4)  # ISBI 2015 training patients 1..5

# Relative signal of (CSF, grey matter, white matter, lesion) per sequence, from the usual appearance of
# 3T MS scans: lesions bright on FLAIR/T2/PD and darker than white matter on MPRAGE; CSF nulled on FLAIR.
_TISSUE_SIGNAL = {
    "flair": (0.12, 0.62, 0.50, 1.15),
    "mprage": (0.25, 0.62, 1.00, 0.55),
    "t2": (1.00, 0.62, 0.45, 0.90),
    "pd": (0.85, 0.85, 0.70, 0.98),
}
_SIGNAL_SCALE = 1000.0
_NOISE_FRACTION = 0.025  # Rician noise sigma as a fraction of white-matter signal
_EDGE_VOXELS = 0.6  # width of partial-volume transitions between tissues

_MIN_LESION_RADIUS = 2.0  # voxels: smaller lesions vanish at coarse grids and cannot be learned
_LESION_EDGE_VOXELS = 1.0
_LESION_MEDIAN_RADIUS_MM = 2.8
_MAX_LESION_LOAD = (0.01, 0.03)  # range of lesion voxels / brain voxels at the largest extent


@dataclass(frozen=True)
class _Anatomy:
    """Tissue fractions of one patient; white matter is the rest of the brain."""

    brain: np.ndarray  # bool
    csf: np.ndarray  # float32 in [0, 1]
    grey_matter: np.ndarray  # float32 in [0, 1]
    ventricle_distance: np.ndarray  # float32, ellipsoidal distance to the ventricles' centres (1 = wall)

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
    strength: float  # how fully the lesion reaches the lesion signal
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
    on how many patients are written.
    """
    shape = tuple(int(size) for size in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")

    out_dir = Path(out_dir)
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2  # 1 mm RAS grid centred on the volume
    written: list[Path] = []
    for patient in range(1, patients + 1):
        patient_rng = np.random.default_rng([seed, patient])
        n_timepoints = TIMEPOINT_PATTERN[(patient - 1) % len(TIMEPOINT_PATTERN)]
        anatomy = _anatomy(shape, patient_rng)
        lesions = _lesion_course(anatomy, n_timepoints, patient_rng)
        folder = out_dir / f"training{patient:02d}"
        for timepoint in range(n_timepoints):
            scan_rng = np.random.default_rng([seed, patient, timepoint + 1])
            lesion_weight, rater1 = _lesions_at(lesions, timepoint, anatomy)
            rater2 = _second_rater(rater1, anatomy.brain, scan_rng)
            images = _modalities(anatomy, lesion_weight, scan_rng)
            stem = f"training{patient:02d}_{timepoint + 1:02d}"
            for name in MODALITIES:
                written.append(_save(images[name], affine, folder / "preprocessed" / f"{stem}_{name}_pp.nii.gz"))
            for rater, mask in ((1, rater1), (2, rater2)):
                written.append(_save(mask.astype(np.uint8), affine, folder / "masks" / f"{stem}_mask{rater}.nii.gz"))
    return written


def _save(volume: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def _unit_axes(shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Per-axis coordinates in [-1, 1], shaped to broadcast (the brain fills the field of view)."""
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


def _ellipsoid_distance(coords: list[np.ndarray], center, semi_axes) -> np.ndarray:
    """Ellipsoidal radius: 0 at the centre, 1 on the surface."""
    squared = sum(((c - np.float32(m)) / np.float32(s)) ** 2 for c, m, s in zip(coords, center, semi_axes))
    return np.sqrt(squared)


def _inside(signed_depth: np.ndarray, voxels_per_unit: float) -> np.ndarray:
    """Partial-volume membership of a region from a signed depth (positive inside).

    ``voxels_per_unit`` converts depth to voxels, so the transition is about ``_EDGE_VOXELS`` wide at any grid size.
    """
    return special.expit(signed_depth * np.float32(voxels_per_unit / _EDGE_VOXELS))


def _anatomy(shape: tuple[int, int, int], rng: np.random.Generator) -> _Anatomy:
    """Brain, cortex, deep grey matter and lateral ventricles, warped by a smooth random deformation."""
    axes = _unit_axes(shape)
    half_size = min(shape) / 2
    warp = rng.uniform(0.02, 0.045)
    coords = [a + np.float32(warp) * _smooth_field(axes, rng, terms=6, max_cycles=1.5) for a in axes]

    brain_axes = np.array([0.78, 0.84, 0.72]) * rng.uniform(0.94, 1.04, size=3)
    brain_radius = _ellipsoid_distance(coords, (0.0, -0.04, 0.06), brain_axes)
    brain_radius += np.float32(0.025) * _smooth_field(axes, rng, terms=6, max_cycles=2.5)
    brain = brain_radius < 1.0
    depth = 1.0 - brain_radius  # 0 on the brain surface, in units of the brain's semi-axes
    voxels_per_depth = float(brain_axes.min()) * half_size

    # Cortex: a ribbon whose thickness follows a folding pattern; sulci fill with CSF where it folds deepest.
    folding = _smooth_field(axes, rng, terms=10, max_cycles=7.0)
    cortex = _inside(np.float32(0.11) + np.float32(0.04) * folding - depth, voxels_per_depth)
    sulcal_depth = np.float32(0.012) + np.float32(0.05) * np.maximum(folding - np.float32(0.6), 0)
    outer_csf = _inside(sulcal_depth - depth, voxels_per_depth)

    # Lateral ventricles: C-shaped (arched along y), larger in some patients, as with atrophy in MS.
    ventricle_scale = rng.uniform(0.8, 1.5)
    ventricle_axes = np.array([0.07, 0.30, 0.10]) * ventricle_scale
    arch = np.float32(0.12) * (coords[1] / np.float32(ventricle_axes[1])) ** 2
    arched = [coords[0], coords[1], coords[2] + arch]
    ventricle_distance = np.minimum(
        *(_ellipsoid_distance(arched, (side * 0.10, -0.05, 0.18), ventricle_axes) for side in (-1, 1))
    )
    ventricles = _inside(1.0 - ventricle_distance, float(ventricle_axes[0]) * half_size)

    deep_grey_axes = np.array([0.09, 0.16, 0.10]) * rng.uniform(0.9, 1.1)
    deep_grey_distance = np.minimum(
        *(_ellipsoid_distance(coords, (side * 0.24, -0.05, 0.0), deep_grey_axes) for side in (-1, 1))
    )
    deep_grey = _inside(1.0 - deep_grey_distance, float(deep_grey_axes[0]) * half_size)

    csf = np.where(brain, np.maximum(outer_csf, ventricles), 0.0).astype(np.float32)
    grey_matter = np.where(brain, (1.0 - csf) * np.maximum(cortex, deep_grey), 0.0).astype(np.float32)
    return _Anatomy(brain=brain, csf=csf, grey_matter=grey_matter, ventricle_distance=ventricle_distance)


def _lesion_course(anatomy: _Anatomy, n_timepoints: int, rng: np.random.Generator) -> list[_Lesion]:
    """A patient's lesions over all time points: most present at baseline, a few new ones later."""
    shape = anatomy.brain.shape
    voxels_per_mm = float(np.mean(shape) / np.mean(ISBI_SHAPE))
    onsets = [0] * int(rng.integers(15, 40))
    for timepoint in range(1, n_timepoints):
        onsets += [timepoint] * int(rng.poisson(1.5))

    # Mostly periventricular: white-matter voxels weighted by closeness to the ventricles.
    candidates = np.flatnonzero(anatomy.white_matter > 0.8)
    closeness = np.exp(-(anatomy.ventricle_distance.ravel()[candidates] - 1.0) / 0.7)
    weights = 0.15 + np.minimum(closeness, 1.0)
    chosen = rng.choice(candidates, size=len(onsets), p=weights / weights.sum())
    centers = np.stack(np.unravel_index(chosen, shape), axis=1) + rng.uniform(-0.5, 0.5, size=(len(onsets), 3))

    lesions = []
    for center, onset in zip(centers, onsets):
        radius = np.clip(rng.lognormal(math.log(_LESION_MEDIAN_RADIUS_MM), 0.45), 1.5, 9.0) * voxels_per_mm
        n_lobes = int(rng.integers(1, 4))
        n_ripples = 4
        ripple_directions = rng.normal(size=(n_ripples, 3))
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
                strength=rng.uniform(0.75, 1.0),
                onset=onset,
                growth=_growth_rate(rng),
            )
        )
    return _within_load(lesions, anatomy, n_timepoints, rng)


def _growth_rate(rng: np.random.Generator) -> float:
    """Relative radius change per time point: a quarter of lesions grow, a fifth shrink, the rest hold."""
    course = rng.choice(("growing", "shrinking", "stable"), p=(0.25, 0.2, 0.55))
    low, high = {"growing": (0.08, 0.25), "shrinking": (-0.2, -0.08), "stable": (-0.03, 0.03)}[course]
    return rng.uniform(low, high)


def _within_load(
    lesions: list[_Lesion], anatomy: _Anatomy, n_timepoints: int, rng: np.random.Generator
) -> list[_Lesion]:
    """Drop random lesions until the largest expected lesion load is below a per-patient cap."""
    cap = rng.uniform(*_MAX_LESION_LOAD) * np.count_nonzero(anatomy.brain)
    volumes = []
    for lesion in lesions:
        largest = max(lesion.scale_at(t) for t in range(n_timepoints))
        radii = np.maximum(lesion.radii * largest, _MIN_LESION_RADIUS)
        volumes.append(4 / 3 * math.pi * float(np.prod(radii)) * float(np.sum(lesion.lobe_sizes**3)))
    kept = list(rng.permutation(len(lesions)))
    # One lesion visible at every time point goes last in line to be dropped, so no scan is lesion-free.
    persistent = [i for i in kept if lesions[i].onset == 0 and lesions[i].growth >= 0]
    if persistent:
        kept.remove(persistent[0])
        kept.insert(0, persistent[0])
    while len(kept) > 1 and sum(volumes[i] for i in kept) > cap:
        kept.pop()
    return [lesions[i] for i in sorted(kept)]


def _lesions_at(lesions: list[_Lesion], timepoint: int, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Lesion weight in the image (float32 in [0, 1], soft borders) and the true lesion mask (bool) at a time point."""
    shape = anatomy.brain.shape
    extent = np.zeros(shape, dtype=np.float32)  # how far each voxel is inside a lesion, in [0, 1]
    weight = np.zeros(shape, dtype=np.float32)
    for lesion in lesions:
        scale = lesion.scale_at(timepoint)
        if scale == 0.0:
            continue
        box, inside = _rasterise(lesion, scale, shape)
        extent[box] = np.maximum(extent[box], inside)
        weight[box] = np.maximum(weight[box], inside * np.float32(lesion.strength))
    # Lesions do not grow into CSF; the mask is where the lesion fills at least half the voxel.
    not_csf = np.where(anatomy.brain, 1.0 - anatomy.csf, 0.0).astype(np.float32)
    mask = extent * not_csf >= 0.5
    return weight * not_csf, mask


def _rasterise(lesion: _Lesion, scale: float, shape) -> tuple[tuple[slice, ...], np.ndarray]:
    """The lesion's partial-volume fraction inside a box around it."""
    radii = np.maximum(lesion.radii * scale, _MIN_LESION_RADIUS)
    reach = float(radii.max()) * (1.0 + np.abs(lesion.lobe_offsets).max() + 3 * lesion.ripple_amplitude) + 2
    box = tuple(
        slice(max(int(c - reach), 0), min(int(math.ceil(c + reach)) + 1, size))
        for c, size in zip(lesion.center, shape)
    )
    offsets = [
        np.arange(s.start, s.stop, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]) - np.float32(c)
        for axis, (s, c) in enumerate(zip(box, lesion.center))
    ]
    # Coordinates in the lesion frame, in units of its radii.
    local = [
        sum(np.float32(lesion.rotation[row, axis]) * offsets[axis] for axis in range(3)) / np.float32(radii[row])
        for row in range(3)
    ]
    radius = np.min(
        [
            np.sqrt(sum((local[a] - np.float32(offset[a])) ** 2 for a in range(3))) / np.float32(size)
            for offset, size in zip(lesion.lobe_offsets, lesion.lobe_sizes)
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
        for d, cycles, phase in zip(lesion.ripple_directions, lesion.ripple_cycles, lesion.ripple_phases)
    )
    mean_radius = float(np.mean(radii))
    inside = np.clip((border - radius) * np.float32(mean_radius / _LESION_EDGE_VOXELS) + 0.5, 0.0, 1.0)
    return box, inside.astype(np.float32)


def _modalities(anatomy: _Anatomy, lesion_weight: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """FLAIR, MPRAGE, T2 and PD images: tissue mixtures, a residual bias field and Rician noise; 0 outside the brain."""
    axes = _unit_axes(anatomy.brain.shape)
    brain = anatomy.brain
    csf, grey = anatomy.csf[brain], anatomy.grey_matter[brain]
    white = 1.0 - csf - grey
    lesion = lesion_weight[brain]
    images = {}
    for name in MODALITIES:
        gain = _SIGNAL_SCALE * rng.uniform(0.9, 1.1)
        csf_signal, grey_signal, white_signal, lesion_signal = (
            np.float32(gain * level * rng.uniform(0.96, 1.04)) for level in _TISSUE_SIGNAL[name]
        )
        tissue = csf * csf_signal + grey * grey_signal + white * white_signal
        clean = tissue + lesion * (lesion_signal - tissue)
        # ISBI images are bias-corrected; what remains is a weak smooth field.
        clean *= np.exp(np.float32(0.04) * _smooth_field(axes, rng, terms=4, max_cycles=1.0))[brain]
        sigma = np.float32(_NOISE_FRACTION) * white_signal
        real = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
        image = np.zeros(brain.shape, dtype=np.float32)
        # Strictly positive inside the brain so that "non-zero" means "brain" to foreground cropping.
        image[brain] = np.maximum(np.sqrt(real**2 + imaginary**2), np.float32(1e-3))
        images[name] = image
    return images


def _second_rater(mask: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rater 2: draws some lesion borders wider or tighter and misses some small lesions.

    Border shifts grow with the lesion (about a third of its radius, at least one voxel) and "small"
    means below a 3 mm radius, so raters disagree about as much at every grid size.
    """
    voxels_per_mm = float(np.mean(mask.shape) / np.mean(ISBI_SHAPE))
    small = max(4 / 3 * math.pi * (3.0 * voxels_per_mm) ** 3, 40.0)
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    cross = ndimage.generate_binary_structure(3, 1)
    second = np.zeros_like(mask)
    for label, found in enumerate(ndimage.find_objects(labels), start=1):
        if sizes[label] < small and rng.random() < 0.3:
            continue
        shift = max(1, round(0.35 * (3 * sizes[label] / (4 * math.pi)) ** (1 / 3)))
        box = tuple(slice(max(s.start - shift, 0), s.stop + shift) for s in found)
        lesion = labels[box] == label
        action = rng.choice(("wider", "tighter", "same"), p=(0.35, 0.35, 0.3))
        if action == "wider":
            lesion = ndimage.binary_dilation(lesion, cross, iterations=shift) & brain[box]
        elif action == "tighter":
            tighter = ndimage.binary_erosion(lesion, cross, iterations=shift)
            # Nobody draws a lesion they saw as a few voxels: a thin lesion is kept as it is.
            lesion = tighter if tighter.sum() >= 0.25 * lesion.sum() else lesion
        second[box] |= lesion
    return second
