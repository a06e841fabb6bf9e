"""Segment new scans with a checkpoint or a registered model, writing masks, overlays and maps (`msx predict`).

The model is either an msx checkpoint folder (weights + network.json, whose metadata carries the
experiment spec the training run used: its inference settings, diffusion schedule, modalities and seed
drive the segmentation) or a registry URI ``models:/NAME@ALIAS`` (the MLflow pyfunc fold ensemble).

The input is a folder holding ISBI-named images (``trainingPP_TT_<modality>_pp.nii[.gz]``) anywhere
below it (one scan or a whole cohort), a cohort manifest (.csv, .yaml; see
``msx.models.data.manifest``), or one scan given by its modality files as it comes (:func:`single_input_scan`).
Masks are optional; a rater-1 mask, when present, is drawn in the
overlay and its Dice printed. For each scan the command writes (into the output folder, or, when the output
names a ``.nii[.gz]`` file, that mask with the other files beside it: :func:`output_paths`)

- ``<scan_id>_mask.nii.gz``: uint8 {0, 1} on the input's voxel grid, with the input FLAIR's affine;
- ``<scan_id>_overlay.png``: the axial slice with the most predicted lesion voxels (the truth's, when
  the prediction is empty; the middle slice when both are), FLAIR in grey, prediction outlined in red,
  the rater-1 mask in green;
- with ``--maps``, ``<scan_id>_probability.nii.gz`` and ``<scan_id>_uncertainty_<measure>.nii.gz`` for each
  uncertainty measure (``msx.models.uncertainty``: total, data, knowledge, steps): float32 in [0, 1] on the same
  grid as the mask, from the same sampling pass: the lesion probability (mean over steps and samples; for a
  registered model also over its fold models) and each measure in bits, over the sampled chains (a registered
  model's fold models' chains pooled); all are 0 outside the foreground box that inference crops to.

Every problem raises a PredictError naming the file, scan or model, before anything is written for that scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msx.models.overlays import overlay_channel, write_overlay

if TYPE_CHECKING:
    from msx.models.lesion_maps import LesionMaps

MASK_SUFFIX = "_mask.nii.gz"
PROBABILITY_SUFFIX = "_probability.nii.gz"
OVERLAY_SUFFIX = "_overlay.png"
OVERLAY_RATER = 1

_AFFINE_ATOL = 1e-3


class PredictError(ValueError):
    """A model, an input scan or an option that cannot be used; the message names it."""


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
        raise PredictError(str(error)) from None
    return [
        InputScan(scan.scan_id, images={name: scan.images[name] for name in modalities}, masks=dict(scan.masks))
        for scan in cohort.scans
    ]


def single_input_scan(files: dict[str, Path]) -> InputScan:
    """One scan given by its modality files (modality -> path), named after its first file (``flair.nii.gz`` ->
    ``flair``); :func:`load_input` checks it as a cohort's scans are checked."""
    if not files:
        raise PredictError("no input: give a folder or manifest with --input, or one scan's files (--flair, ...)")
    first = next(iter(files.values()))
    return InputScan(_nifti_stem(first), images=dict(files), masks={})


def check_given_modalities(given: tuple[str, ...], wanted: tuple[str, ...]) -> None:
    """One scan's modality files must be exactly the model's inputs: a file it would not read is a mistake too."""
    missing = [name for name in wanted if name not in given]
    unused = [name for name in given if name not in wanted]
    if missing or unused:
        problems = [f"lacks {', '.join(f'--{name}' for name in missing)}"] if missing else []
        problems += [f"does not take {', '.join(f'--{name}' for name in unused)}"] if unused else []
        raise PredictError(f"the model reads {', '.join(wanted)}; this scan {' and '.join(problems)}")


@dataclass(frozen=True)
class OutputPaths:
    """One scan's files: the mask, and the others in its folder named ``<stem>_<what>``."""

    mask: Path
    stem: Path  # the folder and the name's start of the files beside the mask

    def _beside(self, suffix: str) -> Path:
        return self.stem.with_name(self.stem.name + suffix)

    @property
    def overlay(self) -> Path:
        return self._beside(OVERLAY_SUFFIX)

    @property
    def probability(self) -> Path:
        return self._beside(PROBABILITY_SUFFIX)

    def uncertainty(self, measure: str) -> Path:
        return self._beside(f"_uncertainty_{measure}.nii.gz")


def names_a_mask_file(out: Path) -> bool:
    return out.name.endswith((".nii", ".nii.gz"))


def output_paths(out: Path, scan_id: str) -> OutputPaths:
    """Where one scan's files go: ``out/<scan_id>_mask.nii.gz`` and its siblings, or, when ``out`` names a
    ``.nii[.gz]`` file, that mask with the others beside it (``p7_mask.nii.gz`` -> ``p7_overlay.png``)."""
    if not names_a_mask_file(out):
        return OutputPaths(out / f"{scan_id}{MASK_SUFFIX}", out / scan_id)
    stem = _nifti_stem(out)
    stem = stem[: -len("_mask")] if stem.endswith("_mask") and stem != "_mask" else stem
    return OutputPaths(out, out.parent / stem)


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def load_input(scan: InputScan, modalities: tuple[str, ...]) -> LoadedInput:
    """The chosen modalities (and the rater-1 mask when there is one), checked to share one voxel grid."""
    import nibabel as nib

    def read(path: Path):
        try:
            image = nib.funcs.squeeze_image(nib.load(path))
            volume = image.get_fdata(dtype=np.float32)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise PredictError(f"cannot read {path}: {' '.join(str(error).split())}") from None
        if volume.ndim != 3:
            raise PredictError(f"{path} is {volume.ndim}-D with shape {volume.shape}; a 3-D volume is required")
        return image, volume

    paths = [scan.images[name] for name in modalities]
    if OVERLAY_RATER in scan.masks:
        paths.append(scan.masks[OVERLAY_RATER])
    read_files = [read(path) for path in paths]
    reference, reference_volume = read_files[0]
    for path, (image, volume) in zip(paths[1:], read_files[1:], strict=True):
        if volume.shape != reference_volume.shape:
            raise PredictError(f"{path} has shape {volume.shape} but {paths[0]} has {reference_volume.shape}")
        if not np.allclose(image.affine, reference.affine, atol=_AFFINE_ATOL):
            raise PredictError(f"{path} has a different affine (voxel-to-world map) from {paths[0]}")
    volumes = [volume for _, volume in read_files[: len(modalities)]]
    for path, volume in zip(paths, volumes, strict=False):
        if not np.isfinite(volume).all():
            raise PredictError(f"{path} contains NaN or infinite voxels")
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


def checkpoint_segmenter(
    folder: Path, strategy: str | None, device, maps: bool = False
) -> tuple[Segmenter, tuple[str, ...], str, int]:
    """(segment, modalities, strategy, image channels) from an msx checkpoint and its spec metadata."""
    import torch

    from msx.models.checkpoint import CheckpointError, load_checkpoint
    from msx.models.engine import segment_scan, segment_scan_with_maps
    from msx.models.uncertainty import lesion_maps

    from ..spec import SpecError, spec_from_dict

    try:
        net, metadata = load_checkpoint(folder, map_location=device)
    except CheckpointError as error:
        raise PredictError(str(error).splitlines()[0]) from None
    if "spec" not in metadata:
        raise PredictError(
            f"checkpoint {folder} has no experiment spec in its metadata, so its inference settings are unknown"
        )
    try:
        spec = spec_from_dict(metadata["spec"], source=f"{folder} metadata")
    except SpecError as error:
        raise PredictError(str(error).splitlines()[0]) from None
    chosen = strategy or spec.training.validation_strategy
    config = spec.inference_config((chosen,))
    diffusion = spec.diffusion_config()
    seed = spec.training.seed

    def segment(image: np.ndarray) -> tuple[np.ndarray, LesionMaps[np.ndarray] | None]:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        if not maps:
            return segment_scan(net, image, config, device, diffusion, generator)[chosen], None
        segmentation = segment_scan_with_maps(net, image, config, device, diffusion, generator)
        return segmentation.masks[chosen], lesion_maps(segmentation.statistics)

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

    from ..tracking.store import tracking_uri_scope

    try:
        with tracking_uri_scope(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
            model = mlflow.pyfunc.load_model(str(local))
    except Exception as error:  # MlflowException, OSError, import errors of a broken model
        raise PredictError(f"{uri}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
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




def model_segmenter(
    model_ref: str, strategy: str | None, tracking_uri: str, maps: bool = False
) -> tuple[Segmenter, tuple[str, ...] | None, str, int]:
    """(segment, modalities or None, strategy, image channels) of a checkpoint folder or a models:/ URI."""
    if model_ref.startswith("models:/"):
        return registry_segmenter(model_ref, strategy, tracking_uri, maps)
    import torch

    folder = Path(model_ref)
    if not folder.is_dir():
        raise PredictError(f"--model {model_ref}: neither a checkpoint folder nor a models:/ URI")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return checkpoint_segmenter(folder, strategy, device, maps)


def input_modalities(
    chosen: tuple[str, ...] | None, model_modalities: tuple[str, ...] | None, channels: int
) -> tuple[str, ...]:
    """The modalities to read: the chosen ones, else the model's, else the defaults; as many as the model takes."""
    from msx.models.data.cohort import DEFAULT_MODALITIES

    use = chosen or model_modalities or DEFAULT_MODALITIES
    if channels and len(use) != channels:
        raise PredictError(
            f"the model takes {channels} input channels but the modalities are {', '.join(use)}; pass --modalities"
        )
    return use


@dataclass(frozen=True)
class ScanPrediction:
    """What was written for one scan: its mask's size, the overlay's slice, and its Dice against rater 1 (if any)."""

    scan_id: str
    voxels: int
    volume_mm3: float
    overlay_slice: int
    dice: float | None
    mask_path: Path


def predict_scans(
    segment: Segmenter, scans: list[InputScan], modalities: tuple[str, ...], out: Path, strategy: str
) -> Iterator[ScanPrediction]:
    """Segment each scan and write its files to `out` (:func:`output_paths`); one ScanPrediction per scan, as it is
    done."""
    if names_a_mask_file(out) and len(scans) > 1:
        raise PredictError(f"--out {out} names one mask file but the input holds {len(scans)} scans; give a folder")
    (out.parent if names_a_mask_file(out) else out).mkdir(parents=True, exist_ok=True)
    for scan in scans:
        loaded = load_input(scan, modalities)
        if not (loaded.image > 0).any():
            raise PredictError(f"scan {scan.scan_id}: the image has no voxel > 0 (no brain to segment)")
        prediction, maps = segment(loaded.image)
        mask = np.asarray(prediction).astype(bool)
        if mask.shape != loaded.flair.shape:
            raise PredictError(
                f"scan {scan.scan_id}: the model returned shape {mask.shape}, expected {loaded.flair.shape}"
            )
        paths = output_paths(out, scan.scan_id)
        write_on_input_grid(paths.mask, mask, np.uint8, loaded)
        if maps is not None:
            write_on_input_grid(paths.probability, maps.probability, np.float32, loaded)
            for measure, uncertainty in maps.uncertainty.items():
                write_on_input_grid(paths.uncertainty(measure), uncertainty, np.float32, loaded)
        z = write_overlay(
            paths.overlay, loaded.flair, mask, loaded.truth, f"{scan.scan_id} [{strategy}]", f"rater {OVERLAY_RATER}"
        )
        voxels = int(mask.sum())
        dice = None
        if loaded.truth is not None:
            total = voxels + int(loaded.truth.sum())
            dice = 2 * int((mask & loaded.truth).sum()) / total if total else 1.0
        yield ScanPrediction(scan.scan_id, voxels, voxels * float(np.prod(loaded.spacing)), z, dice, paths.mask)
