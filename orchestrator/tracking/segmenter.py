"""The registered model's code: a pyfunc fold ensemble that rebuilds the fold networks through msx's backbone
registry from their checkpoints (weights loaded with weights_only=True)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from msx.models.checkpoint import load_checkpoint
from msx.models.diffusion import DiffusionConfig
from msx.models.engine import InferenceConfig, segment_scan, segment_scan_with_maps
from msx.models.lesion_maps import LesionMaps
from msx.models.uncertainty import lesion_maps, pooled_statistics


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
            segment_scan(net, image, self.inference, self.device, self.diffusion, self._seeded_generator())[
                self.strategy
            ]
            for net in self.nets
        ]
        return _majority_vote(fold_masks)

    # A method of the unwrapped model rather than a predict param: MLflow drops params that the logged
    # signature does not declare (versions registered so far have none), and a params switch would make
    # predict's return shape depend on its arguments. predict stays the plain mask for any pyfunc caller.
    def predict_with_maps(self, model_input: np.ndarray) -> tuple[np.ndarray, LesionMaps[np.ndarray]]:
        """``predict``'s mask, the fold models' mean lesion probability and every uncertainty measure's map (float32).

        The fold models' chains are one ensemble: the measures are computed over all of them
        (``uncertainty.pooled_statistics``), not averaged over the folds, so that the folds' disagreement counts as
        uncertainty (knowledge uncertainty, for the most part) too.
        """
        image = _checked_image(model_input)
        folds = [
            segment_scan_with_maps(net, image, self.inference, self.device, self.diffusion, self._seeded_generator())
            for net in self.nets
        ]
        maps = lesion_maps(pooled_statistics([fold.statistics for fold in folds]))
        return _majority_vote([fold.masks[self.strategy] for fold in folds]), maps


def _majority_vote(fold_masks: list[np.ndarray]) -> np.ndarray:
    """uint8 mask of the voxels that more than half of the fold masks call lesion."""
    return (2 * np.sum(fold_masks, axis=0) > len(fold_masks)).astype(np.uint8)


def _checked_image(model_input: np.ndarray) -> np.ndarray:
    image = np.asarray(model_input, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"expected an image of shape (channels, X, Y, Z), got {image.shape}")
    return image
