"""Measure a synthetic cohort the way one would describe ISBI 2015's, and draw docs/images/synthetic_cohort.png.

    .venv/bin/python docs/figures/synthetic_cohort.py                      # full size, 5 patients, seed 0
    .venv/bin/python docs/figures/synthetic_cohort.py --shape 48,56,48 --no-figure

Writes the cohort to a temporary folder (timing it), then prints per-scan and cohort statistics as
Markdown: lesions per scan (3-D 6-connected components of rater 1), lesion volume in mL, lesion sizes
(equivalent-sphere diameter and longest extent, in mm), inter-rater Dice, lesion locations, tissue
contrasts per modality relative to white matter, lesion changes between consecutive time points, and
the cohort's difficulty: the best single global threshold on z-scored FLAIR and its Dice against rater 1
(the target for the default full-size cohort is 0.2 to 0.65; the previous generator scored 0.97). The
figure shows FLAIR plain and with both raters' outlines and what that threshold takes, then MPRAGE and T2.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage

from msx.models.data.baseline import ThresholdBaseline, brain_zscore, flair_threshold_baseline
from msx.models.data.cohort import MODALITIES, find_isbi_cohort, load_scan
from msx.models.data.synth import (
    ISBI_SHAPE,
    lesion_locations,
    patient_anatomy,
    write_synthetic_cohort,
)

FIGURE = Path(__file__).resolve().parents[1] / "images" / "synthetic_cohort.png"
PURE = 0.9  # a voxel counts as one tissue for the contrast table when that tissue fills this much of it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=",".join(map(str, ISBI_SHAPE)))
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = write_synthetic_cohort(folder, patients=args.patients, shape=shape, seed=args.seed)
        seconds = time.perf_counter() - start
        print(f"wrote {len(paths)} files ({args.patients} patients, {shape}) in {seconds:.1f} s\n")
        cohort = find_isbi_cohort(folder, modalities=MODALITIES)
        scans = [
            (scan, load_scan(scan, MODALITIES, rater=1), load_scan(scan, ("flair",), rater=2).mask.astype(bool))
            for scan in cohort.scans
        ]
        anatomies = {p: patient_anatomy(shape, p, args.seed) for p in cohort.patients}
        baseline = report(scans, anatomies)
        if not args.no_figure:
            draw(scans[0][0].scan_id, scans[0][1], scans[0][2], anatomies[scans[0][0].patient], baseline.threshold)
            print(f"\nfigure: {FIGURE}")


def report(scans, anatomies) -> ThresholdBaseline:
    rows, counts, volumes, dices, diameters, extents = [], [], [], [], [], []
    locations: Counter[str] = Counter()
    contrast = {name: [] for name in MODALITIES}
    for scan, loaded, rater2 in scans:
        rater1 = loaded.mask.astype(bool)
        voxel_ml = float(np.prod(loaded.spacing)) / 1000
        labels, count = ndimage.label(rater1)
        sizes = np.bincount(labels.ravel())[1:]
        spans = [max(s.stop - s.start for s in box) * min(loaded.spacing) for box in ndimage.find_objects(labels)]
        diameters += list(2 * (3 * sizes * np.prod(loaded.spacing) / (4 * np.pi)) ** (1 / 3))
        extents += spans
        dice = 2 * np.count_nonzero(rater1 & rater2) / (np.count_nonzero(rater1) + np.count_nonzero(rater2))
        anatomy = anatomies[scan.patient]
        where = Counter(lesion_locations(rater1, anatomy))
        locations += where
        counts.append(count)
        volumes.append(rater1.sum() * voxel_ml)
        dices.append(dice)
        rows.append(
            f"| {scan.scan_id} | {count} | {rater1.sum() * voxel_ml:.1f} | {rater2.sum() * voxel_ml:.1f} | {dice:.2f} "
            f"| {where['periventricular']}/{where['juxtacortical']}/{where['deep']} |"
        )
        classes = _tissue_classes(anatomy, rater1)
        for channel, name in enumerate(MODALITIES):
            image = loaded.image[channel]
            white = image[classes["white matter"]].mean()
            contrast[name].append({tissue: image[voxels].mean() / white for tissue, voxels in classes.items()})

    print("| scan | lesions | rater 1 mL | rater 2 mL | inter-rater Dice | periventricular/juxtacortical/deep |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    total = sum(locations.values())
    print(
        f"\nlesions per scan: median {np.median(counts):.0f}, range {min(counts)}-{max(counts)}"
        f"\nlesion volume per scan (rater 1): median {np.median(volumes):.1f} mL,"
        f" range {min(volumes):.1f}-{max(volumes):.1f} mL"
        f"\nlesion size: equivalent diameter {min(diameters):.1f}-{max(diameters):.1f} mm"
        f" (median {np.median(diameters):.1f}),"
        f" longest extent {min(extents):.0f}-{max(extents):.0f} mm"
        f"\ninter-rater Dice per scan: median {np.median(dices):.2f}, range {min(dices):.2f}-{max(dices):.2f}"
        f"\nlocations: "
        + ", ".join(f"{k} {locations[k] / total:.0%}" for k in ("periventricular", "juxtacortical", "deep"))
    )
    print("\nmean intensity relative to white matter (mean over scans):\n")
    print("| modality | lesion | grey matter | white matter | CSF |")
    print("|---|---|---|---|---|")
    for name in MODALITIES:
        means = {tissue: np.mean([scan[tissue] for scan in contrast[name]]) for tissue in contrast[name][0]}
        print(f"| {name} | {means['lesion']:.2f} | {means['grey matter']:.2f} | 1.00 | {means['CSF']:.2f} |")
    print("\nchanges between consecutive time points (rater 1, per pair of scans):\n")
    print(_changes(scans))
    baseline = flair_threshold_baseline(
        (loaded.image[MODALITIES.index("flair")], loaded.mask) for _, loaded, _ in scans
    )
    print(
        f"\nFLAIR threshold baseline against rater 1: best global z-score threshold {baseline.threshold:.2f}, "
        f"mean Dice {baseline.mean_dice:.3f} (per scan {min(baseline.dices):.2f}-{max(baseline.dices):.2f}); "
        f"each scan at its own best threshold: mean {np.mean(baseline.best_per_scan):.3f} "
        f"({min(baseline.best_per_scan):.2f}-{max(baseline.best_per_scan):.2f})"
    )
    return baseline


def _tissue_classes(anatomy, lesion: np.ndarray) -> dict[str, np.ndarray]:
    near_lesion = ndimage.binary_dilation(lesion, iterations=2)
    healthy = anatomy.brain & ~near_lesion
    return {
        "lesion": ndimage.binary_erosion(lesion) if ndimage.binary_erosion(lesion).any() else lesion,
        "grey matter": healthy & (anatomy.grey_matter > PURE),
        "white matter": healthy & (anatomy.white_matter > PURE),
        "CSF": healthy & (anatomy.csf > PURE),
    }


def _changes(scans) -> str:
    """New lesions (no overlap with the earlier scan), enlarging and shrinking ones (volume up or down by over
    a quarter against the lesions they overlap), and resolved ones (no overlap with the later scan)."""
    by_patient: dict[int, list[np.ndarray]] = {}
    for scan, loaded, _ in scans:
        by_patient.setdefault(scan.patient, []).append(loaded.mask.astype(bool))
    totals: Counter[str] = Counter()
    pairs = 0
    for masks in by_patient.values():
        for earlier, later in zip(masks, masks[1:], strict=False):
            pairs += 1
            earlier_labels, earlier_count = ndimage.label(earlier)
            later_labels, later_count = ndimage.label(later)
            earlier_sizes = np.bincount(earlier_labels.ravel(), minlength=earlier_count + 1)
            later_sizes = np.bincount(later_labels.ravel(), minlength=later_count + 1)
            both = earlier & later
            overlaps = set(zip(later_labels[both].tolist(), earlier_labels[both].tolist(), strict=True))
            for label in range(1, later_count + 1):
                touched = [e for later_label, e in overlaps if later_label == label]
                if not touched:
                    totals["new"] += 1
                    continue
                ratio = later_sizes[label] / earlier_sizes[touched].sum()
                totals["enlarging" if ratio > 1.25 else "shrinking" if ratio < 0.75 else "stable"] += 1
            totals["resolved"] += earlier_count - len({e for _, e in overlaps})
    return "\n".join(
        f"- {kind}: {totals[kind]} ({totals[kind] / pairs:.1f} per pair of scans)"
        for kind in ("new", "enlarging", "shrinking", "stable", "resolved")
    )


def draw(scan_id: str, loaded, rater2: np.ndarray, anatomy, threshold: float) -> None:
    """FLAIR as a reader sees it, then with what is lesion (the raters) and what one brightness cut takes
    (the cohort's best global threshold), then MPRAGE and T2, which a network sees beside FLAIR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rater1 = loaded.mask.astype(bool)
    # The axial slice with the most lesion among those through the bodies of the lateral ventricles, where MS
    # lesions and their look-alikes (caps, bands, flow artefacts) show most.
    ventricles = anatomy.ventricle_distance < 0.5
    through = ventricles.sum(axis=(0, 1)) > 0.5 * ventricles.sum(axis=(0, 1)).max()
    z = int(np.argmax(np.where(through, rater1.sum(axis=(0, 1)), -1)))
    flair = loaded.image[MODALITIES.index("flair")]
    brain = flair > 0
    above = brain & (brain_zscore(flair) >= threshold)
    xs, ys = np.nonzero(brain[:, :, z])
    crop = (slice(max(xs.min() - 4, 0), xs.max() + 5), slice(max(ys.min() - 4, 0), ys.max() + 5), z)
    panels = (
        ("FLAIR", "flair", False),
        ("FLAIR: lesions and the threshold", "flair", True),
        ("MPRAGE", "mprage", False),
        ("T2", "t2", False),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(18, 6.2), facecolor="black")
    for axis, (title, name, outlined) in zip(axes, panels, strict=True):
        volume = loaded.image[MODALITIES.index(name)]
        axis.imshow(volume[crop].T, origin="lower", cmap="gray", vmin=0, vmax=np.percentile(volume[brain], 99.8))
        if outlined:
            axis.contourf(above[crop].T, [0.5, 1.5], colors="#ffd60a", alpha=0.45)
            axis.contour(rater1[crop].T, [0.5], colors="#ff3b30", linewidths=1.6)
            axis.contour(rater2[crop].T, [0.5], colors="#30d5ff", linewidths=1.2, linestyles="dashed")
        axis.set_title(title, color="white")
        axis.axis("off")
    figure.suptitle(
        f"synthetic {scan_id}, axial slice {z} of {loaded.image.shape[1:]}: rater 1 (red), rater 2 (cyan, dashed), "
        f"FLAIR z-score >= {threshold:.2f}, the cohort's best single threshold (yellow)",
        color="white",
    )
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(FIGURE, dpi=100, facecolor="black")


if __name__ == "__main__":
    main()
