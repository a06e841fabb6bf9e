"""`msx evaluate`: metrics of predicted masks against their ground truths (msx.models.evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click


@click.command()
@click.option("--pred", "preds", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, required=True, help="Predicted mask (NIfTI); repeat for several scans.")
@click.option("--gt", "gts", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True, required=True, help="Ground-truth mask (NIfTI) of the --pred in the same position.")
@click.option("--connectivity", type=click.Choice(["6", "18", "26"]), default="6", show_default=True, help="Lesion connectivity.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (NaN as null): an object for one scan, a list for several.")
def evaluate(preds: tuple[Path, ...], gts: tuple[Path, ...], connectivity: str, as_json: bool) -> None:
    """Metrics of predicted masks against their ground truths: DSC, TPR, PPV, LTPR, LFPR, AVD, ASSD, HD95
    and the raw ISBI 2015 score, whose volume correlation runs over all the scans given (so it is NaN for
    one scan)."""
    from msx.models.evaluation import evaluate_mask_files

    if len(preds) != len(gts):
        raise click.UsageError(f"got {len(preds)} --pred and {len(gts)} --gt; give one ground truth per prediction")
    try:
        per_scan = evaluate_mask_files(list(zip(preds, gts)), int(connectivity))
    except ValueError as error:
        raise click.ClickException(str(error)) from None

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
