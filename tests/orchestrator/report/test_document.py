"""`msx report` on a real SQLite MLflow store written the way a launch writes it (tracking/, study/driver.py)."""

import base64
import csv
import json
import re
import statistics
from dataclasses import dataclass

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from msx.models.fold import MODEL_DIR, RETENTION_CURVES_FILE, SCAN_METRICS_FILE
from msx.models.metrics import VOLUME_NAMES, r_aac_of_curve, retention_fractions, split_metrics
from msx.orchestrator.cli import main
from msx.orchestrator.report.document import recipes_line, training_line
from msx.orchestrator.spec import load_spec
from msx.orchestrator.study.search_record import ConfigurationSummary, SearchSummary
from msx.orchestrator.tracking.callback import TrialRunsCallback
from msx.orchestrator.tracking.store import (
    CONFIGURATION_STATUS_TAG,
    RUNG_METRIC,
    SCAN_METRICS_ARTIFACT,
    STUDY_TAG,
    TRIAL_ID_TAG,
    child_runs,
    ensure_experiment,
    log_study_start,
    tracking_uri_scope,
)
from msx.orchestrator.tracking.summaries import log_search_record

BACKBONES = ("unet", "segresnet")
STRATEGIES = ("mean", "staple")
FOLDS = (1, 2, 3)
EPOCHS = 4
VALIDATE_EVERY = 2
SCAN_COLUMNS = ("dsc", "tpr", "ppv", "ltpr", "lfpr", "avd", "assd")
COLUMNS = (*SCAN_COLUMNS, "isbi")
SHIFTS_COLUMNS = ("ndsc", "lesion_f1", "r_aac_random", "r_aac_total", "r_aac_knowledge")
# Plausible ranges: fractions, AVD in percent, ASSD in mm.
RANGES = {
    "dsc": (0.3, 0.9), "tpr": (0.3, 0.9), "ppv": (0.3, 0.9), "ltpr": (0.3, 0.9), "lfpr": (0.0, 0.5), "avd": (0.0, 60.0),
    "assd": (0.0, 5.0)
}
# A fold's validation and test scans (one patient each).
SCANS = {
    "val": ("training04_01", "training04_02", "training04_03"),
    "test": ("training05_01", "training05_02", "training05_03", "training05_04")
}
SPEC = load_spec("smoke").with_overrides({"inference.strategies": STRATEGIES, "training.epochs": EPOCHS})
LATEST_START_MS = 1_750_000_000_000
COHORT = "/data/ISBI_2015/training"


# The smoke space's protocol, and the one its final evaluation is also scored under.
PROTOCOL, COMPARED = SPEC.inference.protocol, SPEC.inference.compare_protocols[0]


def scan_rows(rng: np.random.Generator) -> list[dict]:
    """A fold's per-scan rows as the worker writes them: under each protocol, each strategy's metrics and lesion
    volumes (mm^3)."""
    rows = []
    for protocol in (PROTOCOL, COMPARED):
        for split, scans in SCANS.items():
            if protocol == COMPARED and split != "test":
                continue  # a compared protocol scores the test patients only
            for scan in scans:
                truth = float(rng.uniform(500, 20_000))
                for strategy in STRATEGIES:
                    metrics = {metric: float(rng.uniform(*RANGES[metric])) for metric in SCAN_COLUMNS}
                    volumes = dict(zip(VOLUME_NAMES, (truth * float(rng.uniform(0.5, 1.5)), truth), strict=True))
                    # The Shifts scores: under the study's own protocol only, as the worker computes them.
                    shifts = (
                        {name: float(rng.uniform(0.0, 1.0)) for name in SHIFTS_COLUMNS} if protocol == PROTOCOL else {}
                    )
                    rows.append({
                        "protocol": protocol, "split": split, "scan": scan, "strategy": strategy, **metrics, **volumes,
                        **shifts,
                    })
    return rows


RETENTION_MEASURES = ("total", "knowledge", "random")


def retention_curve(row: dict, measure: str) -> list[float]:
    """A made-up nDSC retention curve of a scan's row: 1 with everything replaced, the row's nDSC with nothing."""
    power = 1 + RETENTION_MEASURES.index(measure)
    return list(1 - (1 - float(row["ndsc"])) * retention_fractions() ** power)


def retention_file(rows: list[dict]) -> dict:
    """The fold's retention curves as the worker writes them: the study's protocol's rows only."""
    curves = [
        {"split": row["split"], "scan": row["scan"], "strategy": row["strategy"], "measure": measure,
         "ndsc": retention_curve(row, measure)}
        for row in rows if row["protocol"] == PROTOCOL
        for measure in RETENTION_MEASURES
    ]
    return {"fractions": retention_fractions().tolist(), "curves": curves}


def reported_metrics(rows: list[dict]) -> dict[str, float]:
    """The final report's split means, as the worker keys them: the compared protocol's under its name."""
    metrics = split_metrics([row for row in rows if row["protocol"] == PROTOCOL])
    compared = split_metrics([row for row in rows if row["protocol"] == COMPARED])
    return {**metrics, **{f"{COMPARED}/{key}": value for key, value in compared.items()}}


@dataclass(eq=False)
class TuneTrial:
    """What the tracking callback reads of a Tune trial."""

    trial_id: str
    config: dict


def trial_id(launch, configuration, fold):
    # Tune trial ids are unique across launches; the callback would take a repeated one for a restarted trial.
    return f"{launch}_{configuration}_{fold}"


def phase_seconds(fold: int) -> dict[str, float]:
    return {
        "seconds/training": 20.0 * fold, "seconds/validation": 5.0, "seconds/evaluation_msx": 8.0,
        "seconds/evaluation_reference": 12.0
    }


def write_trial(callback, storage, launch, backbone, configuration, fold, rows, status):
    """A fold run written by the launch's own TrialRunsCallback, one worker report per epoch.

    `rows`: the final evaluation's per-scan rows, reported as the worker does (split means, and a final
    checkpoint holding the rows), or None for a trial that stopped (status FINISHED: the scheduler stopped it)
    or failed before it.
    """
    trial = TuneTrial(
        trial_id(launch, configuration, fold),
        {"backbone": backbone, "fold": fold, "configuration": configuration, "training.lr": 0.002}
    )
    callback.log_trial_start(trial)
    last_epoch = EPOCHS if rows is not None or status == "FAILED" else VALIDATE_EVERY
    for epoch in range(1, last_epoch + 1):
        report = {"epoch": epoch, "train_loss": 1.0 / epoch + 0.01 * fold, "lr": 1e-3, "training_iteration": epoch}
        if epoch == 1:
            report["startup/first_step_s"] = 10.0 + fold
        if epoch % VALIDATE_EVERY == 0:
            report.update(val_dice_now=0.2 * epoch / EPOCHS + 0.01 * fold, val_dice=0.2 * epoch / EPOCHS + 0.01 * fold)
        if epoch == EPOCHS and rows is not None:
            checkpoint = storage / "checkpoints" / trial.trial_id
            (checkpoint / MODEL_DIR).mkdir(parents=True)
            (checkpoint / MODEL_DIR / "weights.pt").write_bytes(b"weights")
            (checkpoint / SCAN_METRICS_FILE).write_text(json.dumps(rows))
            (checkpoint / RETENTION_CURVES_FILE).write_text(json.dumps(retention_file(rows)))
            report.update(reported_metrics(rows), final=1, checkpoint_path=str(checkpoint), **phase_seconds(fold))
        callback.log_trial_result(epoch, trial, report)
    callback.log_trial_end(trial, failed=status == "FAILED")


def write_launch(client, tracking_uri, storage, study, start_ms, trials):
    """A launch run as run_study makes it; `trials`: (backbone, configuration, fold, per-scan rows, status)."""
    experiment_id = ensure_experiment(tracking_uri, study, storage / "mlartifacts")
    launch = f"{study}-{start_ms}"
    parent_id = (
        client.create_run(experiment_id, run_name=launch, start_time=start_ms, tags={STUDY_TAG: launch}).info.run_id
    )
    log_study_start(parent_id, tracking_uri, {**SPEC.to_dict(), "name": study}, COHORT)
    with tracking_uri_scope(tracking_uri):
        callback = TrialRunsCallback(tracking_uri, study, parent_id, STRATEGIES, len(FOLDS))
        callback.setup()
        for trial in trials:
            write_trial(callback, storage, launch, *trial)
    client.set_terminated(parent_id, "FINISHED", end_time=start_ms + 3_723_000)
    return parent_id


def recorded_scan_rows(client, tmp_path, launch, configuration, fold) -> list[dict]:
    """The scan_metrics.csv of a fold run, as MLflow holds it."""
    run = client.search_runs(
        [client.get_experiment_by_name("smoke").experiment_id],
        filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id(launch, configuration, fold)}'",
    )[0]
    with open(client.download_artifacts(run.info.run_id, SCAN_METRICS_ARTIFACT, str(tmp_path)), newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Studies 'smoke' (an earlier and the latest launch, the most recent of all), 'older' and 'empty'.

    Also the latest launch's finished folds' per-scan rows, read back from their fold runs' CSVs.
    """
    storage = tmp_path_factory.mktemp("report") / "runs"
    storage.mkdir()
    tracking_uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    rng = np.random.default_rng(7)

    write_launch(
        client, tracking_uri, storage, "smoke", LATEST_START_MS - 86_400_000,
        [("unet", "unet-c1", f, scan_rows(rng), "FINISHED") for f in FOLDS],
    )
    latest = write_launch(
        client, tracking_uri, storage, "smoke", LATEST_START_MS,
        [(b, f"{b}-c1", f, scan_rows(rng), "FINISHED") for b in BACKBONES for f in FOLDS]
        + [("unet", "unet-c2", 1, None, "FAILED"), ("unet", "unet-c2", 2, None, "FINISHED")],
    )
    downloads = tmp_path_factory.mktemp("csv")
    finished = {
        (b, f): recorded_scan_rows(client, downloads / f"{b}{f}", f"smoke-{LATEST_START_MS}", f"{b}-c1", f)
        for b in BACKBONES
        for f in FOLDS
    }
    client.create_registered_model("msx-smoke")
    version = client.create_model_version("msx-smoke", f"runs:/{latest}/model", run_id=latest)
    client.set_registered_model_alias("msx-smoke", "champion", version.version)
    # Created after 'smoke' but launched before it: the default goes by launch time.
    write_launch(client, tracking_uri, storage, "older", LATEST_START_MS - 3_600_000,
                 [("unet", "unet-c1", f, scan_rows(rng), "FINISHED") for f in FOLDS])
    write_launch(client, tracking_uri, storage, "empty", LATEST_START_MS - 7_200_000,
                 [("unet", "unet-c1", 1, None, "FAILED")])
    return storage, tracking_uri, latest, finished


def msx_report(*args):
    return CliRunner().invoke(main, ["report", *args], env={"MLFLOW_TRACKING_URI": None, "MSX_STORAGE": None})


@pytest.fixture(scope="module")
def smoke_report(store, tmp_path_factory):
    tracking_uri = store[1]
    out = tmp_path_factory.mktemp("out") / "smoke-report"
    result = msx_report("smoke", "--tracking-uri", tracking_uri, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


def fold_value(rows: list[dict], split: str, strategy: str, metric: str, protocol: str = PROTOCOL) -> float:
    """A fold's number for one cell, by hand from its CSV rows: the mean over the split's scans; for the ISBI
    score, of each scan's DSC/8 + PPV/8 + (1 - LFPR)/4 + LTPR/4 + Corr/4, with Corr the Pearson correlation of
    the predicted and true volumes over those scans."""
    scans = [
        {
            key: float(value) for key, value in row.items()
            if key not in ("protocol", "split", "scan", "strategy") and value != ""
        }
        for row in rows if row["split"] == split and row["strategy"] == strategy and row["protocol"] == protocol
    ]
    assert len(scans) == len(SCANS[split])
    if metric != "isbi":
        return statistics.fmean(scan[metric] for scan in scans)
    corr = statistics.correlation(
        [scan["pred_volume_mm3"] for scan in scans], [scan["gt_volume_mm3"] for scan in scans]
    )
    return statistics.fmean(s["dsc"] / 8 + s["ppv"] / 8 + (1 - s["lfpr"]) / 4 + s["ltpr"] / 4 + corr / 4 for s in scans)


def expected_cell(finished, split, backbone, strategy, metric, protocol=PROTOCOL) -> tuple[float, str]:
    values = [fold_value(finished[(backbone, fold)], split, strategy, metric, protocol) for fold in FOLDS]
    mean = statistics.fmean(values)
    return mean, f"{mean:.3f} ± {statistics.pstdev(values):.3f}"


def table_rows(markdown: str, heading: str, level: int = 2) -> dict[tuple[str, str], list[str]]:
    """(backbone, strategy) -> metric cells of the table under `heading`."""
    marks = "#" * level
    section = re.split(r"\n#+ ", markdown.split(f"{marks} {heading}\n", 1)[1], maxsplit=1)[0]  # to the next heading
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in BACKBONES:
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.mark.parametrize("split, heading", [("test", "Test patients"), ("val", "Validation patients")])
def test_tables_hold_fold_means_and_stds_with_the_best_of_each_column_bold(store, smoke_report, split, heading):
    finished = store[3]
    rows = table_rows((smoke_report[0] / "report.md").read_text(), heading)
    assert set(rows) == {(b, s) for b in BACKBONES for s in STRATEGIES}  # unet-c2 never finished its folds
    for column, metric in enumerate(COLUMNS):
        expected = {key: expected_cell(finished, split, *key, metric) for key in rows}
        for key, (_, text) in expected.items():
            assert rows[key][column].strip("*") == text
        # DSC higher is better, AVD (and LFPR, ASSD) lower.
        pick = max if metric in ("dsc", "tpr", "ppv", "ltpr", "isbi") else min
        best = pick(expected, key=lambda key: expected[key][0])
        for key in rows:
            assert rows[key][column].startswith("**") == (key == best), (metric, key)


def test_the_compared_protocol_has_its_own_test_table(store, smoke_report):
    finished = store[3]
    markdown = (smoke_report[0] / "report.md").read_text()
    rows = table_rows(markdown, f"Test patients under the {COMPARED} protocol", level=3)
    assert set(rows) == {(b, s) for b in BACKBONES for s in STRATEGIES}
    for column, metric in enumerate(COLUMNS):
        for key in rows:
            assert (
                rows[key][column].strip("*") == expected_cell(finished, "test", *key, metric, COMPARED)[1]
            ), (metric, key)
    assert f"Validation patients under the {COMPARED} protocol" not in markdown


def test_both_protocols_side_by_side_with_their_difference(store, smoke_report):
    finished = store[3]
    markdown = (smoke_report[0] / "report.md").read_text()
    assert "## Inference protocols compared" in markdown
    assert "reference: the public MSSegDiff code's" in markdown and "msx: msx's" in markdown
    heading = f"Test patients: {PROTOCOL} and {COMPARED} side by side"
    header = markdown.split(f"### {heading}\n", 1)[1].split("\n| ", 2)[1]
    assert header.startswith(f"backbone | strategy | DSC {PROTOCOL} | DSC {COMPARED} | Δ | TPR {PROTOCOL} |")
    rows = table_rows(markdown, heading, level=3)
    assert set(rows) == {(b, s) for b in BACKBONES for s in STRATEGIES}
    for column, metric in enumerate(COLUMNS):
        for key, cells in rows.items():
            ours = expected_cell(finished, "test", *key, metric)[0]
            theirs = expected_cell(finished, "test", *key, metric, COMPARED)[0]
            assert cells[3 * column : 3 * column + 3] == [f"{ours:.3f}", f"{theirs:.3f}", f"{theirs - ours:+.3f}"]


def test_header_selection_and_registered_model(store, smoke_report):
    finished = store[3]
    markdown = (smoke_report[0] / "report.md").read_text()
    assert markdown.startswith("# Study smoke\n")
    assert f"smoke-{LATEST_START_MS}" in markdown
    assert "6 of 8 trials finished; not finished: 1 failed, 1 stopped early" in markdown
    assert "2025-06-15 15:06:40 UTC" in markdown and "(1 h 02 min)" in markdown
    assert COHORT in markdown
    assert "| training.epochs | 4 |" in markdown  # the parent run's spec params
    assert "| training.schedule | per-step |" in markdown and "| training.best_checkpoint | msx |" in markdown
    assert (
        "| training | precision auto, compile auto, optimizer auto, schedule per-step, best checkpoint msx |"
        in markdown
    )
    val_dsc = {(b, s): expected_cell(finished, "val", b, s, "dsc")[0] for b in BACKBONES for s in STRATEGIES}
    backbone, strategy = max(val_dsc, key=val_dsc.get)
    assert f"backbone {backbone}, configuration {backbone}-c1 (training.lr=0.002), strategy {strategy}; " in markdown
    assert f"validation DSC {val_dsc[(backbone, strategy)]:.3f}" in markdown
    assert "Registered model: msx-smoke version 1, aliases champion (models:/msx-smoke@champion)." in markdown
    assert "| unet-c2-fold1 | failed |" in markdown and "| unet-c2-fold2 | stopped early |" in markdown
    assert "6 of 8 trials finished" in smoke_report[1]


def test_figures_are_pngs_linked_from_markdown_and_embedded_in_html(smoke_report):
    out = smoke_report[0]
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    figures = re.findall(r"!\[[^]]*\]\((figures/[^)]+\.png)\)", markdown)
    assert set(figures) == {
        "figures/test_dice_heatmap.png", "figures/test_dice_folds.png", "figures/training_curves.png",
        "figures/retention_curves.png",
    }
    for figure in figures:
        data = (out / figure).read_bytes()
        with Image.open(out / figure) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
        assert f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" in page
    assert "<strong>" in page and "Test patients" in page and "src=\"figures/" not in page


def test_report_is_logged_to_the_latest_launch_run(store, smoke_report):
    _, tracking_uri, latest, _ = store
    client = MlflowClient(tracking_uri)
    assert {a.path for a in client.list_artifacts(latest, "report")} >= {
        "report/report.md", "report/report.html", "report/figures"
    }
    assert {a.path for a in client.list_artifacts(latest, "report/figures")} == {
        "report/figures/test_dice_heatmap.png", "report/figures/test_dice_folds.png",
        "report/figures/training_curves.png",
        "report/figures/retention_curves.png",
    }


def test_default_is_the_most_recently_launched_study_in_the_storage_store(store):
    storage = store[0]
    result = msx_report("--storage", str(storage))
    assert result.exit_code == 0, result.output
    assert "study 'smoke'" in result.output
    assert (storage / "smoke" / "report" / "report.md").read_text().startswith("# Study smoke\n")
    assert (storage / "smoke" / "report" / "report.html").is_file()


def test_unknown_study_lists_the_studies(store):
    result = msx_report("nope", "--tracking-uri", store[1])
    assert result.exit_code == 1
    assert "no study named 'nope'" in result.output and "studies: empty, older, smoke" in result.output


def test_study_without_finished_trials_fails_clearly(store):
    result = msx_report("empty", "--tracking-uri", store[1], "--out", str(store[0] / "unused"))
    assert result.exit_code == 1
    assert "0 of 1 trials finished; not finished: 1 failed; nothing to report" in result.output


def test_report_shows_pruned_configurations_and_what_early_stopping_saved(tmp_path):
    storage = tmp_path / "runs"
    storage.mkdir()
    tracking_uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    rng = np.random.default_rng(5)
    launch_id = write_launch(
        client, tracking_uri, storage, "pruned", LATEST_START_MS,
        [("unet", "unet-c1", f, scan_rows(rng), "FINISHED") for f in FOLDS]
        + [("unet", "unet-c2", f, None, "FINISHED") for f in FOLDS],
    )
    configuration = dict(
        searched={"training.lr": 0.002}, folds_waiting=0, last_report=None, decided_at=1.0, protected=False
    )
    summary = SearchSummary(
        folds=len(FOLDS), epochs={"unet": EPOCHS}, rungs={"unet": (VALIDATE_EVERY,)}, concurrency=2,
        configurations=(
            ConfigurationSummary("unet-c1", "unet", status="complete", rung_means={2: 0.6}, final_score=0.7,
                                 epochs_trained=len(FOLDS) * EPOCHS, **configuration),
            ConfigurationSummary("unet-c2", "unet", status="pruned", rung_means={2: 0.1}, final_score=None,
                                 epochs_trained=len(FOLDS) * VALIDATE_EVERY, **configuration),
        ),
        finished=True, cut_short=False, time_budget_s=None, elapsed_s=100.0, pauses=4, paused_fold_s=40.0,
        median_start_s=30.0, median_resume_s=25.0, median_epoch_s=2.0, resumes=2, idle_slot_s=10.0,
        idle_while_waiting_slot_s=5.0,
    )
    experiment_id = client.get_run(launch_id).info.experiment_id
    runs = {run.data.tags["msx.configuration"]: run.info.run_id for run in child_runs(client, experiment_id, launch_id)}
    log_search_record(client, launch_id, runs, summary)
    assert client.get_run(runs["unet-c2"]).data.tags[CONFIGURATION_STATUS_TAG] == "pruned"
    assert [(m.step, m.value) for m in client.get_metric_history(runs["unet-c2"], RUNG_METRIC)] == [(2, 0.1)]

    result = msx_report("pruned", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Search and early stopping" in markdown
    assert "18 of 24 fold-epochs were trained, 6 (25%) fewer than training every configuration" in markdown
    assert "| unet-c2 | training.lr=0.002 | pruned | 2 | 0.100 | - | 6 |" in markdown
    assert "| unet-c1 | training.lr=0.002 | complete | 2 | 0.600 | 0.700 | 12 |" in markdown
    assert "| unet-c2-fold1 | pruned at epoch 2, mean validation Dice 0.1000 |" in markdown


def comparison_rows(markdown: str, split_heading: str) -> dict[tuple[str, str, str, str], list[str]]:
    """(family, metric, A, B) -> the other cells of the paired-differences table under `split_heading`."""
    section = markdown.split(f"### {split_heading}: paired differences\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] != "family" and not cells[0].startswith("---"):
            rows[tuple(cells[:4])] = cells[4:]
    return rows


def test_paired_comparisons_by_patient_with_exact_p_and_an_honest_n(store, smoke_report):
    from scipy.stats import wilcoxon

    finished = store[3]
    markdown = (smoke_report[0] / "report.md").read_text()
    assert "## Paired comparisons\n" in markdown and "Paired by patient" in markdown
    assert "Lower R-AAC is better: a negative A - B means A ranks the errors better" in markdown
    val_dsc = {(b, s): expected_cell(finished, "val", b, s, "dsc")[0] for b in BACKBONES for s in STRATEGIES}
    chosen = {b: max(STRATEGIES, key=lambda s: val_dsc[(b, s)]) for b in BACKBONES}
    for split, heading in (("test", "Test patients"), ("val", "Validation patients")):
        rows = comparison_rows(markdown, heading)
        # One family per backbone (the other strategy against the chosen one) and the backbones, for DSC and ISBI;
        # then per backbone total and knowledge against random, and the backbones on each of the three R-AAC.
        assert len(rows) == 2 * (len(BACKBONES) * (len(STRATEGIES) - 1) + 1) + len(BACKBONES) * 2 + 3
        ordered = sorted(BACKBONES)  # the report's row order
        first, second = (f"{b} ({chosen[b]})" for b in ordered)
        for metric in ("dsc", "isbi"):
            # Each fold's test (or validation) patient is one unit: its mean over its scans, by hand from the CSVs.
            a = [fold_value(finished[(ordered[0], f)], split, chosen[ordered[0]], metric) for f in FOLDS]
            b = [fold_value(finished[(ordered[1], f)], split, chosen[ordered[1]], metric) for f in FOLDS]
            n, difference, p, holm_p, verdict = rows[("backbones", metric.upper(), first, second)]
            assert n == "3"
            assert difference.startswith(f"{statistics.fmean(x - y for x, y in zip(a, b, strict=True)):+.3f} [")
            assert p == f"{wilcoxon(a, b).pvalue:.4f}" == holm_p  # a family of one
            assert verdict == "n too small"  # three patients: p >= 2/2^3
        for backbone in BACKBONES:
            r_aac = {m: [fold_value(finished[(backbone, f)], split, chosen[backbone], f"r_aac_{m}") for f in FOLDS]
                     for m in ("total", "knowledge", "random")}
            for measure in ("total", "knowledge"):
                family = f"{backbone} ({chosen[backbone]}): uncertainty measures"
                n, difference, p, holm_p, verdict = rows[(family, "R-AAC", measure, "random")]
                differences = [x - y for x, y in zip(r_aac[measure], r_aac["random"], strict=True)]
                assert n == "3" and difference.startswith(f"{statistics.fmean(differences):+.3f} [")
                assert p == f"{wilcoxon(differences).pvalue:.4f}"
        a, b = ([fold_value(finished[(backbone, f)], split, chosen[backbone], "r_aac_total") for f in FOLDS]
                for backbone in ordered)
        n, difference, p, holm_p, verdict = rows[("backbones", "total R-AAC", first, second)]
        assert n == "3" and difference.startswith(
            f"{statistics.fmean(x - y for x, y in zip(a, b, strict=True)):+.3f} ["
        )
        assert p == f"{wilcoxon(a, b).pvalue:.4f}" == holm_p
        assert "smallest possible p is 2/2^3 = 0.2500" in markdown.split(f"### {heading}: paired differences", 1)[1]


def test_the_training_line_names_each_training_choice_of_the_recorded_spec():
    assert training_line(load_spec("paper").to_dict()["training"]) == (
        "precision fp32, compile false, optimizer adamw, schedule per-epoch, best checkpoint reference"
    )
    # A launch recorded before these were spec fields trained with msx's defaults.
    assert training_line({"epochs": 4}) == (
        "precision auto, compile auto, optimizer auto, schedule per-step, best checkpoint msx"
    )


def test_the_recipes_line_names_each_backbone_trained_apart_with_its_fields():
    recipes = load_spec("smoke").to_dict()["recipes"]
    assert recipes_line(recipes) == (
        "unet: training.lr=0.008, training.epochs=32, training.validate_every=16, training.lesion_patch_fraction=0.5"
    )


def test_where_the_time_went_by_backbone_from_each_fold_runs_phases(store, smoke_report):
    out, _ = smoke_report
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Where the time went\n", 1)[1].split("\n## ", 1)[0]
    header, _, *lines = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")
    ]
    assert header == [
        "configuration", "folds", "start-up", "training", "validation", "evaluation msx", "evaluation reference",
        "per fold", "sum over folds",
    ]
    rows = {cells[0]: cells for cells in lines}
    mean_fold = statistics.fmean(FOLDS)
    for backbone in BACKBONES:
        per_fold = 10 + mean_fold + 20 * mean_fold + 5 + 8 + 12
        assert rows[f"{backbone}-c1"][1:] == [
            str(len(FOLDS)), f"{10 + mean_fold:.0f}", f"{20 * mean_fold:.0f}", "5", "8", "12", f"{per_fold:.0f}",
            f"{per_fold * len(FOLDS):.0f}",
        ], rows[f"{backbone}-c1"]
    # unet-c2's folds stopped before their final evaluation: their start-up is all they measured.
    assert rows["unet-c2"][1:7] == ["2", f"{10 + 1.5:.0f}", "0", "0", "0", "0"]


def test_the_uncertainty_table_holds_the_shifts_scores_with_the_random_row_last(store, smoke_report):
    _, _, _, finished = store
    out, _ = smoke_report
    markdown = (out / "report.md").read_text()
    section = markdown.split("## Uncertainty: test patients\n", 1)[1].split("\n## ", 1)[0]
    header, _, *lines = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")
    ]
    assert header == ["backbone", "strategy", "ndsc", "lesion_f1", "total R-AAC", "knowledge R-AAC", "random R-AAC"]
    rows = {(cells[0], cells[1]): cells[2:] for cells in lines}
    assert set(rows) == {(b, s) for b in BACKBONES for s in STRATEGIES}
    for (backbone, strategy), cells in rows.items():
        for name, cell in zip(
            ("ndsc", "lesion_f1", "r_aac_total", "r_aac_knowledge", "r_aac_random"), cells, strict=True
        ):
            values = [fold_value(finished[(backbone, fold)], "test", strategy, name) for fold in FOLDS]
            assert (
                cell == f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"
            ), (backbone, strategy, name)


def test_the_retention_curves_are_each_chosen_strategys_mean_over_folds_of_its_test_scans(store):
    from msx.orchestrator.report.record import read_study
    from msx.orchestrator.report.summary import retention_summaries, summarise_study

    _, tracking_uri, _, finished = store
    client = MlflowClient(tracking_uri)
    record = read_study(client, "smoke")
    summaries = retention_summaries(client, record, summarise_study(record))
    val_dsc = {(b, s): expected_cell(finished, "val", b, s, "dsc")[0] for b in BACKBONES for s in STRATEGIES}
    chosen = {b: max(STRATEGIES, key=lambda s: val_dsc[(b, s)]) for b in BACKBONES}
    assert [(r.backbone, r.strategy, r.folds) for r in summaries] == [
        (b, chosen[b], len(FOLDS)) for b in ("segresnet", "unet")
    ]
    for summary in summaries:
        assert list(summary.curves) == list(RETENTION_MEASURES)
        np.testing.assert_allclose(summary.fractions, retention_fractions())
        for measure, curve in summary.curves.items():
            fold_means = [
                np.mean([retention_curve(row, measure) for row in finished[(summary.backbone, fold)]
                         if row["split"] == "test" and row["strategy"] == summary.strategy
                         and row["protocol"] == PROTOCOL], axis=0)
                for fold in FOLDS
            ]
            np.testing.assert_allclose(curve, np.mean(fold_means, axis=0), atol=1e-9)
            # The area above the mean curve is the mean of the folds' areas: what the uncertainty table averages.
            assert r_aac_of_curve(curve) == pytest.approx(statistics.fmean(r_aac_of_curve(m) for m in fold_means))
