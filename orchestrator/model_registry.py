"""The MLflow model registry: the selected configuration as one model version, usable by name.

A version bundles the fold checkpoints (weights + network config, loaded with weights_only=True),
the resolved spec and the chosen strategy, wrapped as an MLflow pyfunc that rebuilds the networks
through msx's backbone registry. (MLflow's pytorch flavour now exports a shape-locked program, which
cannot take other scan sizes.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from msx.models.checkpoint import load_checkpoint
from msx.models.diffusion import DiffusionConfig
from msx.models.engine import InferenceConfig, segment_scan, segment_scan_with_maps
from msx.models.lesion_maps import LesionMaps, binary_entropy_bits

from .results import Selection
from .tracking import tracking_uri_scope

CHAMPION = "champion"
SELECTION_FILE = "selection.json"


class FoldEnsembleSegmenter(mlflow.pyfunc.PythonModel):
    """predict(image (C,X,Y,Z) float32) -> lesion mask (X,Y,Z) uint8 on the input grid.

    Each fold's model segments the scan with the chosen strategy; a voxel is lesion when more than half
    of the fold models say so. ``predict_with_maps`` adds the probability and uncertainty maps.
    """

    def load_context(self, context) -> None:
        selection = json.loads(Path(context.artifacts["selection"]).read_text())
        self.strategy = selection["strategy"]
        self.inference = InferenceConfig(**{**selection["inference"], "strategies": (self.strategy,)})
        self.diffusion = DiffusionConfig(**selection["diffusion"])
        self.seed = selection.get("seed", 0)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.nets = [
            load_checkpoint(context.artifacts[name], map_location=self.device)[0].to(self.device)
            for name in sorted(context.artifacts)
            if name.startswith("fold")
        ]

    def _seeded_generator(self) -> torch.Generator:
        """Every fold model samples from the same seed, so a prediction does not depend on the fold order."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        return generator

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        image = _checked_image(model_input)
        fold_masks = [
            segment_scan(net, image, self.inference, self.device, self.diffusion, self._seeded_generator())[self.strategy]
            for net in self.nets
        ]
        return _majority_vote(fold_masks)

    # A method of the unwrapped model rather than a predict param: MLflow drops params that the logged
    # signature does not declare (versions registered so far have none), and a params switch would make
    # predict's return shape depend on its arguments. predict stays the plain mask for any pyfunc caller.
    def predict_with_maps(self, model_input: np.ndarray) -> tuple[np.ndarray, LesionMaps[np.ndarray]]:
        """``predict``'s mask and the fold models' mean lesion probability with its entropy (float32 maps).

        The uncertainty is the binary entropy of the averaged probability, not an average of the folds'
        entropies, so that the folds' disagreement counts as uncertainty too.
        """
        image = _checked_image(model_input)
        folds = [
            segment_scan_with_maps(net, image, self.inference, self.device, self.diffusion, self._seeded_generator())
            for net in self.nets
        ]
        probability = np.mean([fold.maps.probability for fold in folds], axis=0, dtype=np.float32)
        uncertainty = binary_entropy_bits(torch.from_numpy(probability)).numpy()
        return _majority_vote([fold.masks[self.strategy] for fold in folds]), LesionMaps(probability, uncertainty)


def _majority_vote(fold_masks: list[np.ndarray]) -> np.ndarray:
    """uint8 mask of the voxels that more than half of the fold masks call lesion."""
    return (2 * np.sum(fold_masks, axis=0) > len(fold_masks)).astype(np.uint8)


def _checked_image(model_input: np.ndarray) -> np.ndarray:
    image = np.asarray(model_input, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"expected an image of shape (channels, X, Y, Z), got {image.shape}")
    return image


def register_selection(
    selection: Selection,
    spec_dict: dict[str, Any],
    model_name: str,
    parent_run_id: str,
    tracking_uri: str,
    work_folder: Path,
) -> tuple[int, str]:
    """Log the selected configuration's fold ensemble under the parent run, register it, alias it champion.

    Returns (version, model URI by alias).
    """
    configuration = selection.configuration
    inference = spec_dict["inference"]
    selection_record = {
        "configuration": configuration.configuration,
        "backbone": configuration.backbone,
        "searched": configuration.searched,
        "strategy": selection.strategy,
        "selection_metric": selection.metric,
        "validation_score": selection.validation_score,
        "folds": [fold.fold for fold in configuration.folds],
        "inference": {
            "ddim_steps": inference["ddim_steps"],
            "samples": inference["samples"],
            "roi_size": tuple(spec_dict["training"]["patch_size"]),
            "overlap": inference["overlap"],
            "sw_batch_size": inference["sw_batch_size"],
            "connectivity": inference["connectivity"],
        },
        "diffusion": spec_dict["diffusion"],
        "seed": spec_dict["training"]["seed"],
    }
    work_folder.mkdir(parents=True, exist_ok=True)
    selection_path = work_folder / SELECTION_FILE
    selection_path.write_text(json.dumps(selection_record, indent=2))
    spec_path = work_folder / "spec.json"
    spec_path.write_text(json.dumps(spec_dict, indent=2))
    artifacts = {"selection": str(selection_path), "spec": str(spec_path)}
    for fold in configuration.folds:
        artifacts[f"fold{fold.fold}"] = str(Path(fold.checkpoint_path) / "model")

    # The version's source is the logged model's models:/m-... URI, resolved through the fluent tracking URI.
    with tracking_uri_scope(tracking_uri):
        with mlflow.start_run(run_id=parent_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=FoldEnsembleSegmenter(),
                artifacts=artifacts,
                # Explicit requirements: inferring them would import-scan the environment for minutes.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "monai", "nibabel", "msx"],
            )
        client = MlflowClient(tracking_uri)
        try:
            client.get_registered_model(model_name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(
                model_name, description="MSSegDiff lesion segmenter selected by msx (LOSO, validation only)"
            )
        version = client.create_model_version(model_name, info.model_uri, run_id=parent_run_id)
    tags = {
        "backbone": configuration.backbone,
        "strategy": selection.strategy,
        "configuration": configuration.configuration,
        f"validation_{selection.metric}": f"{selection.validation_score:.4f}",
        **{f"param.{k}": str(v) for k, v in configuration.searched.items()},
    }
    for (split, strategy, metric), (mean, std) in configuration.summary.items():
        if split == "test" and strategy == selection.strategy and not math.isnan(mean):
            tags[f"test_{metric}"] = f"{mean:.4f} ± {std:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return int(version.version), f"models:/{model_name}@{CHAMPION}"


def describe_model(reference: str, tracking_uri: str) -> dict[str, Any]:
    """NAME, NAME@ALIAS or NAME/VERSION -> version, tags, aliases, source run and its metrics."""
    client = MlflowClient(tracking_uri)
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in reference:
        name, number = reference.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        name = reference
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise LookupError(f"no registered model named {name!r}")
        version = max(versions, key=lambda v: int(v.version))
    run = client.get_run(version.run_id) if version.run_id else None
    return {
        "name": name,
        "version": int(version.version),
        "aliases": list(version.aliases),
        "tags": dict(version.tags),
        "source": version.source,
        "run_id": version.run_id,
        "run_name": run.info.run_name if run else None,
        "experiment_id": run.info.experiment_id if run else None,
        "metrics": dict(run.data.metrics) if run else {},
    }
