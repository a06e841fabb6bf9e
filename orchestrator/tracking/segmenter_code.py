"""The registered model as MLflow "models from code": MLflow copies this file into the model and runs it to build
the model when it is loaded, so loading unpickles nothing (the fold weights are then read with weights_only=True).
It needs msx installed where the model is loaded; the model's requirements say how (registry.msx_requirement)."""

import mlflow.models

from msx.orchestrator.tracking.segmenter import FoldEnsembleSegmenter

mlflow.models.set_model(FoldEnsembleSegmenter())
