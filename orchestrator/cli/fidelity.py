"""`msx fidelity check`: prove that this installation computes what the MSSegDiff reference code computes.

The work is `msx.models.fidelity`; this module only reads the command line and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group("fidelity")
def fidelity() -> None:
    """Compare msx with numbers computed by the MSSegDiff reference code (tests/fixtures/fidelity)."""


@fidelity.command("check")
@click.argument("fixtures", metavar="FILE.npz...", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Network fixture whose weights a sampling fixture was made with [default: unet_reference.npz beside it].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per fixture instead of tables.")
def check(fixtures: tuple[Path, ...], weights: Path | None, as_json: bool) -> None:
    """Build msx's network from each fixture's arrays, run msx's own code on its inputs (a network forward, or
    reference-protocol DDIM sampling from its noise and every reference strategy), and print the largest
    absolute error of each compared array. Exit status 0 only when every fixture's arrays are within 1e-4;
    1 otherwise, naming the arrays that are not."""
    from msx.models.fidelity import TOLERANCE, FixtureError, check_fixture

    failed = []
    for path in fixtures:
        try:
            report = check_fixture(path, weights)
        except FixtureError as error:
            raise click.ClickException(str(error)) from None
        if as_json:
            click.echo(json.dumps(report.to_dict()))
        else:
            _print_report(report, TOLERANCE)
        failed += [f"{path.name}: {c.array}" for c in report.comparisons if c.gated and not c.passed]
    if failed:
        click.echo(f"not within {TOLERANCE:g}: {'; '.join(failed)}", err=True)
        raise SystemExit(1)


def _print_report(report, tolerance: float) -> None:
    click.echo(
        f"{report.fixture}: {report.kind} fixture, msx {report.backbone}, features {list(report.features)}, "
        f"tolerance {tolerance:g}"
    )
    width = max(len(c.array) for c in report.comparisons)
    current = None
    for comparison in report.comparisons:
        if comparison.computed_from != current:
            current = comparison.computed_from
            click.echo(f"  {current}" + ("" if comparison.gated else " (shown, not held to the tolerance)") + ":")
        verdict = ("ok" if comparison.passed else "FAIL") if comparison.gated else "-"
        shape = "x".join(map(str, comparison.shape)) or "scalar"
        click.echo(f"    {comparison.array:<{width}}  {shape:<16} max |error| {comparison.max_abs_error:.3g}  {verdict}")
    click.echo(f"  {'passed' if report.passed else 'FAILED'}")
