"""`msx evaluate`: metrics of predicted masks against their ground truths (msx.models.evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option(
    "--pred", "preds", type=_FILE, multiple=True, required=True,
    help="Predicted mask (NIfTI); repeat for several scans."
)
@click.option(
    "--gt", "gts", type=_FILE, multiple=True, required=True,
    help="Ground-truth mask (NIfTI) of the --pred in the same position."
)
@click.option(
    "--uncertainty", "uncertainties", type=_FILE, multiple=True,
    help="Voxel-wise uncertainty map (NIfTI, finite, >= 0) of the --pred in the same position; give one per --pred to "
         "score the nDSC R-AAC."
)
@click.option(
    "--brain-mask", "brain_masks", type=_FILE, multiple=True,
    help="Brain mask (NIfTI) restricting the nDSC R-AAC to its voxels: once for every scan, or once per --pred in the "
         "same position. Needs --uncertainty."
)
@click.option(
    "--connectivity", type=click.Choice(["6", "18", "26"]), default="6", show_default=True, help="Lesion connectivity."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (NaN as null): an object for one scan, a list for several."
)
def evaluate(
    preds: tuple[Path, ...],
    gts: tuple[Path, ...],
    uncertainties: tuple[Path, ...],
    brain_masks: tuple[Path, ...],
    connectivity: str,
    as_json: bool,
) -> None:
    """Metrics of predicted masks against their ground truths: DSC, TPR, PPV, LTPR, LFPR, AVD, ASSD, HD95, the
    Shifts 2.0 normalised Dice (NDSC) and lesion F1 over the whole scan, with --uncertainty the nDSC R-AAC (over the
    --brain-mask's voxels, or all), and the raw ISBI 2015 score, whose volume correlation runs over all the scans
    given (so it is NaN for one). With several scans the table ends with each metric's mean over the scans where it
    is defined (n/a where none is); --json prints the scans only. Every file is checked before anything is
    computed."""
    from msx.models.evaluation import ScanFiles, evaluate_mask_files
    from msx.models.metrics import summarise

    if len(preds) != len(gts):
        raise click.UsageError(f"got {len(preds)} --pred and {len(gts)} --gt; give one ground truth per prediction")
    if uncertainties and len(uncertainties) != len(preds):
        raise click.UsageError(
            f"got {len(preds)} --pred and {len(uncertainties)} --uncertainty; give one map per prediction"
        )
    if brain_masks and not uncertainties:
        raise click.UsageError("--brain-mask restricts the nDSC R-AAC, which needs --uncertainty")
    if len(brain_masks) not in (0, 1, len(preds)):
        raise click.UsageError(
            f"got {len(preds)} --pred and {len(brain_masks)} --brain-mask; give one for all scans or one per prediction"
        )
    scans = [
        ScanFiles(
            pred,
            gt,
            uncertainties[index] if uncertainties else None,
            (brain_masks[index] if len(brain_masks) > 1 else brain_masks[0]) if brain_masks else None,
        )
        for index, (pred, gt) in enumerate(zip(preds, gts, strict=True))
    ]
    try:
        per_scan = evaluate_mask_files(scans, int(connectivity))
    except ValueError as error:
        raise click.ClickException(str(error)) from None

    if as_json:
        rows = [
            {
                **{name: str(path) for name, path in vars(scan).items() if path is not None},
                "connectivity": int(connectivity),
                **{k: (None if math.isnan(v) else v) for k, v in metrics.items()},
            }
            for scan, metrics in zip(scans, per_scan, strict=True)
        ]
        click.echo(json.dumps(rows[0] if len(rows) == 1 else rows))
        return
    click.echo(f"lesions are {connectivity}-connected components; ASSD and HD95 in mm")
    width = max(len(str(pred)) for pred in preds)
    columns = {name: max(8, len(name)) for name in per_scan[0]}
    click.echo(f"{'prediction':{width}s} " + " ".join(f"{name.upper():>{w}s}" for name, w in columns.items()))
    for pred, metrics in zip(preds, per_scan, strict=True):
        click.echo(f"{str(pred):{width}s} " + " ".join(f"{metrics[name]:{w}.4f}" for name, w in columns.items()))
    if len(per_scan) > 1:
        # NaN-aware, as the study's split means are: a scan where a metric is undefined (an empty prediction's PPV)
        # says nothing about the others' mean.
        means = {name: mean for name, (mean, _) in summarise(per_scan).items()}
        cells = ("n/a" if math.isnan(means[name]) else f"{means[name]:.4f}" for name in columns)
        click.echo(
            f"{'mean':{width}s} " + " ".join(f"{cell:>{w}s}" for cell, w in zip(cells, columns.values(), strict=True))
        )
