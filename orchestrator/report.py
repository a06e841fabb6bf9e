"""`msx report`: a study's tables and figures, rebuilt from its MLflow record.

A study is an MLflow experiment; its latest launch is the newest launch run, and the launch's trials are
the fold runs under its configuration runs (tracking.py). The LOSO summaries, each backbone's row and the selection come from the functions
the launch itself used (results.py), fed from the runs instead of Tune's results, so the report agrees
with what the launch printed and registered. Output: report.md with its figures beside it, and
report.html with the figures embedded (one file to mail or archive), both also logged to the launch's
run under report/.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD
from mlflow.tracking import MlflowClient

from .results import (
    HIGHER_IS_BETTER,
    ISBI_SCORE,
    OVERLAY_DIR,
    SPLIT_METRIC_NAMES,
    ConfigurationResult,
    Selection,
    TrialOutcome,
    best_per_backbone,
    format_cell,
    select_best,
    summarise_configurations,
    summary_rows,
)
from .search_record import SEARCH_ARTIFACT, SearchSummary, read_summary
from .tracking import STUDY_TAG, child_runs, fold_run_outcome

REPORT_ARTIFACT_PATH = "report"
DATA_ROOT_TAG = "msx.data_root"
LOSS_CURVE = "train_loss"
# The Dice of that epoch's weights; val_dice is the running best, a staircase that hides the training.
VALIDATION_CURVE = "val_dice_now"
SPLIT_NAMES = {"test": "test", "val": "validation"}


class ReportError(Exception):
    """A report that cannot be made: no such study, or nothing in it finished."""


@dataclass(frozen=True)
class TrialRun:
    """A trial's fold run, as the report reads it."""

    run_id: str
    name: str
    configuration: str
    backbone: str
    fold: int
    status: str
    # None unless the trial reached its final evaluation.
    outcome: TrialOutcome | None
    # metric -> ((epoch, value), ...)
    curves: dict[str, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class StudyRecord:
    """The latest launch of a study: its parent run, resolved spec, trials and registered versions."""

    study: str
    launch: str
    run_id: str
    status: str
    started: datetime
    ended: datetime | None
    params: dict[str, str]
    tags: dict[str, str]
    spec: dict[str, Any]
    trials: tuple[TrialRun, ...]
    registered: tuple[RegisteredVersion, ...]
    # The search's summary the launch logged (configurations pruned or complete, epochs saved); None before.
    search: SearchSummary | None = None


@dataclass(frozen=True)
class StudySummary:
    strategies: tuple[str, ...]
    fold_count: int
    # Each backbone's configuration chosen on validation: the rows of the tables and figures.
    rows: tuple[ConfigurationResult, ...]
    selection: Selection | None


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    # (row, column) of the cells that are the best of their column.
    best: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True)
class Picture:
    file: str  # relative to the report's folder
    caption: str


Block = Heading | Text | Table | Picture


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    figures: tuple[Path, ...]
    record: StudyRecord


# ---- reading MLflow -------------------------------------------------------------------------------


def study_names(client: MlflowClient) -> list[str]:
    """Experiments that hold at least one msx launch, the most recently launched first."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    launches = client.search_runs(
        list(experiments),
        filter_string=f"tags.`{STUDY_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=SEARCH_MAX_RESULTS_THRESHOLD,
    )
    return list(dict.fromkeys(experiments[run.info.experiment_id] for run in launches))


def resolve_study(tracking_uri: str, name: str | None) -> str:
    """`name` checked against the store's studies; with no name, the most recently launched study."""
    names = study_names(MlflowClient(tracking_uri))
    if not names:
        raise ReportError(f"no msx study in {tracking_uri}; `msx launch` makes one")
    if name is None:
        return names[0]
    if name not in names:
        raise ReportError(f"no study named {name!r} in {tracking_uri}; studies: {', '.join(sorted(names))}")
    return name


def read_study(client: MlflowClient, study: str) -> StudyRecord:
    experiment = client.get_experiment_by_name(study)
    parent = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` LIKE '%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    run_id = parent.info.run_id
    folds = [
        fold
        for configuration in child_runs(client, experiment.experiment_id, run_id)
        for fold in child_runs(client, experiment.experiment_id, configuration.info.run_id)
    ]
    with tempfile.TemporaryDirectory() as folder:
        spec = json.loads(Path(client.download_artifacts(run_id, "spec.json", folder)).read_text())
        logged = {artifact.path for artifact in client.list_artifacts(run_id)}
        search = read_summary(Path(client.download_artifacts(run_id, SEARCH_ARTIFACT, folder))) if SEARCH_ARTIFACT in logged else None
    # search_model_versions leaves the aliases out; get_model_version has them.
    registered = tuple(
        RegisteredVersion(v.name, int(v.version), tuple(client.get_model_version(v.name, v.version).aliases))
        for v in client.search_model_versions(f"run_id = '{run_id}'")
    )
    return StudyRecord(
        study=study,
        launch=parent.info.run_name,
        run_id=run_id,
        status=parent.info.status,
        started=_utc(parent.info.start_time),
        ended=_utc(parent.info.end_time) if parent.info.end_time else None,
        params=dict(parent.data.params),
        tags=dict(parent.data.tags),
        spec=spec,
        trials=tuple(sorted((_trial_run(client, fold) for fold in folds), key=lambda t: (t.configuration, t.fold))),
        registered=tuple(sorted(registered, key=lambda v: (v.name, v.version))),
        search=search,
    )


def _trial_run(client: MlflowClient, run: Run) -> TrialRun:
    params = run.data.params
    return TrialRun(
        run_id=run.info.run_id,
        name=run.info.run_name,
        configuration=params["configuration"],
        backbone=params["backbone"],
        fold=int(params["fold"]),
        status=run.info.status,
        outcome=fold_run_outcome(run),
        curves={
            key: tuple(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)))
            for key in (LOSS_CURVE, VALIDATION_CURVE)
        },
    )


def _utc(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc)


# ---- from runs to results -------------------------------------------------------------------------


def summarise_study(record: StudyRecord) -> StudySummary:
    """The launch's tables and selection, recomputed from its finished trials."""
    strategies = tuple(record.spec["inference"]["strategies"])
    outcomes = [trial.outcome for trial in record.trials if trial.outcome is not None]
    if not outcomes:
        raise ReportError(f"study {record.study!r}, launch {record.launch}: {trials_line(record.trials)}; nothing to report")
    # The spec names its folds by plan ("paper", "loso") whose size depends on the cohort; a launch creates
    # every fold's run of a configuration when it starts it, so the runs give the fold count.
    fold_count = len({trial.fold for trial in record.trials})
    configurations = summarise_configurations(outcomes, strategies, fold_count)
    if not configurations:
        raise ReportError(
            f"study {record.study!r}, launch {record.launch}: no configuration finished all its {fold_count} folds "
            f"({trials_line(record.trials)})"
        )
    metric = record.spec["registry"]["selection_metric"]
    return StudySummary(
        strategies=strategies,
        fold_count=fold_count,
        rows=tuple(best_per_backbone(configurations, strategies, metric)),
        selection=select_best(configurations, strategies, metric),
    )


def unfinished_label(trial: TrialRun) -> str:
    # Tune ends a trial its scheduler stopped as FINISHED too; only the missing final evaluation tells.
    return "stopped early" if trial.status == "FINISHED" else trial.status.lower()


def trials_line(trials: tuple[TrialRun, ...]) -> str:
    """'10 of 12 trials finished; not finished: 1 failed, 1 stopped early'."""
    finished = sum(trial.outcome is not None for trial in trials)
    line = f"{finished} of {len(trials)} trials finished"
    not_finished = Counter(unfinished_label(trial) for trial in trials if trial.outcome is None)
    if not_finished:
        line += "; not finished: " + ", ".join(f"{count} {label}" for label, count in sorted(not_finished.items()))
    return line


def describe_configuration(configuration: ConfigurationResult) -> str:
    searched = ", ".join(f"{key}={value}" for key, value in sorted(configuration.searched.items()))
    return f"{configuration.configuration} ({searched})" if searched else configuration.configuration


def metrics_table(summary: StudySummary, split: str) -> Table:
    """The paper's table: backbone x strategy rows, mean ± std over folds, each column's best marked."""
    rows, best = [], set()
    for row_index, (backbone, strategy, cells) in enumerate(summary_rows(list(summary.rows), summary.strategies, split)):
        rows.append((backbone, strategy, *(format_cell(cell) for cell in cells)))
        best.update((row_index, 2 + column) for column, cell in enumerate(cells) if cell.best)
    return Table(("backbone", "strategy", *(m.upper() for m in SPLIT_METRIC_NAMES)), tuple(rows), frozenset(best))


# ---- figures --------------------------------------------------------------------------------------


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
        for position, values in zip(positions, folds):
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
    for (loss_axes, dice_axes), row in zip(grid, summary.rows):
        for trial in trials:
            if trial.configuration != row.configuration or trial.outcome is None:
                continue
            for axes, key, marker in ((loss_axes, LOSS_CURVE, None), (dice_axes, VALIDATION_CURVE, "o")):
                points = trial.curves[key]
                axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=3, label=f"fold {trial.fold}")
        loss_axes.set_title(f"{row.configuration}: training loss", fontsize=9)
        dice_axes.set_title(f"{row.configuration}: validation Dice", fontsize=9)
        for axes in (loss_axes, dice_axes):
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        dice_axes.legend(fontsize=7)
    return figure


def study_figures(record: StudyRecord, summary: StudySummary) -> list[tuple[Picture, Figure]]:
    return [
        (Picture("figures/test_dice_heatmap.png", "Test DSC (mean over folds) of each backbone and strategy."),
         dice_heatmap(summary)),
        (Picture("figures/test_dice_folds.png", "Test DSC of each fold: one box per strategy, folds as dots."),
         fold_dice_boxplots(summary)),
        (Picture("figures/training_curves.png",
                 "Training loss and validation Dice (that epoch's weights, validation strategy) per epoch, one line per fold."),
         training_curves(summary, record.trials)),
    ]


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


# ---- the document ---------------------------------------------------------------------------------


def report_blocks(
    record: StudyRecord, summary: StudySummary, pictures: list[Picture], overlays: list[Picture]
) -> list[Block]:
    spec = record.spec
    connectivity = spec["inference"]["connectivity"]
    blocks: list[Block] = [
        Heading(f"Study {record.study}", 1),
        Table(
            ("", ""),
            (
                ("launch (MLflow run)", f"{record.launch} ({record.run_id})"),
                ("status", record.status),
                ("started", f"{record.started:%Y-%m-%d %H:%M:%S} UTC"),
                ("ended", f"{record.ended:%Y-%m-%d %H:%M:%S} UTC ({_duration(record.ended - record.started)})" if record.ended else "-"),
                ("trials", trials_line(record.trials)),
                ("cohort", record.tags.get(DATA_ROOT_TAG, "-")),
                ("folds", f"{summary.fold_count} ({spec['data']['folds']}), rater {spec['data']['rater']}"),
                ("lesions", f"{connectivity}-connected components"),
            ),
        ),
    ]
    blocks += _selection_blocks(record, summary)
    if record.search is not None:
        blocks += _search_blocks(record.search)
    higher = ", ".join(m.upper() for m in SPLIT_METRIC_NAMES if HIGHER_IS_BETTER[m])
    lower = ", ".join(m.upper() for m in SPLIT_METRIC_NAMES if not HIGHER_IS_BETTER[m])
    chosen = "; ".join(f"{row.backbone}: {describe_configuration(row)}" for row in summary.rows)
    for split in ("test", "val"):
        blocks += [
            Heading(f"{SPLIT_NAMES[split].capitalize()} patients"),
            Text(
                f"Mean ± std (population) over the {summary.fold_count} folds of each fold's mean over its {SPLIT_NAMES[split]} "
                f"scans. Bold: the best of its column (higher is better for {higher}; lower for {lower}). "
                f"AVD in percent, ASSD in mm. Each backbone's configuration was chosen on validation patients: {chosen}."
            ),
            metrics_table(summary, split),
        ]
    blocks.append(
        Text(
            f"{ISBI_SCORE.upper()}: the raw ISBI 2015 score, DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4 per scan, "
            "Corr being the Pearson correlation of predicted and true lesion volumes over the fold's scans of that "
            "split; the fold's value is the mean over those scans. The challenge's rescaling (inter-rater agreement "
            "= 90) is not applied, and a split of fewer than two scans has none (n/a)."
        )
    )
    blocks.append(Heading("Figures"))
    blocks += pictures
    if overlays:
        blocks += [
            Heading("Example overlays"),
            Text("The first validation and test scan of a fold of each backbone's chosen configuration, with the mask "
                 "of the spec's validation strategy, on the slice with the most predicted lesion."),
            *overlays,
        ]
    unfinished = [trial for trial in record.trials if trial.outcome is None]
    if unfinished:
        ended = {c.name: c for c in record.search.configurations} if record.search else {}
        blocks += [
            Heading("Trials not finished"),
            Table(
                ("trial", "state"),
                tuple(
                    (trial.name, ended[trial.configuration].describe() if trial.configuration in ended else unfinished_label(trial))
                    for trial in unfinished
                ),
            ),
        ]
    blocks += [
        Heading("Spec parameters"),
        Table(("parameter", "value"), tuple(sorted(record.params.items()))),
    ]
    return blocks


def _selection_blocks(record: StudyRecord, summary: StudySummary) -> list[Block]:
    blocks: list[Block] = [Heading("Selected configuration")]
    selection = summary.selection
    if selection is None:
        blocks.append(Text("No configuration has a validation score; nothing was selected."))
    else:
        metric = selection.metric
        test_mean, test_std = selection.configuration.summary[("test", selection.strategy, metric)]
        blocks.append(
            Text(
                f"Chosen on validation patients only, by mean {metric.upper()} over folds: backbone "
                f"{selection.configuration.backbone}, configuration {describe_configuration(selection.configuration)}, "
                f"strategy {selection.strategy}; validation {metric.upper()} {selection.validation_score:.3f}, "
                f"test {metric.upper()} {test_mean:.3f} ± {test_std:.3f}."
            )
        )
    if record.registered:
        for version in record.registered:
            aliases = f", aliases {', '.join(version.aliases)}" if version.aliases else ""
            reference = f"models:/{version.name}@{version.aliases[0]}" if version.aliases else f"models:/{version.name}/{version.version}"
            blocks.append(Text(f"Registered model: {version.name} version {version.version}{aliases} ({reference})."))
    else:
        blocks.append(Text("No model version was registered from this launch."))
    return blocks


def _search_blocks(search: SearchSummary) -> list[Block]:
    """Every configuration the search opened, pruned ones with the rung and score that stopped them."""
    rows = []
    for c in search.configurations:
        rung = c.last_rung
        rows.append((
            c.name,
            ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(c.searched.items())) or "-",
            c.status,
            str(rung) if rung is not None else "-",
            f"{c.rung_means[rung]:.3f}" if rung is not None else "-",
            f"{c.final_score:.3f}" if c.final_score is not None else "-",
            str(c.epochs_trained),
        ))
    rungs = ", ".join(map(str, search.rungs)) or "none (fifo)"
    full, trained = search.epochs_full_grid, search.epochs_trained
    text = (
        f"Early stopping by configuration: at each rung (epochs {rungs}) a configuration's folds were judged together, "
        f"on their mean validation Dice. {trained} of {full} fold-epochs were trained, {full - trained} "
        f"({(full - trained) / full:.0%}) fewer than training every configuration on every fold to epoch {search.epochs}."
        if full else "No configuration was opened."
    )
    if search.cut_short:
        text += f" The search was cut short by its time budget ({search.time_budget_s:.0f} s)."
    return [
        Heading("Search and early stopping"),
        Text(text),
        Table(("configuration", "searched", "status", "last rung", "mean val Dice there", "final mean val Dice", "fold-epochs"), tuple(rows)),
    ]


def _duration(delta: timedelta) -> str:
    minutes, seconds = divmod(int(delta.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Picture):
            lines += [f"![{block.caption}]({block.file})", "", f"*{block.caption}*", ""]
        else:
            lines += [*_markdown_table(block), ""]
    return "\n".join(lines)


def _markdown_table(table: Table) -> list[str]:
    def cell(text: str, row: int, column: int) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if (row, column) in table.best else text

    return [
        "| " + " | ".join(table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
        *("| " + " | ".join(cell(t, r, c) for c, t in enumerate(row)) + " |" for r, row in enumerate(table.rows)),
    ]


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
"""


def render_html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    """One self-contained page: the figures embedded as base64 data URIs."""
    escape = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{escape(block.text)}</p>")
        elif isinstance(block, Picture):
            data = base64.b64encode(images[block.file]).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{escape(block.caption)}">'
                f"<figcaption>{escape(block.caption)}</figcaption></figure>"
            )
        else:
            rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in block.headers) + "</tr>"]
            for r, row in enumerate(block.rows):
                cells = (
                    f"<td><strong>{escape(text)}</strong></td>" if (r, c) in block.best else f"<td>{escape(text)}</td>"
                    for c, text in enumerate(row)
                )
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append("<table>\n" + "\n".join(rows) + "\n</table>")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ---- the command's work ---------------------------------------------------------------------------


def write_report(tracking_uri: str, study: str, out: Path) -> ReportFiles:
    """Read the study's latest launch, write report.md, report.html and figures/ to `out`, and log them to the
    launch's run under report/."""
    client = MlflowClient(tracking_uri)
    record = read_study(client, study)
    summary = summarise_study(record)
    figures = study_figures(record, summary)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for picture, figure in figures:
        figure.savefig(out / picture.file, format="png")
    overlays = example_overlays(client, record, summary, out)
    pictures = [picture for picture, _ in figures] + overlays
    images = {picture.file: (out / picture.file).read_bytes() for picture in pictures}
    blocks = report_blocks(record, summary, [picture for picture, _ in figures], overlays)
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page.write_text(render_html(blocks, images, f"msx report: {study} ({record.launch})"), encoding="utf-8")
    written = (markdown, page, *(out / picture.file for picture in pictures))
    # File by file: `out` may be a folder that holds more than this report.
    for path in written:
        client.log_artifact(record.run_id, str(path), (Path(REPORT_ARTIFACT_PATH) / path.parent.relative_to(out)).as_posix())
    return ReportFiles(markdown, page, written[2:], record)
