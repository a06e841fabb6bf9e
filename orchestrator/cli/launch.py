"""`msx launch` and `msx status`: run a study (here, or on a cluster as a Ray job) and see where one stands."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import click

from ..spec import SpecError, load_spec
from .options import INPUT_ERRORS, fail_cleanly, storage_option, tracking_uri_option


@click.command()
@click.option(
    "--space", default=None,
    help="Search space: a bundled name (smoke, paper, hpo) or a YAML path  [default: smoke; with --resume, the"
         " study's own].",
)
@click.option(
    "--data", type=click.Path(path_type=Path), default=None,
    help="Cohort: an ISBI-layout folder or a manifest (.csv, .yaml) (default: the spec's, else synthetic).",
)
@storage_option("Folder for experiments, checkpoints and the default MLflow store (env MSX_STORAGE).")
@tracking_uri_option
@click.option(
    "--address", envvar="RAY_ADDRESS", default=None,
    help="A running Ray cluster. Its dashboard URL (http://HEAD:8265) submits the study as a Ray job and "
         "streams its logs; a GCS address (HOST:6379, auto) runs the driver here. Default: join the Ray "
         "running on this machine, else start one.",
)
@click.option(
    "--cluster", "cluster_file", type=click.Path(path_type=Path), default=None,
    help="A Ray cluster launcher YAML (cluster/a100.yaml): brings the cluster up, submits the study as a Ray "
         "job through a tunnel to its dashboard, and streams its logs. A SLURM config (cluster/slurm.yaml): "
         "submits the study as one batch job with sbatch and follows its log.",
)
@click.option(
    "--resume", "resume_name", default=None, metavar="NAME",
    help="Continue the unfinished study NAME (a study, or an experiment's latest): finished trials are kept, "
         "interrupted ones continue from their last checkpoint.",
)
@click.option(
    "--fresh", is_flag=True,
    help="Start a new study even when the experiment has an unfinished one (which stays as it is).",
)
@click.option(
    "--verbose", is_flag=True,
    help="Show Ray's, Tune's and MLflow's messages here too (default: in a log file under --storage, named at "
         "the start).",
)
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
    verbose: bool,
) -> None:
    """Run a whole leave-one-subject-out study and register the best model.

    An experiment whose latest study never ended (its driver died) is resumed automatically.
    """
    if resume_name and (space or fresh):
        raise click.UsageError("--resume continues a study with its own spec and data: leave out --space and --fresh")
    if cluster_file or (address and address.startswith(("http://", "https://"))):
        _submit_launch(context, cluster_file, address)
        return
    storage = storage.resolve()
    if verbose:
        _launch_here(space, data, storage, tracking_uri, address, resume_name, fresh, click.echo, None)
        return
    from .console import QuietConsole, launch_log_path

    console = QuietConsole(launch_log_path(storage))
    with console as echo:
        _launch_here(space, data, storage, tracking_uri, address, resume_name, fresh, echo, console.log_path)


def _launch_here(
    space: str | None, data: Path | None, storage: Path, tracking_uri: str | None, address: str | None,
    resume_name: str | None, fresh: bool, echo: Callable[[str], None], log_path: Path | None,
) -> None:
    """The driver in this process: checks, then Ray, then the study (msx.orchestrator.study)."""
    from ..study.launch import plan_launch

    started = time.monotonic()
    try:
        plan = plan_launch(space, data, storage, tracking_uri, resume_name, fresh, echo)
    except (*INPUT_ERRORS, ConnectionError) as error:  # CohortError is a ValueError
        raise fail_cleanly(error) from None
    spec, cohort, provenance, tracking_uri = plan.spec, plan.cohort, plan.provenance, plan.tracking_uri
    echo(f"study {spec.name!r}: {len(cohort.patients)} patients, {len(cohort.scans)} scans from {cohort.root}")
    echo(f"data fingerprint {provenance.data_fingerprint}, code {provenance.code_version}")

    from ..cluster.capacity import ClusterTooSmallError
    from ..study.driver import run_study, start_ray, stop_ray

    if log_path is not None:
        echo(f"Ray, Tune and MLflow messages: {log_path} (--verbose shows them here)")
    from ..cluster.jobs import token_instructions

    # SIGTERM (a batch scheduler's stop) ends the launch as Ctrl-C does: cleanly, the local Ray given back.
    # During the trials, the study's own handler makes it an interruption that can be resumed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        dashboard = start_ray(address, echo)
        if dashboard and (instructions := token_instructions()):
            echo(f"               {instructions}")
        outcome = run_study(spec, cohort, storage, tracking_uri, provenance, echo=echo, resume=plan.resume)
    except (RuntimeError, ConnectionError, ClusterTooSmallError) as error:  # PendingWritesError is a ConnectionError
        raise fail_cleanly(error) from None
    finally:
        stop_ray()

    if outcome.interrupted:
        storage_option = "" if storage == Path("msx_runs").resolve() else f" --storage {storage}"
        if outcome.signal:
            how = signal.Signals(outcome.signal).name
        else:
            how = outcome.stop_reason or "stopped before the search finished"
        echo("")
        echo(
            f"study {outcome.study} interrupted ({how}): its trials stopped at their last checkpoints and nothing was "
            f"registered; `msx launch --resume {outcome.study}{storage_option}` continues it"
        )
        raise SystemExit(128 + outcome.signal if outcome.signal else 1)

    echo("")
    echo(
        "Test patients (one per fold), mean ± std over the folds; lesions are "
        f"{spec.inference.connectivity}-connected components; * = best:"
    )
    echo(outcome.table)
    echo("")
    for line in outcome.search.lines() if outcome.search else ():
        echo(line)
    if outcome.selection is None:
        raise click.ClickException(
            f"no configuration finished all its folds ({outcome.trials_finished}/{outcome.trials_total} trials); "
            "nothing was registered"
        )
    selection = outcome.selection
    searched = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in selection.configuration.searched.items()
    )
    echo(
        f"selected on validation patients: {selection.configuration.backbone} "
        f"({selection.configuration.configuration}"
        f"{', ' + searched if searched else ''}), strategy {selection.strategy}, "
        f"mean validation {selection.metric.upper()} {selection.validation_score:.4f}"
    )
    echo(f"registered model: {outcome.registration.summary}")
    pruned = outcome.search.count("pruned") * outcome.search.folds if outcome.search else 0
    stopped = f" ({pruned} stopped with their pruned configurations)" if pruned else ""
    elapsed = time.monotonic() - started
    echo(f"finished {outcome.trials_finished}/{outcome.trials_total} trials{stopped} in {elapsed:.0f} s")
    echo("")
    if tracking_uri.startswith("sqlite:"):
        storage_option = "" if storage == Path("msx_runs").resolve() else f" --storage {storage}"
        echo(f"MLflow UI:      msx ui{storage_option}   (serves {tracking_uri} on 127.0.0.1:5000)")
        echo(f"                then open http://127.0.0.1:5000/#/models/{spec.registry.model_name}")
    else:
        echo(f"MLflow UI:      {tracking_uri}/#/models/{spec.registry.model_name}")
    if address:
        where = dashboard or "on the cluster head (ray dashboard CLUSTER.yaml tunnels it to 127.0.0.1:8265)"
        echo(f"Ray dashboard:  {where}")
    else:
        echo(f"Ray dashboard:  {dashboard} while a study runs on this machine (the last study to end stops the local "
             "Ray)")


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _submit_launch(context: click.Context, cluster_file: Path | None, address: str | None) -> None:
    """`msx launch` on a cluster: the same command runs there as a Ray job (a Ray cluster launcher config or a
    dashboard address) or a SLURM batch job (a SLURM config, cluster/slurm.yaml), and its logs stream here."""
    from click.core import ParameterSource

    from ..cluster.jobs import SubmissionError, bring_up_cluster, close_tunnel, launch_entrypoint, submit_launch
    from ..cluster.slurm import is_slurm_config, submit_slurm_launch

    params = context.params
    # Only what the user chose travels; the cluster's own environment (MSX_STORAGE) fills in the rest.
    chosen = {
        name: value for name, value in params.items()
        if value is not None and context.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    try:
        spec = None if params["resume_name"] else load_spec(params["space"] or "smoke")
        if cluster_file is not None and is_slurm_config(cluster_file):
            status = submit_slurm_launch(cluster_file, spec, chosen, click.echo)
            if status != 0:
                raise SystemExit(status)
            return
        launch_entrypoint(spec, chosen)  # its path checks, before a cluster comes up
        if cluster_file is not None:
            address, tunnel = bring_up_cluster(cluster_file, click.echo)
        else:
            tunnel = None
        try:
            status = submit_launch(address, spec, chosen, click.echo)
        finally:
            if tunnel is not None:
                close_tunnel(tunnel)
    except (SpecError, SubmissionError) as error:
        raise fail_cleanly(error) from None
    if status != 0:
        raise SystemExit(status)


@click.command()
@click.argument("name", required=False)
@storage_option("Folder of the experiments (env MSX_STORAGE).")
def status(name: str | None, storage: Path) -> None:
    """Where study NAME stands (a study, or an experiment's latest; default: the latest study): trials
    done, running and failed, the best validation Dice so far, and whether its driver still runs."""
    from ..study.status import status_lines

    try:
        lines = status_lines(storage.resolve(), name)
    except ValueError as error:
        raise fail_cleanly(error) from None
    for line in lines:
        click.echo(line)
