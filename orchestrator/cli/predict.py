"""`msx predict`: segment new scans with a checkpoint or a registered model (msx.orchestrator.predict)."""

from __future__ import annotations

from pathlib import Path

import click

from msx.models.data.cohort import MODALITIES
from msx.models.registry import UnknownNameError

from ..predict.segment import (
    OVERLAY_RATER,
    PredictError,
    check_given_modalities,
    find_input_scans,
    input_modalities,
    load_input,
    model_segmenter,
    predict_scans,
    single_input_scan,
)
from .options import storage_option, tracking_uri_option


def _strategy_check(strategy: str | None) -> None:
    from msx.models.strategies import STRATEGIES

    if strategy is not None:
        try:
            STRATEGIES.get(strategy)
        except UnknownNameError as error:
            raise click.ClickException(str(error)) from None


def _parse_modalities(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    from msx.models.data.cohort import check_choices

    try:
        return check_choices([name.strip() for name in text.split(",") if name.strip()], 1)
    except ValueError as error:
        raise click.ClickException(str(error)) from None


def _modality_file_options(command):
    """--flair, --mprage, ... : one scan given by its files, one option per modality of the data vocabulary."""
    for name in reversed(MODALITIES):
        command = click.option(
            f"--{name}", f"{name}_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
            help=f"One scan's {name.upper()} image (NIfTI), instead of --input.",
        )(command)
    return command


@click.command("predict")
@click.option(
    "--model", "model_ref", required=True, help="An msx checkpoint folder, or models:/NAME@ALIAS (also NAME/VERSION)."
)
@click.option(
    "--input", "input_path", type=click.Path(path_type=Path), default=None,
    help="Folder with ISBI-named scans (one scan or a cohort), or a cohort manifest (.csv, .yaml); masks optional."
)
@_modality_file_options
@click.option(
    "--out", type=click.Path(path_type=Path), required=True,
    help="Folder for <scan>_mask.nii.gz and <scan>_overlay.png, or, for one scan, the mask file (.nii.gz) to write, "
         "the others beside it."
)
@click.option(
    "--maps", is_flag=True,
    help="Also write <scan>_probability.nii.gz and <scan>_uncertainty_<measure>.nii.gz for the measures total, data, "
         "knowledge and steps (float32, bits)."
)
@click.option(
    "--strategy", default=None,
    help="Inference strategy (default: the registered model's, or the checkpoint spec's validation strategy)."
)
@click.option(
    "--modalities", default=None,
    help="Comma-separated input channels in the model's order (default: the training spec's)."
)
@tracking_uri_option
@storage_option()
def predict(
    model_ref: str, input_path: Path | None, out: Path, maps: bool, strategy: str | None, modalities: str | None,
    tracking_uri: str | None, storage: Path, **modality_files: Path | None,
) -> None:
    """Segment every scan under --input, or the one scan given by --flair, --mprage, ..., with a checkpoint or a
    registered model; write masks, overlays (and maps)."""
    # Cheap checks first: a typo must not wait for a model to load.
    _strategy_check(strategy)
    chosen_modalities = _parse_modalities(modalities)
    files = {name: modality_files[f"{name}_file"] for name in MODALITIES if modality_files[f"{name}_file"] is not None}
    if (input_path is None) == (not files):
        raise click.UsageError(
            "give either --input (a folder or a manifest) or one scan's files (--flair, --mprage, ...)"
        )
    if input_path is not None and not input_path.exists():
        raise click.ClickException(f"input {input_path} does not exist")
    from ..tracking.store import default_tracking_uri

    try:
        single = single_input_scan(files) if files else None
        if single is not None:
            load_input(single, tuple(files))  # readable, one grid, finite: checked before the model loads
        segment, model_modalities, used_strategy, channels = model_segmenter(
            model_ref, strategy, tracking_uri or default_tracking_uri(storage.resolve()), maps
        )
        use = input_modalities(chosen_modalities, model_modalities, channels)
        if single is not None:
            check_given_modalities(tuple(files), use)
        scans = [single] if single is not None else find_input_scans(input_path, use)
        for done in predict_scans(segment, scans, use, out, used_strategy):
            line = (
                f"{done.scan_id}: {done.voxels} lesion voxels ({done.volume_mm3:.1f} mm^3), strategy {used_strategy}, "
                f"slice z={done.overlay_slice}"
            )
            if done.dice is not None:
                line += f", DSC vs rater {OVERLAY_RATER} {done.dice:.3f}"
            click.echo(f"{line} -> {done.mask_path}")
    except PredictError as error:
        raise click.ClickException(str(error)) from None
