"""`msx report`: a study's tables and figures, from its MLflow record (msx.orchestrator.report)."""

from __future__ import annotations

from pathlib import Path

import click

from .options import storage_option, tracking_uri_option


@click.command()
@click.argument("study", required=False)
@tracking_uri_option
@storage_option("Folder of the default MLflow store and of the report (env MSX_STORAGE).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for report.md, report.html and figures/ (default: <storage>/<study>/report).",
)
def report(study: str | None, tracking_uri: str | None, storage: Path, out: Path | None) -> None:
    """Tables and figures of STUDY's latest launch (default: the most recent study), from MLflow.

    Writes report.md and a self-contained report.html, and logs both to the launch's run under report/.
    """
    from ..report.document import write_report
    from ..report.record import ReportError, resolve_study
    from ..report.summary import trials_line
    from ..tracking.store import default_tracking_uri

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
