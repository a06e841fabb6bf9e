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
@click.argument(
    "fixtures", metavar="FILE.npz...", nargs=-1, required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Network fixture whose weights a sampling fixture was made with "
                   "[default: unet_reference.npz beside it].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per fixture instead of tables.")
def check(fixtures: tuple[Path, ...], weights: Path | None, as_json: bool) -> None:
    """Build msx's network from each fixture's arrays, run msx's own code on its inputs (a network forward;
    reference-protocol DDIM sampling from its noise, every reference strategy and its mask; or training steps
    from its initial weights and the reference's learning-rate schedule), and print each compared array's error.
    Float arrays must agree to 1e-4 in absolute value, masks exactly, schedules to 1e-9 relative; an array no
    check compares is an error. Exit status 0 only when every fixture passes; 1 otherwise, naming the arrays
    that do not."""
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
        failed += [
            f"{path.name}: {c.array} ({c.describe()}, tolerance {c.tolerance:g})"
            for c in report.comparisons if c.gated and not c.passed
        ]
    if failed:
        click.echo(f"failed: {'; '.join(failed)}", err=True)
        raise SystemExit(1)


def _print_report(report, tolerance: float) -> None:
    """One line per compared array; a group (a training fixture's grad.denoiser.* ...) as one line naming its
    largest error's array, followed by each of its arrays that fails."""
    from msx.models.fidelity import EXACT, RELATIVE, SCHEDULE_TOLERANCE

    measures = {c.measure for c in report.comparisons}
    others = [
        text for measure, text in ((EXACT, "masks: exact"), (RELATIVE, f"schedules: {SCHEDULE_TOLERANCE:g} relative"))
        if measure in measures
    ]
    click.echo(
        f"{report.fixture}: {report.kind} fixture, msx {report.backbone}, features {list(report.features)}, "
        f"tolerance {tolerance:g}" + (f" ({'; '.join(others)})" if others else "")
    )
    rows: list[tuple[str, str, object, list]] = []  # (label, shape, representative, failing members)
    for comparison in report.comparisons:
        if comparison.group is not None and rows and rows[-1][2].group == comparison.group:
            label, shape, worst, members = rows[-1]
            members.append(comparison)
            rows[-1] = (label, shape, max(worst, comparison, key=lambda c: c.error), members)
        else:
            rows.append((comparison.group or comparison.array, "x".join(map(str, comparison.shape)) or "scalar",
                         comparison, [comparison]))
    width = max(len(_label(label, members)) for label, _, _, members in rows)
    current = None
    for label, shape, worst, members in rows:
        if worst.computed_from != current:
            current = worst.computed_from
            click.echo(f"  {current}" + ("" if worst.gated else " (shown, not held to the tolerance)") + ":")
        grouped = worst.group is not None
        passed = all(c.passed for c in members)
        verdict = ("ok" if passed else "FAIL") if worst.gated else "-"
        where = f" (at {worst.array})" if grouped else ""
        click.echo(
            f"    {_label(label, members):<{width}}  {'' if grouped else shape:<16} {worst.describe()}{where}  "
            f"{verdict}"
        )
        if grouped and worst.gated:
            for member in members:
                if not member.passed:
                    click.echo(f"      {member.array}  {member.describe()}  FAIL")
    click.echo(f"  {'passed' if report.passed else 'FAILED'}")


def _label(label: str, members: list) -> str:
    return f"{label} ({len(members)} arrays)" if members[0].group is not None else label
