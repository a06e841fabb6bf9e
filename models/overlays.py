"""Overlay PNGs of a segmentation: one axial slice, FLAIR in grey, prediction red, truth green.

`msx predict` draws one per scan it segments; a fold's final evaluation (fold.py) draws its example scans into
its checkpoint, and the orchestrator's tracking callback logs them to the fold's MLflow run. matplotlib is
imported only to draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def overlay_channel(modalities: Sequence[str]) -> int:
    """The image channel the overlay draws: FLAIR, where lesions show brightest, else the first."""
    return modalities.index("flair") if "flair" in modalities else 0


def overlay_slice(pred: np.ndarray, truth: np.ndarray | None) -> int:
    """Axial (last-axis) slice with the most predicted lesion voxels; else the truth's; else the middle."""
    for mask in (pred, truth):
        if mask is not None and mask.any():
            return int(np.argmax(mask.sum(axis=(0, 1))))
    return pred.shape[2] // 2


def write_overlay(
    path: Path, flair: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, title: str, truth_label: str
) -> int:
    """PNG of one axial slice: FLAIR grey, prediction outlined red, truth (`truth_label` in the legend) green.
    Returns the slice index."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    z = overlay_slice(pred, truth)
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)  # Agg, independent of any global pyplot backend
    axes = figure.add_axes((0, 0, 1, 0.93))
    # Voxel x runs left-right and y bottom-top on screen: transpose and put the origin at the bottom.
    axes.imshow(flair[:, :, z].T, cmap="gray", origin="lower", interpolation="nearest")
    for mask, colour in ((pred, "red"), (truth, "lime")):
        if mask is not None and mask[:, :, z].any():
            axes.contour(mask[:, :, z].T.astype(float), levels=[0.5], colors=colour, linewidths=1.0, origin="lower")
    axes.set_axis_off()
    legend = "prediction red" + (f", {truth_label} green" if truth is not None else "")
    figure.suptitle(f"{title}  z={z}  ({legend})", fontsize=8)
    figure.savefig(path, format="png")
    return z
