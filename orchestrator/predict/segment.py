"""`msx predict`: segment new scans with a checkpoint or a registered model, writing masks, overlays and maps.

The model is either an msx checkpoint folder (weights + network.json, whose metadata carries the
experiment spec the training run used: its inference settings, diffusion schedule, modalities and seed
drive the segmentation) or a registry URI ``models:/NAME@ALIAS`` (the MLflow pyfunc fold ensemble).

The input is a folder holding ISBI-named images (``trainingPP_TT_<modality>_pp.nii[.gz]``) anywhere
below it (one scan or a whole cohort), or a cohort manifest (.csv, .yaml; see
``msx.models.data.manifest``). Masks are optional; a rater-1 mask, when present, is drawn in the
overlay and its Dice printed. For each scan the command writes

- ``<scan_id>_mask.nii.gz``: uint8 {0, 1} on the input's voxel grid, with the input FLAIR's affine;
- ``<scan_id>_overlay.png``: the axial slice with the most predicted lesion voxels (the truth's, when
  the prediction is empty; the middle slice when both are), FLAIR in grey, prediction outlined in red,
  the rater-1 mask in green;
- with ``--maps``, ``<scan_id>_probability.nii.gz`` and ``<scan_id>_uncertainty.nii.gz``: float32 in [0, 1]
  on the same grid as the mask, from the same sampling pass (``msx.models.lesion_maps``): the lesion
  probability (mean over steps and samples; for a registered model also over its fold models) and its
  binary entropy in bits; both are 0 outside the foreground box that inference crops to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from msx.models.overlays import overlay_channel, write_overlay

if TYPE_CHECKING:
    from msx.models.lesion_maps import LesionMaps

MASK_SUFFIX = "_mask.nii.gz"
PROBABILITY_SUFFIX = "_probability.nii.gz"
UNCERTAINTY_SUFFIX = "_uncertainty.nii.gz"
OVERLAY_SUFFIX = "_overlay.png"
OVERLAY_RATER = 1

_AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class InputScan:
    scan_id: str
    images: dict[str, Path]
    masks: dict[int, Path]


@dataclass(frozen=True)
class LoadedInput:
    image: np.ndarray  # (C, X, Y, Z) float32
    flair: np.ndarray  # (X, Y, Z), for the overlay
    affine: np.ndarray
    header: object  # the first modality's NIfTI header (FLAIR when chosen)
    spacing: tuple[float, float, float]
    truth: np.ndarray | None  # rater-1 mask (X, Y, Z) bool, or None


def find_input_scans(root: Path, modalities: tuple[str, ...]) -> list[InputScan]:
    """The scans of a cohort folder or manifest; each must have every chosen modality, masks optional."""
    from msx.models.data.cohort import CohortError
    from msx.models.data.manifest import open_cohort

    try:
        cohort = open_cohort(root, modalities, rater=None)  # new scans have no masks
    except CohortError as error:
        raise click.ClickException(str(error)) from None
    return [
        InputScan(scan.scan_id, images={name: scan.images[name] for name in modalities}, masks=dict(scan.masks))
        for scan in cohort.scans
    ]


def load_input(scan: InputScan, modalities: tuple[str, ...]) -> LoadedInput:
    """The chosen modalities (and the rater-1 mask when there is one), checked to share one voxel grid."""
    import nibabel as nib

    def read(path: Path):
        try:
            image = nib.funcs.squeeze_image(nib.load(path))
            volume = image.get_fdata(dtype=np.float32)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise click.ClickException(f"cannot read {path}: {' '.join(str(error).split())}") from None
        if volume.ndim != 3:
            raise click.ClickException(f"{path} is {volume.ndim}-D with shape {volume.shape}; a 3-D volume is required")
        return image, volume

    paths = [scan.images[name] for name in modalities]
    if OVERLAY_RATER in scan.masks:
        paths.append(scan.masks[OVERLAY_RATER])
    read_files = [read(path) for path in paths]
    reference, reference_volume = read_files[0]
    for path, (image, volume) in zip(paths[1:], read_files[1:]):
        if volume.shape != reference_volume.shape:
            raise click.ClickException(f"{path} has shape {volume.shape} but {paths[0]} has {reference_volume.shape}")
        if not np.allclose(image.affine, reference.affine, atol=_AFFINE_ATOL):
            raise click.ClickException(f"{path} has a different affine (voxel-to-world map) from {paths[0]}")
    volumes = [volume for _, volume in read_files[: len(modalities)]]
    for path, volume in zip(paths, volumes):
        if not np.isfinite(volume).all():
            raise click.ClickException(f"{path} contains NaN or infinite voxels")
    truth = read_files[-1][1] > 0 if OVERLAY_RATER in scan.masks else None
    flair = volumes[overlay_channel(modalities)]
    return LoadedInput(
        image=np.stack(volumes),
        flair=flair,
        affine=reference.affine,
        header=reference.header,
        spacing=tuple(float(v) for v in nib.affines.voxel_sizes(reference.affine)),  # type: ignore[arg-type]
        truth=truth,
    )


def write_on_input_grid(path: Path, volume: np.ndarray, dtype: type[np.generic], reference: LoadedInput) -> None:
    """``volume`` as NIfTI of ``dtype`` on the reference's grid (its affine, sform and qform)."""
    import nibabel as nib

    header = reference.header.copy()  # type: ignore[attr-defined]
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(volume.astype(dtype), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(path))


# image (C, X, Y, Z) -> (mask (X, Y, Z), the lesion maps when the segmenter was made with maps=True, else None)
Segmenter = Callable[[np.ndarray], "tuple[np.ndarray, LesionMaps[np.ndarray] | None]"]


def _strategy_check(strategy: str | None) -> None:
    from msx.models.registry import UnknownNameError
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


def checkpoint_segmenter(
    folder: Path, strategy: str | None, device, maps: bool = False
) -> tuple[Segmenter, tuple[str, ...], str, int]:
    """(segment, modalities, strategy, image channels) from an msx checkpoint and its spec metadata."""
    import torch
    from msx.models.checkpoint import CheckpointError, load_checkpoint
    from msx.models.diffusion import DiffusionConfig
    from msx.models.engine import InferenceConfig, segment_scan, segment_scan_with_maps

    from ..spec import SpecError, spec_from_dict

    try:
        net, metadata = load_checkpoint(folder, map_location=device)
    except CheckpointError as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    if "spec" not in metadata:
        raise click.ClickException(
            f"checkpoint {folder} has no experiment spec in its metadata, so its inference settings are unknown"
        )
    try:
        spec = spec_from_dict(metadata["spec"], source=f"{folder} metadata")
    except SpecError as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    chosen = strategy or spec.training.validation_strategy
    config = InferenceConfig(
        ddim_steps=spec.inference.ddim_steps,
        samples=spec.inference.samples,
        roi_size=spec.training.patch_size,
        overlap=spec.inference.overlap,
        sw_batch_size=spec.inference.sw_batch_size,
        strategies=(chosen,),
        connectivity=spec.inference.connectivity,
    )
    diffusion = DiffusionConfig(spec.diffusion.timesteps, spec.diffusion.beta_start, spec.diffusion.beta_end)
    seed = spec.training.seed

    def segment(image: np.ndarray) -> tuple[np.ndarray, LesionMaps[np.ndarray] | None]:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        if not maps:
            return segment_scan(net, image, config, device, diffusion, generator)[chosen], None
        segmentation = segment_scan_with_maps(net, image, config, device, diffusion, generator)
        return segmentation.masks[chosen], segmentation.maps

    return segment, tuple(spec.data.modalities), chosen, net.config.image_channels


def registry_segmenter(
    uri: str, strategy: str | None, tracking_uri: str, maps: bool = False
) -> tuple[Segmenter, tuple[str, ...] | None, str, int]:
    """(segment, modalities or None, strategy, image channels) from a registered pyfunc fold ensemble."""
    import json

    import mlflow
    import mlflow.artifacts
    import mlflow.pyfunc
    from mlflow.models import Model

    from ..tracking.callback import tracking_uri_scope

    try:
        with tracking_uri_scope(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
            model = mlflow.pyfunc.load_model(str(local))
    except Exception as error:  # MlflowException, OSError, import errors of a broken model
        raise click.ClickException(f"{uri}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    ensemble = model.unwrap_python_model()
    if strategy is not None:
        ensemble.strategy = strategy
        ensemble.inference = replace(ensemble.inference, strategies=(strategy,))
    modalities = None
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    spec_entry = artifacts.get("spec")
    if spec_entry:
        spec_path = local / spec_entry.get("path", "")
        if spec_path.is_file():
            modalities = tuple(json.loads(spec_path.read_text()).get("data", {}).get("modalities", ())) or None
    channels = ensemble.nets[0].config.image_channels if ensemble.nets else 0

    def segment(image: np.ndarray) -> tuple[np.ndarray, LesionMaps[np.ndarray] | None]:
        return ensemble.predict_with_maps(image) if maps else (ensemble.predict(None, image), None)

    return segment, modalities, ensemble.strategy, channels


@click.command("predict")
@click.option("--model", "model_ref", required=True, help="An msx checkpoint folder, or models:/NAME@ALIAS (also NAME/VERSION).")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True, help="Folder with ISBI-named scans (one scan or a cohort), or a cohort manifest (.csv, .yaml); masks optional.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for <scan>_mask.nii.gz and <scan>_overlay.png.")
@click.option("--maps", is_flag=True, help="Also write <scan>_probability.nii.gz and <scan>_uncertainty.nii.gz (float32, entropy in bits).")
@click.option("--strategy", default=None, help="Inference strategy (default: the registered model's, or the checkpoint spec's validation strategy).")
@click.option("--modalities", default=None, help="Comma-separated input channels in the model's order (default: the training spec's).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI (default: SQLite file in --storage).")
@click.option("--storage", envvar="MSX_STORAGE", type=click.Path(path_type=Path), default=Path("msx_runs"), show_default=True)
def predict(
    model_ref: str, input_path: Path, out: Path, maps: bool, strategy: str | None, modalities: str | None,
    tracking_uri: str | None, storage: Path,
) -> None:
    """Segment every scan under --input with a checkpoint or a registered model; write masks, overlays (and maps)."""
    # Cheap checks first: a typo must not wait for a model to load.
    _strategy_check(strategy)
    chosen_modalities = _parse_modalities(modalities)
    if not input_path.exists():
        raise click.ClickException(f"input {input_path} does not exist")

    import torch

    if model_ref.startswith("models:/"):
        from ..tracking.callback import default_tracking_uri

        uri = tracking_uri or default_tracking_uri(storage.resolve())
        segment, model_modalities, used_strategy, channels = registry_segmenter(model_ref, strategy, uri, maps)
    else:
        folder = Path(model_ref)
        if not folder.is_dir():
            raise click.ClickException(f"--model {model_ref}: neither a checkpoint folder nor a models:/ URI")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        segment, model_modalities, used_strategy, channels = checkpoint_segmenter(folder, strategy, device, maps)

    from msx.models.data.cohort import DEFAULT_MODALITIES

    use = chosen_modalities or model_modalities or DEFAULT_MODALITIES
    if channels and len(use) != channels:
        raise click.ClickException(
            f"the model takes {channels} input channels but the modalities are {', '.join(use)}; pass --modalities"
        )
    scans = find_input_scans(input_path, use)
    out.mkdir(parents=True, exist_ok=True)
    for scan in scans:
        loaded = load_input(scan, use)
        if not (loaded.image > 0).any():
            raise click.ClickException(f"scan {scan.scan_id}: the image has no voxel > 0 (no brain to segment)")
        prediction, lesion_maps = segment(loaded.image)
        mask = np.asarray(prediction).astype(bool)
        if mask.shape != loaded.flair.shape:
            raise click.ClickException(f"scan {scan.scan_id}: the model returned shape {mask.shape}, expected {loaded.flair.shape}")
        mask_path = out / f"{scan.scan_id}{MASK_SUFFIX}"
        overlay_path = out / f"{scan.scan_id}{OVERLAY_SUFFIX}"
        write_on_input_grid(mask_path, mask, np.uint8, loaded)
        if lesion_maps is not None:
            write_on_input_grid(out / f"{scan.scan_id}{PROBABILITY_SUFFIX}", lesion_maps.probability, np.float32, loaded)
            write_on_input_grid(out / f"{scan.scan_id}{UNCERTAINTY_SUFFIX}", lesion_maps.uncertainty, np.float32, loaded)
        z = write_overlay(
            overlay_path, loaded.flair, mask, loaded.truth, f"{scan.scan_id} [{used_strategy}]", f"rater {OVERLAY_RATER}"
        )
        voxels = int(mask.sum())
        volume = voxels * float(np.prod(loaded.spacing))
        line = f"{scan.scan_id}: {voxels} lesion voxels ({volume:.1f} mm^3), strategy {used_strategy}, slice z={z}"
        if loaded.truth is not None:
            total = voxels + int(loaded.truth.sum())
            dice = 2 * int((mask & loaded.truth).sum()) / total if total else 1.0
            line += f", DSC vs rater {OVERLAY_RATER} {dice:.3f}"
        click.echo(f"{line} -> {mask_path}")
