"""The MLflow model registry: the selected configuration as one model version, usable by name.

A version bundles the fold checkpoints (weights + network config, loaded with weights_only=True),
the resolved spec and the chosen strategy, wrapped as an MLflow pyfunc that rebuilds the networks
through msx's backbone registry. (MLflow's pytorch flavour now exports a shape-locked program, which
cannot take other scan sizes.)

Champion policy: a new version takes the `champion` alias when there is none yet, or when it beats the
champion's validation score on the same data (equal data fingerprints). Scores on different data do not
compare, so then the champion stays and only `msx registry promote --force` moves it. Versions are never
deleted; each carries a tag saying whether it became champion, and why not.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec

from msx.models.fold import MODEL_DIR
from msx.models.metrics import HIGHER_IS_BETTER

from ..results import Selection
from ..spec import ExperimentSpec
from . import segmenter as segmenter_module
from .provenance import Provenance
from .store import tracking_uri_scope

CHAMPION = "champion"
SELECTION_FILE = "selection.json"
FINGERPRINT_TAG = "data_fingerprint"
CODE_VERSION_TAG = "code_version"
CHAMPION_DECISION_TAG = "champion_decision"
VALIDATION_TAG_PREFIX = "validation_"
# Enough of a sha256 to tell data apart in a message.
SHORT_FINGERPRINT = 12


class PromotionRefused(ValueError):
    """An alias move that would make champion a version selected on other data than the champion's."""


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a new version took the champion alias, and why; `previous_champion`: the version that held it."""

    promoted: bool
    reason: str
    previous_champion: int | None


@dataclass(frozen=True)
class Registration:
    name: str
    version: int
    decision: ChampionDecision

    @property
    def model_uri(self) -> str:
        """By alias while this version is the champion, else by its number."""
        return f"models:/{self.name}@{CHAMPION}" if self.decision.promoted else f"models:/{self.name}/{self.version}"

    @property
    def summary(self) -> str:
        if self.decision.promoted:
            return f"{self.model_uri} (version {self.version})"
        return f"{self.model_uri} (champion stays version {self.decision.previous_champion}: {self.decision.reason})"


@dataclass(frozen=True)
class ModelSummary:
    """One registered model for `msx registry list`; `champion_score` like "dsc 0.8123" (None: no champion)."""

    name: str
    latest_version: int | None
    aliases: dict[str, int]
    champion_score: str | None


# Run by MLflow to build the model when it is loaded ("models from code"): nothing is unpickled.
MODEL_CODE = Path(segmenter_module.__file__).with_name("segmenter_code.py")
# The input example: a scan this small keeps the example's JSON (and MLflow's check of it at logging) small.
EXAMPLE_SHAPE = (8, 8, 8)


def model_signature(channels: int) -> ModelSignature:
    """The image in as a float32 tensor (channels, X, Y, Z) in the order of the spec's modalities, any size; the
    lesion mask (X, Y, Z) out, uint8 in {0, 1}."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (channels, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )


def input_example(channels: int) -> np.ndarray:
    """A tiny scan: zero background around a box of brain-like positive intensities (inference crops to it)."""
    image = np.zeros((channels, *EXAMPLE_SHAPE), dtype=np.float32)
    image[:, 2:6, 2:6, 2:6] = np.random.default_rng(0).uniform(0.5, 1.5, size=(channels, 4, 4, 4)).round(2)
    return image


def msx_requirement() -> str:
    """How msx itself was installed, as a pip requirement: the checkout or VCS commit it came from (PEP 610's
    direct_url.json), else its version from an index."""
    distributions = list(importlib.metadata.distributions(name="msx"))
    for distribution in distributions:  # a build's msx.egg-info in the working folder may shadow the installed one
        raw = distribution.read_text("direct_url.json")
        if not raw:
            continue
        direct = json.loads(raw)
        if "vcs_info" in direct:
            return f"msx @ {direct['vcs_info']['vcs']}+{direct['url']}@{direct['vcs_info']['commit_id']}"
        return f"msx @ {direct['url']}"
    return f"msx=={distributions[0].version}" if distributions else "msx"


def model_requirements() -> list[str]:
    """msx as installed here, and the versions of what it runs the model with."""
    pinned = [
        f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in ("torch", "monai", "nibabel", "mlflow")
    ]
    return [msx_requirement(), *pinned]


def register_selection(
    selection: Selection,
    spec: ExperimentSpec,
    model_name: str,
    parent_run_id: str,
    tracking_uri: str,
    work_folder: Path,
    provenance: Provenance,
) -> Registration:
    """Log the selected configuration's fold ensemble under the parent run, register it as a new version,
    and give it the champion alias if the champion policy (module docstring) says so."""
    configuration = selection.configuration
    spec_dict = spec.to_dict()
    selection_record = {
        "configuration": configuration.configuration,
        "backbone": configuration.backbone,
        "searched": configuration.searched,
        "strategy": selection.strategy,
        "selection_metric": selection.metric,
        "validation_score": selection.validation_score,
        "folds": [fold.trial.fold for fold in configuration.folds],
        "inference": dataclasses.asdict(spec.inference_config((selection.strategy,))),
        "diffusion": dataclasses.asdict(spec.diffusion_config()),
        "seed": spec.training.seed,
        FINGERPRINT_TAG: provenance.data_fingerprint,
        CODE_VERSION_TAG: provenance.code_version,
    }
    work_folder.mkdir(parents=True, exist_ok=True)
    selection_path = work_folder / SELECTION_FILE
    selection_path.write_text(json.dumps(selection_record, indent=2))
    spec_path = work_folder / "spec.json"
    spec_path.write_text(json.dumps(spec_dict, indent=2))
    artifacts = {"selection": str(selection_path), "spec": str(spec_path)}
    for fold in configuration.folds:
        artifacts[f"fold{fold.trial.fold}"] = str(Path(fold.checkpoint_path) / MODEL_DIR)

    channels = len(spec.data.modalities)
    # The version's source is the logged model's models:/m-... URI, resolved through the fluent tracking URI.
    with tracking_uri_scope(tracking_uri):
        with mlflow.start_run(run_id=parent_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                signature=model_signature(channels),
                input_example=input_example(channels),
                # Explicit requirements: inferring them would import-scan the environment for minutes.
                pip_requirements=model_requirements(),
            )
        client = MlflowClient(tracking_uri)
        try:
            client.get_registered_model(model_name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(
                model_name, description="MSSegDiff lesion segmenter selected by msx (LOSO, validation only)"
            )
        # A tracking server accepts a models:/m-... source only with the logged model's id beside it.
        version = client.create_model_version(model_name, info.model_uri, run_id=parent_run_id, model_id=info.model_id)
    tags = {
        "backbone": configuration.backbone,
        "strategy": selection.strategy,
        "configuration": configuration.configuration,
        f"{VALIDATION_TAG_PREFIX}{selection.metric}": f"{selection.validation_score:.4f}",
        FINGERPRINT_TAG: provenance.data_fingerprint,
        CODE_VERSION_TAG: provenance.code_version,
        **{f"param.{k}": str(v) for k, v in configuration.searched.items()},
    }
    for (split, strategy, metric), (mean, std) in configuration.summary.items():
        if split == "test" and strategy == selection.strategy and not math.isnan(mean):
            tags[f"test_{metric}"] = f"{mean:.4f} ± {std:.4f}"
    champion_number = _registered_model(client, model_name).aliases.get(CHAMPION)
    champion = client.get_model_version(model_name, str(champion_number)) if champion_number is not None else None
    decision = decide_champion(selection.metric, tags, champion)
    tags[CHAMPION_DECISION_TAG] = (
        f"became champion: {decision.reason}"
        if decision.promoted
        else f"not champion, version {decision.previous_champion} stays: {decision.reason}"
    )
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, value)
    if decision.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    return Registration(model_name, int(version.version), decision)


def decide_champion(metric: str, new_tags: dict[str, str], champion: ModelVersion | None) -> ChampionDecision:
    """The champion policy for a version with `new_tags`, selected on `metric`, against the current champion.

    Scores are compared as the tags carry them (4 decimals): a tie keeps the champion.
    """
    if champion is None:
        return ChampionDecision(True, "there was no champion", None)
    champion_version = int(champion.version)
    fingerprint, champion_fingerprint = new_tags[FINGERPRINT_TAG], champion.tags.get(FINGERPRINT_TAG)
    if champion_fingerprint != fingerprint:
        return ChampionDecision(
            False,
            f"it was selected on other data (fingerprint {_short(champion_fingerprint)}, this version's "
            f"{_short(fingerprint)}); scores on different data do not compare, `msx registry promote --force` "
            "overrides",
            champion_version,
        )
    key = f"{VALIDATION_TAG_PREFIX}{metric}"
    if key not in champion.tags:
        return ChampionDecision(False, f"it has no {key} tag to compare with", champion_version)
    score, champion_score = new_tags[key], champion.tags[key]
    better = float(score) > float(champion_score) if HIGHER_IS_BETTER[metric] else float(score) < float(champion_score)
    if better:
        reason = (
            f"validation {metric.upper()} {score} beats version {champion_version}'s {champion_score} on the same data"
        )
    else:
        reason = f"validation {metric.upper()} {score} does not beat its {champion_score} on the same data"
    return ChampionDecision(better, reason, champion_version)


def _short(fingerprint: str | None) -> str:
    return fingerprint[:SHORT_FINGERPRINT] if fingerprint else "none"


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    raise LookupError(f"no registered model named {name!r}")


def _model_version(client: MlflowClient, name: str, number: str) -> ModelVersion:
    """Version `number` of a model known to exist, with its aliases (search results lack them)."""
    if not number.isdigit():
        raise LookupError(f"{number!r} is not a version number of {name}")
    try:
        return client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    latest = _latest_version(client, name)
    raise LookupError(
        f"{name} has no version {number} (its versions are 1 to {latest})" if latest else f"{name} has no versions"
    )


def _latest_version(client: MlflowClient, name: str) -> int | None:
    return max((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), default=None)


def aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}={number}" for alias, number in sorted(aliases.items())) or "none"


def resolve_version(client: MlflowClient, reference: str) -> ModelVersion:
    """NAME@ALIAS, NAME/VERSION or NAME (its latest version); LookupError naming what does not exist."""
    name, alias = reference.split("@", 1) if "@" in reference else (reference, None)
    name, number = name.split("/", 1) if "/" in name else (name, None)
    model = _registered_model(client, name)
    if alias is not None:
        if alias not in model.aliases:
            raise LookupError(f"{name} has no alias {alias!r} (its aliases: {aliases_text(model.aliases)})")
        number = str(model.aliases[alias])
    elif number is None:
        latest = _latest_version(client, name)
        if latest is None:
            raise LookupError(f"{name} has no versions")
        number = str(latest)
    return _model_version(client, name, number)


def promote(name: str, number: str, alias: str, force: bool, tracking_uri: str) -> int | None:
    """Point `alias` of model `name` at version `number`; returns the version it pointed at before.

    Making champion a version whose data fingerprint differs from the current champion's needs `force`.
    The version gets a tag recording the move.
    """
    client = MlflowClient(tracking_uri)
    model = _registered_model(client, name)
    version = _model_version(client, name, number)
    previous = model.aliases.get(alias)
    if alias == CHAMPION and previous is not None and not force:
        fingerprint = version.tags.get(FINGERPRINT_TAG)
        champion_fingerprint = client.get_model_version(name, str(previous)).tags.get(FINGERPRINT_TAG)
        if fingerprint != champion_fingerprint:
            raise PromotionRefused(
                f"{name} version {version.version} was selected on data {_short(fingerprint)}, champion version "
                f"{previous} on data {_short(champion_fingerprint)}; their scores do not compare (--force to promote "
                "anyway)"
            )
    client.set_registered_model_alias(name, alias, version.version)
    replaced = f", replacing version {previous}" if previous is not None else ""
    client.set_model_version_tag(
        name, version.version, f"promoted.{alias}",
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by msx registry "
        f"promote{' --force' if force else ''}{replaced}",
    )
    return int(previous) if previous is not None else None


def list_models(tracking_uri: str) -> list[ModelSummary]:
    """Every registered model, by name."""
    client = MlflowClient(tracking_uri)
    page = client.search_registered_models(order_by=["name ASC"])
    models = list(page)
    while page.token:
        page = client.search_registered_models(order_by=["name ASC"], page_token=page.token)
        models.extend(page)
    summaries = []
    for model in models:
        aliases = {alias: int(number) for alias, number in model.aliases.items()}
        champion_score = None
        if CHAMPION in aliases:
            tags = client.get_model_version(model.name, str(aliases[CHAMPION])).tags
            champion_score = next(
                (f"{key.removeprefix(VALIDATION_TAG_PREFIX)} {value}" for key, value in sorted(tags.items())
                 if key.startswith(VALIDATION_TAG_PREFIX)),
                None,
            )
        summaries.append(ModelSummary(model.name, _latest_version(client, model.name), aliases, champion_score))
    return summaries


def describe_model(reference: str, tracking_uri: str) -> dict[str, Any]:
    """NAME, NAME@ALIAS or NAME/VERSION -> version, tags, aliases, source run and its metrics."""
    client = MlflowClient(tracking_uri)
    version = resolve_version(client, reference)
    run = client.get_run(version.run_id) if version.run_id else None
    return {
        "name": version.name,
        "version": int(version.version),
        "aliases": list(version.aliases),
        "tags": dict(version.tags),
        "source": version.source,
        "run_id": version.run_id,
        "run_name": run.info.run_name if run else None,
        "experiment_id": run.info.experiment_id if run else None,
        "metrics": dict(run.data.metrics) if run else {},
    }
