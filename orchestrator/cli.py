"""The `msx` command line: one entry point per job."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import click

from msx.models.data.folds import resolve_folds
from msx.models.registry import UnknownNameError

from .data import prepare_cohort
from .data_commands import data
from .predict_command import predict
from .provenance import study_provenance
from .spec import SpecError, load_spec, spec_from_dict

# Errors that describe bad input: printed as one line, exit status 1, before anything expensive starts.
INPUT_ERRORS = (SpecError, UnknownNameError, ValueError, FileNotFoundError)


def _fail_cleanly(error: Exception) -> click.ClickException:
    return click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """msx: diffusion MS lesion segmentation studies on Ray Tune, Ray Train and MLflow."""


@main.command()
@click.option("--space", default=None, help="Search space: a bundled name (smoke, paper, hpo) or a YAML path  [default: smoke; with --resume, the study's own].")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Cohort: an ISBI-layout folder or a manifest (.csv, .yaml) (default: the spec's, else synthetic).")
@click.option("--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"), show_default=True, help="Folder for experiments, checkpoints and the default MLflow store (env MSX_STORAGE).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI (default: SQLite file in --storage).")
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="A running Ray cluster. Its dashboard URL (http://HEAD:8265) submits the study as a Ray job and streams its logs; a GCS address (HOST:6379, auto) runs the driver here. Default: join the Ray running on this machine, else start one.")
@click.option("--cluster", "cluster_file", type=click.Path(path_type=Path), default=None, help="A Ray cluster launcher YAML (cluster/a100.yaml): brings the cluster up, submits the study as a Ray job through a tunnel to its dashboard, and streams its logs.")
@click.option("--resume", "resume_name", default=None, metavar="NAME", help="Continue the unfinished study NAME (a study, or an experiment's latest): finished trials are kept, interrupted ones continue from their last checkpoint.")
@click.option("--fresh", is_flag=True, help="Start a new study even when the experiment has an unfinished one (which stays as it is).")
@click.pass_context
def launch(
    context: click.Context,
    space: str | None,
    data: Path | None,
    storage: Path,
    tracking_uri: str | None,
    address: str | None,
    cluster_file: Path | None,
    resume_name: str | None,
    fresh: bool,
) -> None:
    """Run a whole leave-one-subject-out study and register the best model.

    An experiment whose latest study never ended (its driver died) is resumed automatically.
    """
    if resume_name and (space or fresh):
        raise click.UsageError("--resume continues a study with its own spec and data: leave out --space and --fresh")
    if cluster_file or (address and address.startswith(("http://", "https://"))):
        _submit_launch(context, cluster_file, address)
        return
    _launch_here(space, data, storage.resolve(), tracking_uri, address, resume_name, fresh)


def _launch_here(
    space: str | None, data: Path | None, storage: Path, tracking_uri: str | None, address: str | None,
    resume_name: str | None, fresh: bool,
) -> None:
    """The driver in this process: checks, then Ray, then the study."""
    from .study_state import find_study, unfinished_study
    from .tracking import check_tracking_server, default_tracking_uri

    started = time.monotonic()
    try:
        if resume_name:
            resume = _resumable(find_study(storage, resume_name))
            spec = spec_from_dict(resume.spec, f"study record of {resume.study}")
            data = data or Path(resume.data_root)
        else:
            spec = load_spec(space or "smoke")
            resume = None if fresh else unfinished_study(storage, spec.name)
            if resume is not None:
                resume = _auto_resumable(resume, spec, data)
        storage.mkdir(parents=True, exist_ok=True)
        cohort = prepare_cohort(spec, data, storage, click.echo)
        # Before Ray: the files the trials will read, as they are now.
        provenance = study_provenance(cohort, resolve_folds(spec.data.folds, cohort.patients))
        if resume is not None and provenance.data_fingerprint != resume.data_fingerprint:
            raise ValueError(
                f"{cohort.root}: the data changed since study {resume.study} started (fingerprint "
                f"{resume.data_fingerprint} then, {provenance.data_fingerprint} now); its trials would not compare. "
                "Restore the data, or start a new study with --fresh"
            )
    except INPUT_ERRORS as error:  # CohortError is a ValueError
        raise _fail_cleanly(error) from None
    if resume is not None:
        if tracking_uri and tracking_uri != resume.tracking_uri:
            raise click.ClickException(f"study {resume.study} records to {resume.tracking_uri}; leave out --tracking-uri to resume it")
        tracking_uri = resume.tracking_uri
    tracking_uri = tracking_uri or default_tracking_uri(storage)
    try:
        check_tracking_server(tracking_uri)
    except ConnectionError as error:
        raise _fail_cleanly(error) from None
    click.echo(f"study {spec.name!r}: {len(cohort.patients)} patients, {len(cohort.scans)} scans from {cohort.root}")
    click.echo(f"data fingerprint {provenance.data_fingerprint}, code {provenance.code_version}")

    from .cluster_check import ClusterTooSmallError
    from .study import run_study, start_ray, stop_ray
    from .tracking import PendingWritesError

    # SIGTERM (a batch scheduler's stop) ends the launch as Ctrl-C does: cleanly, the local Ray given back.
    # During the trials, the study's own handler makes it an interruption that can be resumed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        dashboard = start_ray(address, click.echo)
        outcome = run_study(spec, cohort, storage, tracking_uri, provenance, echo=click.echo, resume=resume)
    except (RuntimeError, ConnectionError, ClusterTooSmallError) as error:  # PendingWritesError is a ConnectionError
        raise _fail_cleanly(error) from None
    finally:
        stop_ray()

    if outcome.interrupted:
        storage_option = "" if storage == Path("msx_runs").resolve() else f" --storage {storage}"
        how = signal.Signals(outcome.signal).name if outcome.signal else "stopped before the search finished"
        click.echo("")
        click.echo(
            f"study {outcome.study} interrupted ({how}): its trials stopped at their last checkpoints and nothing was "
            f"registered; `msx launch --resume {outcome.study}{storage_option}` continues it"
        )
        raise SystemExit(128 + (outcome.signal or signal.SIGINT))

    click.echo("")
    click.echo(
        "Test patients (one per fold), mean ± std over the folds; lesions are "
        f"{spec.inference.connectivity}-connected components; * = best:"
    )
    click.echo(outcome.table)
    click.echo("")
    for line in outcome.search.lines() if outcome.search else ():
        click.echo(line)
    if outcome.selection is None:
        raise click.ClickException(
            f"no configuration finished all its folds ({outcome.trials_finished}/{outcome.trials_total} trials); nothing was registered"
        )
    selection = outcome.selection
    searched = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in selection.configuration.searched.items())
    click.echo(
        f"selected on validation patients: {selection.configuration.backbone} ({selection.configuration.configuration}"
        f"{', ' + searched if searched else ''}), strategy {selection.strategy}, "
        f"mean validation {selection.metric.upper()} {selection.validation_score:.4f}"
    )
    click.echo(f"registered model: {outcome.registration.summary}")
    pruned = outcome.search.count("pruned") * outcome.search.folds if outcome.search else 0
    stopped = f" ({pruned} stopped with their pruned configurations)" if pruned else ""
    click.echo(f"finished {outcome.trials_finished}/{outcome.trials_total} trials{stopped} in {time.monotonic() - started:.0f} s")
    click.echo("")
    if tracking_uri.startswith("sqlite:"):
        storage_option = "" if storage == Path("msx_runs").resolve() else f" --storage {storage}"
        click.echo(f"MLflow UI:      msx ui{storage_option}   (serves {tracking_uri} on 127.0.0.1:5000)")
        click.echo(f"                then open http://127.0.0.1:5000/#/models/{spec.registry.model_name}")
    else:
        click.echo(f"MLflow UI:      {tracking_uri}/#/models/{spec.registry.model_name}")
    if address:
        click.echo(f"Ray dashboard:  {dashboard or 'on the cluster head (ray dashboard CLUSTER.yaml tunnels it to 127.0.0.1:8265)'}")
    else:
        click.echo(f"Ray dashboard:  {dashboard} while a study runs on this machine (the last study to end stops the local Ray)")


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _resumable(state):
    """The study named by --resume, if it can be taken over."""
    from .study_state import RESUMABLE

    if state.status not in RESUMABLE:
        raise ValueError(f"study {state.study} already ended ({state.status}); there is nothing to resume (msx status {state.study})")
    if state.driver_alive():
        raise ValueError(f"study {state.study} is still running (driver pid {state.driver_pid}); watch it with `msx status {state.study}`")
    return state


def _auto_resumable(state, spec, data: Path | None):
    """An unfinished study of this experiment that a plain `msx launch` takes over: only the same spec and data."""
    if state.driver_alive():
        raise ValueError(
            f"study {state.study} of experiment {spec.name!r} is still running (driver pid {state.driver_pid}); "
            f"watch it with `msx status {state.study}`, or start another one alongside with --fresh"
        )
    same_data = data is None or Path(data).absolute() == Path(state.data_root) or not state.data_root
    if state.spec != spec.to_dict() or not same_data:
        raise ValueError(
            f"experiment {spec.name!r} has an unfinished study {state.study} with another spec or data: "
            f"`msx launch --resume {state.study}` continues it, `msx launch --fresh ...` starts a new study"
        )
    click.echo(f"resuming the unfinished study {state.study} (--fresh starts a new one instead)")
    return _resumable(state)


def _submit_launch(context: click.Context, cluster_file: Path | None, address: str | None) -> None:
    """`msx launch` on a cluster: the same command runs there as a Ray job, and its logs stream here."""
    from click.core import ParameterSource

    from .jobs import SubmissionError, bring_up_cluster, launch_entrypoint, submit_launch

    params = context.params
    # Only what the user chose travels; the cluster's own environment (MSX_STORAGE) fills in the rest.
    chosen = {
        name: value for name, value in params.items()
        if value is not None and context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    try:
        spec = None if params["resume_name"] else load_spec(params["space"] or "smoke")
        launch_entrypoint(spec, chosen)  # its path checks, before a cluster comes up
        if cluster_file is not None:
            address, tunnel = bring_up_cluster(cluster_file, click.echo)
        else:
            tunnel = None
        try:
            status = submit_launch(address, spec, chosen, click.echo)
        finally:
            if tunnel is not None:
                tunnel.terminate()
    except (SpecError, SubmissionError) as error:
        raise _fail_cleanly(error) from None
    if status != 0:
        raise SystemExit(status)


@main.command()
@click.argument("name", required=False)
@click.option("--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"), show_default=True, help="Folder of the experiments (env MSX_STORAGE).")
def status(name: str | None, storage: Path) -> None:
    """Where study NAME stands (a study, or an experiment's latest; default: the latest study): trials
    done, running and failed, the best validation Dice so far, and whether its driver still runs."""
    from .status import status_lines

    try:
        lines = status_lines(storage.resolve(), name)
    except ValueError as error:
        raise _fail_cleanly(error) from None
    for line in lines:
        click.echo(line)


@main.group(name="ray")
def ray_group() -> None:
    """The local Ray that the studies on this machine share."""


@ray_group.command("stop")
def ray_stop() -> None:
    """Stop the local Ray msx started, unless a study still uses it (the last study to end stops it anyway;
    this is for a Ray left behind by a driver that was killed)."""
    from .local_ray import LocalRayError, stop_if_unused

    try:
        stopped = stop_if_unused()
    except LocalRayError as error:
        raise _fail_cleanly(error) from None
    click.echo("stopped the local Ray" if stopped else "no local Ray started by msx runs on this machine")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the cohort into.")
@click.option("--patients", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--shape", default="181,217,181", show_default=True, help="Volume shape X,Y,Z in 1 mm voxels.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: Path, patients: int, shape: str, seed: int) -> None:
    """Write a synthetic ISBI-2015-shaped longitudinal cohort (NIfTI, two raters)."""
    from msx.models.data.synth import write_synthetic_cohort

    try:
        dims = tuple(int(v) for v in shape.split(","))
        if len(dims) != 3 or min(dims) < 16:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"{shape!r}: expected three integers of at least 16, like 181,217,181", param_hint="--shape") from None
    paths = write_synthetic_cohort(out, patients=patients, shape=dims, seed=seed)
    click.echo(f"wrote {len(paths)} files for {patients} patients to {out}")


@main.command()
@click.option("--pred", "preds", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, required=True, help="Predicted mask (NIfTI); repeat for several scans.")
@click.option("--gt", "gts", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, required=True, help="Ground-truth mask (NIfTI) of the --pred in the same position.")
@click.option("--connectivity", type=click.Choice(["6", "18", "26"]), default="6", show_default=True, help="Lesion connectivity.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (NaN as null): an object for one scan, a list for several.")
def evaluate(preds: tuple[Path, ...], gts: tuple[Path, ...], connectivity: str, as_json: bool) -> None:
    """Metrics of predicted masks against their ground truths: DSC, TPR, PPV, LTPR, LFPR, AVD, ASSD, HD95
    and the raw ISBI 2015 score, whose volume correlation runs over all the scans given (so it is NaN for
    one scan)."""
    import nibabel as nib
    import numpy as np

    from msx.models.metrics import isbi_scores, segmentation_metrics

    if len(preds) != len(gts):
        raise click.UsageError(f"got {len(preds)} --pred and {len(gts)} --gt; give one ground truth per prediction")

    def read(path: Path):
        try:
            image = nib.load(str(path))
            return image, np.asarray(image.dataobj)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise click.ClickException(f"{path}: not a readable NIfTI file ({error})") from None

    per_scan, pred_volumes, gt_volumes = [], [], []
    for pred, gt in zip(preds, gts):
        pred_image, pred_array = read(pred)
        gt_image, gt_array = read(gt)
        if pred_array.shape != gt_array.shape:
            raise click.ClickException(f"{pred}: shape {pred_array.shape} differs from {gt}: {gt_array.shape}")
        if not np.allclose(pred_image.affine, gt_image.affine, atol=1e-3):
            raise click.ClickException(f"{pred}: affine differs from {gt}'s; the masks are not on one grid")
        spacing = tuple(float(z) for z in gt_image.header.get_zooms()[:3])
        per_scan.append(
            segmentation_metrics(pred_array > 0, gt_array > 0, spacing=spacing, connectivity=int(connectivity), extra=True)
        )
        # In mm^3: scans of different voxel sizes must share one unit for the correlation.
        voxel_volume = float(np.prod(spacing))
        pred_volumes.append(int((pred_array > 0).sum()) * voxel_volume)
        gt_volumes.append(int((gt_array > 0).sum()) * voxel_volume)
    for metrics, score in zip(per_scan, isbi_scores(per_scan, pred_volumes, gt_volumes)):
        metrics["isbi"] = score

    if as_json:
        rows = [
            {
                "pred": str(pred),
                "gt": str(gt),
                "connectivity": int(connectivity),
                **{k: (None if math.isnan(v) else v) for k, v in metrics.items()},
            }
            for pred, gt, metrics in zip(preds, gts, per_scan)
        ]
        click.echo(json.dumps(rows[0] if len(rows) == 1 else rows))
        return
    click.echo(f"lesions are {connectivity}-connected components; ASSD and HD95 in mm")
    width = max(len(str(pred)) for pred in preds)
    click.echo(f"{'prediction':{width}s} " + " ".join(f"{name.upper():>8s}" for name in per_scan[0]))
    for pred, metrics in zip(preds, per_scan):
        click.echo(f"{str(pred):{width}s} " + " ".join(f"{value:8.4f}" for value in metrics.values()))


@main.group()
def registry() -> None:
    """Look up registered models in the MLflow model registry, and move their aliases."""


def _registry_store(command):
    """--tracking-uri and --storage, as the other commands take them."""
    command = click.option("--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"), show_default=True, help="Folder of the default MLflow store (env MSX_STORAGE).")(command)
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI (default: SQLite file in --storage).")(command)


def _registry_uri(tracking_uri: str | None, storage: Path) -> str:
    from .tracking import default_tracking_uri

    return tracking_uri or default_tracking_uri(storage.resolve())


def _registry_failure(subject: str, error: Exception) -> click.ClickException:
    return click.ClickException(f"{subject}: {str(error).splitlines()[0]}")


@registry.command("list")
@_registry_store
def registry_list(tracking_uri: str | None, storage: Path) -> None:
    """Every registered model: its latest version, aliases and the champion's validation score."""
    import mlflow.exceptions

    from .model_registry import aliases_text, list_models

    tracking_uri = _registry_uri(tracking_uri, storage)
    try:
        models = list_models(tracking_uri)
    except mlflow.exceptions.MlflowException as error:
        raise _registry_failure(tracking_uri, error) from None
    if not models:
        click.echo(f"no registered models in {tracking_uri}")
        return
    rows = [("model", "latest", "aliases", "champion validation")] + [
        (
            model.name,
            str(model.latest_version or "-"),
            aliases_text(model.aliases),
            model.champion_score or "-",
        )
        for model in models
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths)) + "  " + row[-1])


@registry.command("show")
@click.argument("reference")
@_registry_store
def registry_show(reference: str, tracking_uri: str | None, storage: Path) -> None:
    """Show NAME, NAME@ALIAS or NAME/VERSION: version, aliases, tags (data fingerprint, code version,
    strategy, validation and test scores, champion decision), metrics and source run."""
    import mlflow.exceptions

    from .model_registry import describe_model

    try:
        info = describe_model(reference.removeprefix("models:/"), _registry_uri(tracking_uri, storage))
    except (LookupError, mlflow.exceptions.MlflowException) as error:
        raise _registry_failure(reference, error) from None
    click.echo(f"model    {info['name']} version {info['version']}")
    click.echo(f"aliases  {', '.join(info['aliases']) or '-'}")
    click.echo(f"source   run {info['run_id']} ({info['run_name']}, experiment {info['experiment_id']})")
    click.echo(f"artifact {info['source']}")
    for key, value in sorted(info["tags"].items()):
        click.echo(f"  {key:28s} {value}")
    for key, value in sorted(info["metrics"].items()):
        click.echo(f"  {key:28s} {value:.4f}")


@registry.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="champion", show_default=True, help="The alias to move.")
@click.option("--force", is_flag=True, help="Make champion a version selected on other data than the current champion's.")
@_registry_store
def registry_promote(name: str, version: str, alias: str, force: bool, tracking_uri: str | None, storage: Path) -> None:
    """Point NAME's --alias at VERSION (the champion only moves between versions selected on the same data)."""
    import mlflow.exceptions

    from .model_registry import PromotionRefused, promote

    try:
        previous = promote(name, version, alias, force, _registry_uri(tracking_uri, storage))
    except (LookupError, PromotionRefused, mlflow.exceptions.MlflowException) as error:
        raise _registry_failure(f"{name} {version}", error) from None
    was = f"version {previous}" if previous is not None else "unset"
    click.echo(f"models:/{name}@{alias} -> version {version} (was {was})")


@main.command()
@click.argument("study", required=False)
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI (default: SQLite file in --storage).")
@click.option("--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"), show_default=True, help="Folder of the default MLflow store and of the report (env MSX_STORAGE).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for report.md, report.html and figures/ (default: <storage>/<study>/report).")
def report(study: str | None, tracking_uri: str | None, storage: Path, out: Path | None) -> None:
    """Tables and figures of STUDY's latest launch (default: the most recent study), from MLflow.

    Writes report.md and a self-contained report.html, and logs both to the launch's run under report/.
    """
    from .report import ReportError, resolve_study, trials_line, write_report
    from .tracking import default_tracking_uri

    storage = storage.resolve()
    tracking_uri = tracking_uri or default_tracking_uri(storage)
    try:
        study = resolve_study(tracking_uri, study)
        files = write_report(tracking_uri, study, out or storage / study / "report")
    except ReportError as error:
        raise click.ClickException(str(error)) from None
    record = files.record
    click.echo(f"study {study!r}, launch {record.launch}: {trials_line(record.trials)}")
    click.echo(f"wrote {files.markdown} and {files.html} ({len(files.figures)} figures)")
    click.echo(f"logged to MLflow run {record.run_id} under report/")


@main.command()
@click.option("--port", type=int, default=5000, show_default=True, help="Port of the UI, on 127.0.0.1 only.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI (default: SQLite file in --storage).")
@click.option("--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"), show_default=True, help="Folder of the default MLflow store (env MSX_STORAGE).")
def ui(port: int, tracking_uri: str | None, storage: Path) -> None:
    """Start the MLflow UI on 127.0.0.1 for the study store; Ctrl-C stops it."""
    import os
    import subprocess

    from .tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(storage.resolve())
    if uri.startswith(("http://", "https://")):
        click.echo(f"{uri} is a tracking server, which serves its own UI: open {uri}")
        return
    click.echo(f"MLflow UI: http://127.0.0.1:{port} (registered models: http://127.0.0.1:{port}/#/models); Ctrl-C stops it")
    # Bound to 127.0.0.1 whatever MLflow's default: the store holds unpublished patient results.
    # MLflow's job runner only serves GenAI features and would start extra processes.
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        raise SystemExit(subprocess.call(command, env=environment))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


main.add_command(predict)
main.add_command(data)

if __name__ == "__main__":
    sys.exit(main())
