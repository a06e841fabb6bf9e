"""`msx data check` and `msx data inspect`: look at a cohort (folder or manifest) before training on it (read-only);
`msx synth`: write a synthetic one."""

from __future__ import annotations

from pathlib import Path

import click

from msx.models.data.cohort import (
    DEFAULT_MODALITIES,
    RATERS,
    CohortError,
    check_choices,
)
from msx.models.data.manifest import open_cohort


def _choices(modalities: str, rater: int) -> tuple[str, ...]:
    names = tuple(name.strip() for name in modalities.split(",") if name.strip())
    try:
        return check_choices(names, rater)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--modalities/--rater") from None


_COHORT = click.argument("cohort_path", metavar="COHORT", type=click.Path(exists=True, path_type=Path))
_MODALITIES = click.option(
    "--modalities", default=",".join(DEFAULT_MODALITIES), show_default=True, help="Input modalities, comma-separated."
)
_RATER = click.option(
    "--rater", type=click.Choice([str(r) for r in RATERS]), default="1", show_default=True, help="Ground-truth rater."
)


@click.group("data")
def data() -> None:
    """Check or inspect a cohort: an ISBI-layout folder or a manifest (.csv, .yaml); nothing is modified."""


@data.command("check")
@_COHORT
@_MODALITIES
@_RATER
@click.option("--folds", default="paper", show_default=True, help="Fold plan the cohort must fill (paper, loso).")
def check(cohort_path: Path, modalities: str, rater: str, folds: str) -> None:
    """Read every chosen file and report all problems; exit status 1 if any is an error."""
    from msx.models.data.folds import FOLD_PLANS
    from msx.models.data.validation import check_cohort_root
    from msx.models.registry import UnknownNameError

    chosen = _choices(modalities, int(rater))
    try:
        FOLD_PLANS.get(folds)
    except UnknownNameError as error:
        raise click.BadParameter(str(error).splitlines()[0], param_hint="--folds") from None
    report = check_cohort_root(cohort_path, chosen, int(rater), folds)
    for line in report.errors:
        click.echo(f"error: {line}")
    for line in report.warnings:
        click.echo(f"warning: {line}")
    if report.errors:
        click.echo(f"{_count(report.errors, 'error')}, {_count(report.warnings, 'warning')} in {cohort_path}", err=True)
        click.get_current_context().exit(1)
    cohort = open_cohort(cohort_path, chosen, int(rater))
    click.echo(
        f"OK: {len(cohort.patients)} patients, {len(cohort.scans)} scans in {cohort_path} "
        f"({', '.join(chosen)}, rater {rater}; fold plan {folds!r} fits), {_count(report.warnings, 'warning')}"
    )


@data.command("inspect")
@_COHORT
@_MODALITIES
@_RATER
def inspect_command(cohort_path: Path, modalities: str, rater: str) -> None:
    """Per scan: shape, spacing, lesion count and volume per rater, inter-rater Dice; then cohort totals."""
    from msx.models.data.validation import summarise_cohort

    chosen = _choices(modalities, int(rater))
    try:
        rows = summarise_cohort(open_cohort(cohort_path, chosen, int(rater)))
    except CohortError as error:
        raise click.ClickException(f"{error} (run `msx data check {cohort_path}` for every problem)") from None
    click.echo(format_table(rows))


@click.command()
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
        raise click.BadParameter(
            f"{shape!r}: expected three integers of at least 16, like 181,217,181", param_hint="--shape"
        ) from None
    paths = write_synthetic_cohort(out, patients=patients, shape=dims, seed=seed)
    click.echo(f"wrote {len(paths)} files for {patients} patients to {out}")


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def format_table(rows) -> str:
    """The inspect table and its totals line, for rows of :class:`msx.models.data.validation.ScanSummary`."""
    header = ["patient", "tp", "shape", "spacing mm"]
    for r in RATERS:
        header += [f"lesions r{r}", f"mL r{r}"]
    header.append("Dice r1-r2")
    table = [header]
    for row in rows:
        line = [
            str(row.patient),
            str(row.timepoint),
            "x".join(map(str, row.shape)),
            "x".join(f"{s:g}" for s in row.spacing),
        ]
        for r in RATERS:
            line += [str(row.lesions[r]), f"{row.volume_ml[r]:.2f}"] if r in row.lesions else ["-", "-"]
        line.append(f"{row.dice:.3f}" if row.dice is not None else "-")
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in table]

    totals = [f"{len({row.patient for row in rows})} patients, {len(rows)} scans"]
    for r in RATERS:
        rated = [row for row in rows if r in row.lesions]
        if rated:
            totals.append(
                f"rater {r}: {sum(row.lesions[r] for row in rated)} lesions, "
                f"{sum(row.volume_ml[r] for row in rated):.2f} mL"
            )
    dices = [row.dice for row in rows if row.dice is not None]
    if dices:
        totals.append(f"mean inter-rater Dice {sum(dices) / len(dices):.3f} over {len(dices)} scans")
    lines.append("total: " + "; ".join(totals))
    return "\n".join(lines)
