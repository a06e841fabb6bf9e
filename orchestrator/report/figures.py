"""The report's figures: test Dice per backbone and strategy, per fold, the training curves, the nDSC retention curves
of the uncertainty measures, and example overlays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

from msx.models.fold import OVERLAY_DIR
from msx.models.metrics import RANDOM_UNCERTAINTY, r_aac_of_curve

from .record import LOSS_CURVE, VALIDATION_CURVE, StudyRecord, TrialRun
from .render import Picture
from .summary import RetentionSummary, StudySummary


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, whatever pyplot's backend is
    return figure


def dice_heatmap(summary: StudySummary) -> Figure:
    values = np.array([[row.score(s, "dsc", "test") for s in summary.strategies] for row in summary.rows])
    figure = _figure(2.5 + 1.1 * len(summary.strategies), 1.8 + 0.6 * len(summary.rows))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(summary.strategies)), summary.strategies, rotation=30, ha="right")
    axes.set_yticks(range(len(summary.rows)), [row.backbone for row in summary.rows])
    for (i, j), value in np.ndenumerate(values):
        label = "n/a" if math.isnan(value) else f"{value:.3f}"
        # Dark text on the light end of viridis, light text on the dark end.
        colour = "black" if not math.isnan(value) and image.norm(value) > 0.5 else "white"
        axes.text(j, i, label, ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes, label="test DSC, mean over folds")
    axes.set_title("Test Dice: backbone x strategy", fontsize=10)
    return figure


def fold_dice_boxplots(summary: StudySummary) -> Figure:
    """Per-fold test Dice of each backbone's chosen configuration, one box per strategy, folds as dots."""
    strategies, rows = summary.strategies, summary.rows
    figure = _figure(2.5 + 0.5 * len(strategies) * len(rows), 3.5)
    axes = figure.add_subplot()
    colours = colormaps["tab10"]
    width = 0.8 / len(strategies)
    for k, strategy in enumerate(strategies):
        folds = [
            [v for v in (fold.metrics.get(f"test/{strategy}/dsc", math.nan) for fold in row.folds) if not math.isnan(v)]
            for row in rows
        ]
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(rows))]
        boxes = axes.boxplot(
            folds, positions=positions, widths=0.85 * width, patch_artist=True, manage_ticks=False,
            medianprops={"color": "black"},
        )
        for box in boxes["boxes"]:
            box.set_facecolor(colours(k % colours.N))
        for position, values in zip(positions, folds, strict=True):
            axes.scatter([position] * len(values), values, s=9, color="black", zorder=3)
    axes.set_xticks(range(len(rows)), [row.backbone for row in rows])
    axes.set_ylabel("test DSC per fold")
    axes.legend(
        handles=[Patch(facecolor=colours(k % colours.N), label=s) for k, s in enumerate(strategies)],
        fontsize=7, loc="best",
    )
    axes.set_title("Test Dice per fold", fontsize=10)
    return figure


def training_curves(summary: StudySummary, trials: tuple[TrialRun, ...]) -> Figure:
    """Training loss and validation Dice per epoch of each backbone's chosen configuration, a line per fold."""
    figure = _figure(9, 2.6 * len(summary.rows))
    grid = figure.subplots(len(summary.rows), 2, squeeze=False)
    for (loss_axes, dice_axes), row in zip(grid, summary.rows, strict=True):
        for trial in trials:
            if trial.configuration != row.configuration or trial.outcome is None:
                continue
            for axes, key, marker in ((loss_axes, LOSS_CURVE, None), (dice_axes, VALIDATION_CURVE, "o")):
                points = trial.curves[key]
                axes.plot(
                    [p[0] for p in points], [p[1] for p in points], marker=marker, markersize=3,
                    label=f"fold {trial.fold}"
                )
        loss_axes.set_title(f"{row.configuration}: training loss", fontsize=9)
        dice_axes.set_title(f"{row.configuration}: validation Dice", fontsize=9)
        for axes in (loss_axes, dice_axes):
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        dice_axes.legend(fontsize=7)
    return figure


def retention_curves(retention: list[RetentionSummary]) -> Figure:
    """nDSC against the fraction of voxels whose prediction is kept (the rest replaced by the truth, most uncertain
    first), a panel per backbone at its chosen strategy, a line per uncertainty measure and the random order dashed;
    the legend gives each curve's R-AAC (the area above it)."""
    figure = _figure(4.2 * len(retention), 3.6)
    colours = colormaps["tab10"]
    for axes, summary in zip(figure.subplots(1, len(retention), squeeze=False)[0], retention, strict=True):
        fractions = np.asarray(summary.fractions)
        measures = [m for m in summary.curves if m != RANDOM_UNCERTAINTY] + [
            m for m in summary.curves if m == RANDOM_UNCERTAINTY
        ]
        for index, measure in enumerate(measures):
            curve = np.asarray(summary.curves[measure])
            random = measure == RANDOM_UNCERTAINTY
            axes.plot(
                fractions, curve, linestyle="--" if random else "-",
                color="grey" if random else colours(index % colours.N),
                label=f"{measure} (R-AAC {r_aac_of_curve(curve, fractions):.3f})",
            )
        axes.set_xlim(0, 1)
        axes.set_xlabel("retention fraction (least uncertain kept)")
        axes.set_ylabel("nDSC")
        axes.set_title(f"{summary.backbone} ({summary.strategy}), {summary.folds} folds", fontsize=9)
        axes.legend(fontsize=7, loc="lower left")
    return figure


def study_figures(
    record: StudyRecord, summary: StudySummary, retention: list[RetentionSummary] | None = None
) -> list[tuple[Picture, Figure]]:
    figures = [
        (Picture("figures/test_dice_heatmap.png", "Test DSC (mean over folds) of each backbone and strategy."),
         dice_heatmap(summary)),
        (Picture("figures/test_dice_folds.png", "Test DSC of each fold: one box per strategy, folds as dots."),
         fold_dice_boxplots(summary)),
        (Picture("figures/training_curves.png",
                 "Training loss and validation Dice (that epoch's weights, validation strategy) per epoch, one line "
                 "per fold."),
         training_curves(summary, record.trials)),
    ]
    if retention:
        figures.append((
            Picture("figures/retention_curves.png",
                    "nDSC retention curves of each backbone's chosen configuration and strategy on the test patients "
                    "(mean over folds of each fold's mean over its scans): a line per uncertainty measure, the random "
                    "order dashed; lower R-AAC is better."),
            retention_curves(retention),
        ))
    return figures


def example_overlays(client: MlflowClient, record: StudyRecord, summary: StudySummary, out: Path) -> list[Picture]:
    """The overlay PNGs that the first finished fold of each backbone's chosen configuration logged, downloaded
    under `out`/figures/; none for trials that logged none."""
    pictures = []
    for row in summary.rows:
        trial = next(t for t in record.trials if t.configuration == row.configuration and t.outcome is not None)
        folder = out / "figures" / trial.name
        for artifact in client.list_artifacts(trial.run_id, OVERLAY_DIR):
            if artifact.path.endswith(".png"):
                folder.mkdir(parents=True, exist_ok=True)
                local = Path(client.download_artifacts(trial.run_id, artifact.path, str(folder))).resolve()
                pictures.append(
                    Picture(
                        local.relative_to(out.resolve()).as_posix(),
                        f"{row.backbone}, {trial.name}: {Path(artifact.path).stem} (prediction red, truth green).",
                    )
                )
    return pictures
