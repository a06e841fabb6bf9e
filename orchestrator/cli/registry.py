"""`msx registry list/show/promote`: registered models in the MLflow model registry, and their aliases."""

from __future__ import annotations

from pathlib import Path

import click

from .options import storage_option, tracking_uri_option


@click.group()
def registry() -> None:
    """Look up registered models in the MLflow model registry, and move their aliases."""


def _registry_store(command):
    """--tracking-uri and --storage, as the other commands take them."""
    return tracking_uri_option(storage_option()(command))


def _registry_uri(tracking_uri: str | None, storage: Path) -> str:
    from ..tracking.store import default_tracking_uri

    return tracking_uri or default_tracking_uri(storage.resolve())


def _registry_failure(subject: str, error: Exception) -> click.ClickException:
    return click.ClickException(f"{subject}: {str(error).splitlines()[0]}")


@registry.command("list")
@_registry_store
def registry_list(tracking_uri: str | None, storage: Path) -> None:
    """Every registered model: its latest version, aliases and the champion's validation score."""
    import mlflow.exceptions

    from ..tracking.registry import aliases_text, list_models

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
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=False)) + "  " + row[-1])


@registry.command("show")
@click.argument("reference")
@_registry_store
def registry_show(reference: str, tracking_uri: str | None, storage: Path) -> None:
    """Show NAME, NAME@ALIAS or NAME/VERSION: version, aliases, tags (data fingerprint, code version,
    strategy, validation and test scores, champion decision), metrics and source run."""
    import mlflow.exceptions

    from ..tracking.registry import describe_model

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
@click.option(
    "--force", is_flag=True, help="Make champion a version selected on other data than the current champion's."
)
@_registry_store
def registry_promote(name: str, version: str, alias: str, force: bool, tracking_uri: str | None, storage: Path) -> None:
    """Point NAME's --alias at VERSION (the champion only moves between versions selected on the same data)."""
    import mlflow.exceptions

    from ..tracking.registry import PromotionRefused, promote

    try:
        previous = promote(name, version, alias, force, _registry_uri(tracking_uri, storage))
    except (LookupError, PromotionRefused, mlflow.exceptions.MlflowException) as error:
        raise _registry_failure(f"{name} {version}", error) from None
    was = f"version {previous}" if previous is not None else "unset"
    click.echo(f"models:/{name}@{alias} -> version {version} (was {was})")
