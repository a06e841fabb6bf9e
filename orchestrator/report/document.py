"""`msx report`: a study's tables and figures, rebuilt from its MLflow record.

The record (record.py), its results (summary.py) and figures (figures.py) make the document's blocks, rendered
(render.py) as report.md with its figures beside it, and report.html with the figures embedded (one file to mail
or archive), both also logged to the launch's run under report/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from mlflow.tracking import MlflowClient

from msx.models.fold import TRAINING_PHASE, VALIDATION_PHASE, TrainingConfig
from msx.models.metrics import (
    HIGHER_IS_BETTER,
    ISBI_SCORE,
    R_AAC_PREFIX,
    RANDOM_UNCERTAINTY,
    SPLIT_METRIC_NAMES,
    is_uncertainty_score,
    r_aac_key,
)
from msx.models.protocols import PROTOCOLS

from ..results import ConfigurationResult, format_cell, summary_rows
from ..study.search_record import SearchSummary
from ..tracking.store import DATA_ROOT_TAG
from .comparisons import ALPHA, CONFIDENCE, PairedComparison, study_comparisons
from .figures import example_overlays, study_figures
from .record import STARTUP_PHASE, StudyRecord, read_study
from .render import Block, Heading, Picture, Table, Text, render_html, render_markdown
from .summary import (
    ProtocolScores,
    StudySummary,
    compared_rows,
    describe_configuration,
    retention_summaries,
    summarise_study,
    trials_line,
    unfinished_label,
)

REPORT_ARTIFACT_PATH = "report"
SPLIT_NAMES = {"test": "test", "val": "validation"}


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    html: Path
    figures: tuple[Path, ...]
    record: StudyRecord


def metrics_table(summary: StudySummary, split: str, rows: tuple[ConfigurationResult, ...] | None = None) -> Table:
    """The paper's table: backbone x strategy rows, mean ± std over folds, each column's best marked.

    `rows`: the same configurations scored under a compared protocol (default: under the study's own).
    """
    rows = summary.rows if rows is None else rows
    lines, best = [], set()
    for row_index, (backbone, strategy, cells) in enumerate(summary_rows(list(rows), summary.strategies, split)):
        lines.append((backbone, strategy, *(format_cell(cell) for cell in cells)))
        best.update((row_index, 2 + column) for column, cell in enumerate(cells) if cell.best)
    return Table(("backbone", "strategy", *(m.upper() for m in SPLIT_METRIC_NAMES)), tuple(lines), frozenset(best))


def protocols_side_by_side(summary: StudySummary, compared: ProtocolScores, split: str = "test") -> Table:
    """Each metric's mean over folds under the study's protocol and under a compared one, in adjacent columns,
    with the difference (compared minus the study's)."""
    headers = ["backbone", "strategy"]
    for metric in SPLIT_METRIC_NAMES:
        headers += [f"{metric.upper()} {summary.protocol}", f"{metric.upper()} {compared.protocol}", "Δ"]
    scored = {row.configuration: row for row in compared.rows}
    lines = []
    for row in summary.rows:
        other = scored.get(row.configuration)
        for strategy in summary.strategies:
            cells = [row.backbone, strategy]
            for metric in SPLIT_METRIC_NAMES:
                mine = row.score(strategy, metric, split)
                theirs = other.score(strategy, metric, split) if other is not None else math.nan
                cells += [_mean(mine), _mean(theirs), "n/a" if math.isnan(mine - theirs) else f"{theirs - mine:+.3f}"]
            lines.append(tuple(cells))
    return Table(tuple(headers), tuple(lines))


def _mean(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def report_blocks(
    record: StudyRecord, summary: StudySummary, pictures: list[Picture], overlays: list[Picture],
    comparisons: list[PairedComparison],
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
                (
                    "ended",
                    f"{record.ended:%Y-%m-%d %H:%M:%S} UTC ({_duration(record.ended - record.started)})"
                    if record.ended else "-"
                ),
                ("trials", trials_line(record.trials)),
                ("cohort", record.tags.get(DATA_ROOT_TAG, "-")),
                ("folds", f"{summary.fold_count} ({spec['data']['folds']}), rater {spec['data']['rater']}"),
                ("lesions", f"{connectivity}-connected components"),
                ("training", training_line(spec.get("training", {}))),
                *((("recipes", recipes_line(spec["recipes"])),) if spec.get("recipes") else ()),
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
                f"Mean ± std (population) over the {summary.fold_count} folds of each fold's mean over its "
                f"{SPLIT_NAMES[split]} scans. Bold: the best of its column (higher is better for {higher}; lower for "
                f"{lower}). AVD in percent, ASSD in mm. Each backbone's configuration was chosen on validation "
                f"patients: {chosen}."
            ),
            metrics_table(summary, split),
        ]
    blocks += _protocol_blocks(summary)
    blocks += _uncertainty_blocks(summary)
    blocks.append(
        Text(
            f"{ISBI_SCORE.upper()}: the raw ISBI 2015 score, DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4 per scan, "
            "Corr being the Pearson correlation of predicted and true lesion volumes over the fold's scans of that "
            "split; the fold's value is the mean over those scans. The challenge's rescaling (inter-rater agreement "
            "= 90) is not applied, and a split of fewer than two scans has none (n/a)."
        )
    )
    blocks += comparison_blocks(comparisons)
    blocks += _time_blocks(record)
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
                    (
                        trial.name,
                        ended[trial.configuration].describe() if trial.configuration in ended
                        else unfinished_label(trial)
                    )
                    for trial in unfinished
                ),
            ),
        ]
    blocks += [
        Heading("Spec parameters"),
        Table(("parameter", "value"), tuple(sorted(record.params.items()))),
    ]
    return blocks


def training_line(training: dict) -> str:
    """How the study trained, from its recorded spec's training section: numerics, compilation, optimizer, learning
    rate schedule and best-checkpoint rule. A launch recorded before a choice was a spec field ran msx's default."""

    def setting(name: str) -> str:
        value = training.get(name, getattr(TrainingConfig, name))
        return str(value).lower() if isinstance(value, bool) else str(value)

    return (
        f"precision {setting('precision')}, compile {setting('compile')}, optimizer {setting('optimizer')}, "
        f"schedule {setting('schedule')}, best checkpoint {setting('best_checkpoint')}"
    )


def recipes_line(recipes: dict) -> str:
    """The backbones trained apart from the study's recipe, from its recorded spec: "unet: training.lr=0.008, ..."."""
    return "; ".join(
        f"{backbone}: " + ", ".join(
            f"{section}.{name}={value}" for section, fields in sections.items() for name, value in fields.items()
        )
        for backbone, sections in recipes.items()
    )


def _protocol_blocks(summary: StudySummary) -> list[Block]:
    """The final evaluation under each compared inference protocol, from the same weights (docs/FIDELITY.md)."""
    if not summary.compared:
        return []
    blocks: list[Block] = [
        Heading("Inference protocols compared"),
        Text(
            "The same trained weights (each backbone's configuration above, every fold) scored once more on the "
            "test patients under another inference protocol. "
            + " ".join(
                f"{p.name}: {p.description}."
                for p in map(PROTOCOLS.get, (summary.protocol, *(c.protocol for c in summary.compared)))
            )
            + " Selection, the tables above and the registered model use the study's protocol, "
            f"{summary.protocol}."
        ),
    ]
    for compared in summary.compared:
        blocks += [
            Heading(f"Test patients: {summary.protocol} and {compared.protocol} side by side", 3),
            Text(f"Mean over folds; Δ = {compared.protocol} minus {summary.protocol}."),
            protocols_side_by_side(summary, compared),
            Heading(f"Test patients under the {compared.protocol} protocol", 3),
            metrics_table(summary, "test", compared.rows),
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
            reference = (
                f"models:/{version.name}@{version.aliases[0]}" if version.aliases
                else f"models:/{version.name}/{version.version}"
            )
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
            ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(c.searched.items()))
            or "-",
            c.status,
            str(rung) if rung is not None else "-",
            f"{c.rung_means[rung]:.3f}" if rung is not None else "-",
            f"{c.final_score:.3f}" if c.final_score is not None else "-",
            str(c.epochs_trained),
        ))
    rungs = search.describe_rungs() if any(search.rungs.values()) else "none before the last epoch"
    full, trained = search.epochs_full_grid, search.epochs_trained
    text = (
        f"Early stopping by configuration: at each rung (epochs {rungs}) a configuration's folds were judged together, "
        f"on their mean validation Dice. {trained} of {full} fold-epochs were trained, {full - trained} "
        f"({(full - trained) / full:.0%}) fewer than training every configuration on every fold to epoch "
        f"{search.describe_last_epochs()}."
        if full else "No configuration was opened."
    )
    if search.cut_short:
        text += f" The search was cut short by its time budget ({search.time_budget_s:.0f} s)."
    return [
        Heading("Search and early stopping"),
        Text(text),
        Table(
            (
                "configuration", "searched", "status", "last rung", "mean val Dice there", "final mean val Dice",
                "fold-epochs"
            ),
            tuple(rows)
        ),
    ]


def comparison_blocks(comparisons: list[PairedComparison]) -> list[Block]:
    """Per split, the paired comparisons (comparisons.py) as one table, with what was paired and what n allows."""
    if not comparisons:
        return []
    blocks: list[Block] = [
        Heading("Paired comparisons"),
        Text(
            "Are the differences in the tables real? Within each backbone (its configuration chosen on validation), "
            "every strategy is compared with the strategy chosen on validation; the backbones are compared with "
            "each other, each at its chosen strategy. Paired by patient: each patient's mean over its scans of the "
            "split (a patient's time points are not independent, so the patient is the unit), the same patients "
            f"under both arms. A - B: mean paired difference with its {CONFIDENCE:.0%} percentile bootstrap interval; "
            "p: two-sided Wilcoxon signed-rank test (exact; zero differences dropped); Holm: p corrected within "
            f"each family (one backbone's strategies, or the backbones) per split and metric. Supported: Holm "
            f"p < {ALPHA:g}. With m non-zero differences the exact p cannot go below 2/2^m."
        ),
    ]
    if any(c.is_r_aac for c in comparisons):
        blocks.append(Text(
            "Uncertainty: within each backbone, at its chosen strategy, every uncertainty measure's nDSC R-AAC "
            "is compared with a random voxel order's (family 'uncertainty measures', metric R-AAC, A the "
            "measure, B random; Holm within the family), and the backbones with each other on each measure's "
            "R-AAC (metric '<measure> R-AAC'). Lower R-AAC is better: a negative A - B means A ranks the errors "
            "better, so a measure below random finds where its masks are wrong."
        ))
    for split in dict.fromkeys(c.split for c in comparisons):
        rows = [c for c in comparisons if c.split == split]
        blocks.append(Heading(f"{SPLIT_NAMES[split].capitalize()} patients: paired differences", 3))
        ns = sorted({c.n for c in rows})
        too_few = [c for c in rows if c.too_few]
        note = f"n = {', '.join(map(str, ns))} patients per comparison."
        if too_few:
            smallest = min(c.nonzero for c in too_few)
            note += (
                f" n too small: with {smallest} non-zero paired differences the smallest possible p is "
                f"2/2^{smallest} = {2 / 2**smallest:.4f} >= {ALPHA:g}, so {len(too_few)} of these {len(rows)} "
                "comparisons could not be supported whatever the data; their intervals show sizes, not evidence."
            )
        if split == "val":
            note += (
                " The validation patients also chose the strategies and configurations compared here, which favours "
                "the chosen ones."
            )
        blocks.append(Text(note))
        blocks.append(
            Table(
                ("family", "metric", "A", "B", "n", f"A - B [{CONFIDENCE:.0%} CI]", "p", "Holm p", "verdict"),
                tuple(
                    (
                        c.family, _metric_label(c.metric), c.first, c.second, str(c.n),
                        f"{c.mean_difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]" if c.n else "n/a",
                        _p(c.p), _p(c.p_holm), _verdict(c),
                    )
                    for c in rows
                ),
            )
        )
    return blocks


def _metric_label(metric: str) -> str:
    """DSC, ISBI; `r_aac_total` as "total R-AAC", as the uncertainty table heads it."""
    if metric.startswith(R_AAC_PREFIX):
        return f"{metric.removeprefix(R_AAC_PREFIX)} R-AAC"
    return metric.upper()


def _p(p: float) -> str:
    return "n/a" if p != p else f"{p:.4f}"


def _verdict(comparison: PairedComparison) -> str:
    if comparison.supported:
        return "supported"
    if comparison.too_few:
        return "n too small"
    return "not supported"


def _uncertainty_blocks(summary: StudySummary, split: str = "test") -> list[Block]:
    """The Shifts 2.0 scores of each backbone's chosen configuration: nDSC and lesion F1 of each strategy's masks, and
    their nDSC R-AAC under each uncertainty measure, beside a random order's."""
    names = list(dict.fromkeys(
        metric for row in summary.rows for (at, _, metric) in row.summary
        if at == split and is_uncertainty_score(metric)
    ))
    if not names:
        return []
    random = r_aac_key(RANDOM_UNCERTAINTY)
    names = [name for name in names if name != random] + ([random] if random in names else [])
    lines = []
    for row in summary.rows:
        for strategy in summary.strategies:
            cells = (row.summary.get((split, strategy, name), (math.nan, math.nan)) for name in names)
            lines.append((
                row.backbone, strategy,
                *("n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}" for mean, std in cells),
            ))
    headers = [name.removeprefix(R_AAC_PREFIX) + " R-AAC" if name.startswith(R_AAC_PREFIX) else name for name in names]
    return [
        Heading(f"Uncertainty: {SPLIT_NAMES[split]} patients"),
        Text(
            "Scored as the Shifts 2.0 multiple-sclerosis benchmark scores (docs/SCIENCE.md), mean ± std over the "
            "folds: nDSC (normalised Dice, reference lesion load 0.001) and lesion F1 (IoU >= 0.25) of each "
            "strategy's masks, and their nDSC R-AAC under each uncertainty measure from the sampled chains (the "
            "area above the retention curve over the brain's voxels, the most uncertain replaced by the truth "
            "first; lower is better). total: entropy of the chains' mean prediction; data: the chains' mean "
            "entropy; knowledge: their difference, the chains' disagreement; steps: entropy of the mean over every "
            "step of every chain. random: a random voxel order, what an uncertainty that knows nothing scores."
        ),
        Table(("backbone", "strategy", *headers), tuple(lines)),
    ]


def _time_blocks(record: StudyRecord) -> list[Block]:
    """Where the fold runs' time went, by configuration: the mean seconds per fold of each phase, and their sums."""
    timed = [trial for trial in record.trials if trial.phase_seconds]
    if not timed:
        return []
    measured = list(dict.fromkeys(phase for trial in timed for phase in trial.phase_seconds))
    phases = [phase for phase in (STARTUP_PHASE, TRAINING_PHASE, VALIDATION_PHASE) if phase in measured]
    phases += [phase for phase in measured if phase not in phases]
    rows = []
    for configuration in dict.fromkeys(trial.configuration for trial in timed):
        trials = [trial for trial in timed if trial.configuration == configuration]
        means = [sum(trial.phase_seconds.get(phase, 0.0) for trial in trials) / len(trials) for phase in phases]
        rows.append((
            configuration, str(len(trials)), *(f"{value:.0f}" for value in means), f"{sum(means):.0f}",
            f"{sum(means) * len(trials):.0f}",
        ))
    return [
        Heading("Where the time went"),
        Text(
            "Mean seconds per fold, over the folds that started. start-up: from the trial's process start to its "
            "first training step; evaluation: the final evaluation under each protocol. A fold paused at a rung "
            "counts its last run's phases only. Folds run side by side, so the study takes less than the sum over "
            "its folds."
        ),
        Table(
            ("configuration", "folds", *(phase.replace("_", " ") for phase in phases), "per fold", "sum over folds"),
            tuple(rows),
        ),
    ]


def _duration(delta: timedelta) -> str:
    minutes, seconds = divmod(int(delta.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


# ---- the command's work ---------------------------------------------------------------------------


def write_report(tracking_uri: str, study: str, out: Path) -> ReportFiles:
    """Read the study's latest launch, write report.md, report.html and figures/ to `out`, and log them to the
    launch's run under report/."""
    client = MlflowClient(tracking_uri)
    record = read_study(client, study)
    summary = summarise_study(record)
    figures = study_figures(record, summary, retention_summaries(client, record, summary))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for picture, figure in figures:
        figure.savefig(out / picture.file, format="png")
    overlays = example_overlays(client, record, summary, out)
    pictures = [picture for picture, _ in figures] + overlays
    images = {picture.file: (out / picture.file).read_bytes() for picture in pictures}
    comparisons = study_comparisons(compared_rows(client, record, summary), summary.strategies, ("test", "val"))
    blocks = report_blocks(record, summary, [picture for picture, _ in figures], overlays, comparisons)
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page.write_text(render_html(blocks, images, f"msx report: {study} ({record.launch})"), encoding="utf-8")
    written = (markdown, page, *(out / picture.file for picture in pictures))
    # File by file: `out` may be a folder that holds more than this report.
    for path in written:
        client.log_artifact(
            record.run_id, str(path), (Path(REPORT_ARTIFACT_PATH) / path.parent.relative_to(out)).as_posix()
        )
    return ReportFiles(markdown, page, written[2:], record)
