"""Experiment specs: YAML files validated into frozen dataclasses.

A spec names registered components only (backbones, strategies, fold plans, searchers, schedulers);
nothing in it is imported or executed. Every error names the file and the offending key.

The sections that describe the science take their defaults from msx.models' configs (the reference's recipe), and
`ExperimentSpec` makes those configs, one method each: the spec is the only place that knows both vocabularies.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from msx.models.compilation import check_compile_setting
from msx.models.data.cohort import DEFAULT_MODALITIES, MODALITIES
from msx.models.data.folds import FOLD_PLANS
from msx.models.diffusion import DiffusionConfig, LossWeights
from msx.models.engine import OPTIMIZERS, PRECISIONS, InferenceConfig
from msx.models.fold import BEST_CHECKPOINT_RULES, FoldConfig, TrainingConfig
from msx.models.lr_schedule import SCHEDULES
from msx.models.metrics import SPLIT_METRIC_NAMES
from msx.models.networks import BACKBONES, NetworkConfig, spatial_multiple
from msx.models.protocols import PROTOCOLS
from msx.models.strategies import STRATEGIES
from msx.models.uncertainty import UNCERTAINTY_MEASURES

from .resources import ResourcesSpec


class SpecError(ValueError):
    """An experiment spec is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class SyntheticDataSpec:
    patients: int = 5
    shape: tuple[int, int, int] = (48, 56, 48)
    seed: int = 0


@dataclass(frozen=True)
class FoldSpec:
    """One fold listed in data.folds: patient numbers per split; its index is its position there, from 1."""

    train: tuple[int, ...] = ()
    validation: tuple[int, ...] = ()
    test: tuple[int, ...] = ()


@dataclass(frozen=True)
class DataSpec:
    # A cohort folder or a manifest file (.csv, .yaml); None: a synthetic cohort (see `synthetic`) generated
    # under the storage folder.
    path: str | None = None
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    rater: int = 1
    # A fold plan's name (see FOLD_PLANS), or the folds listed explicitly.
    folds: str | tuple[FoldSpec, ...] = "paper"
    synthetic: SyntheticDataSpec = field(default_factory=SyntheticDataSpec)


@dataclass(frozen=True)
class ModelSpec:
    backbones: tuple[str, ...] = ("unet", "segresnet")
    width: float = NetworkConfig.width


@dataclass(frozen=True)
class DiffusionSpec:
    timesteps: int = DiffusionConfig.timesteps
    beta_start: float = DiffusionConfig.beta_start
    beta_end: float = DiffusionConfig.beta_end


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = TrainingConfig.epochs
    batch_size: int = TrainingConfig.batch_size
    patch_size: tuple[int, int, int] = TrainingConfig.patch_size
    lr: float = TrainingConfig.lr
    weight_decay: float = TrainingConfig.weight_decay
    warmup_fraction: float = TrainingConfig.warmup_fraction
    loss_dice: float = LossWeights.dice
    loss_bce: float = LossWeights.bce
    loss_mse: float = LossWeights.mse
    validate_every: int = TrainingConfig.validate_every
    # None: the inference protocol's (msx: 10 steps, mean, the test overlap; reference: 50, last, 0.25).
    validation_ddim_steps: int | None = None
    validation_strategy: str | None = None
    validation_overlap: float | None = None
    seed: int = TrainingConfig.seed
    # Probability that a training patch is centred on a lesion voxel (else on the brain); 0: uniform crops.
    lesion_patch_fraction: float = TrainingConfig.lesion_patch_fraction
    # torch.compile for training and sampling: "auto" (on a CUDA device, off on the CPU), true or false.
    compile: bool | str = TrainingConfig.compile
    # Training numerics: "auto" (bf16 autocast on a GPU, float32 on the CPU), "fp32" (the reference's) or "bf16".
    precision: str = TrainingConfig.precision
    # AdamW: "auto" (fused on a GPU), "adamw" (PyTorch's default implementation, the reference's) or "adamw-fused".
    optimizer: str = TrainingConfig.optimizer
    # The learning rate: "per-step" (msx's warm-up and cosine over the batches) or "per-epoch" (the reference's:
    # epoch 1 at rate 0, warm-up over warmup_fraction of the epochs, cosine, stepped once per epoch).
    schedule: str = TrainingConfig.schedule
    # The weights kept: "msx" (the first validation's, then each strictly better one's) or "reference" (only a
    # validation strictly above the best so far, from 0.0; none kept: the last weights are evaluated).
    best_checkpoint: str = TrainingConfig.best_checkpoint


@dataclass(frozen=True)
class InferenceSpec:
    strategies: tuple[str, ...] = InferenceConfig.strategies
    ddim_steps: int = InferenceConfig.ddim_steps
    samples: int = InferenceConfig.samples
    # None: the protocol's (msx 0.5, reference 0.6).
    overlap: float | None = None
    sw_batch_size: int = InferenceConfig.sw_batch_size
    connectivity: int = InferenceConfig.connectivity
    # How the study samples and fuses, validates and selects (msx.models.protocols): "msx" or "reference".
    protocol: str = InferenceConfig.protocol
    # Protocols the final evaluation of the test patients is also scored under, from the same weights, each at its
    # own default overlap; their metrics are logged as <protocol>/test/<strategy>/<metric>.
    compare_protocols: tuple[str, ...] = ()
    # Voxel uncertainty measures from the sampled chains (msx.models.uncertainty); the final evaluation scores each
    # strategy's mask under each (nDSC R-AAC, beside a random order's) under the study's protocol.
    uncertainty_measures: tuple[str, ...] = InferenceConfig.uncertainty_measures


@dataclass(frozen=True)
class ParameterSpec:
    """One searched hyperparameter; `name` is a dotted spec field such as training.lr."""

    name: str
    distribution: str = "loguniform"
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    initial: Any = None


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 3


@dataclass(frozen=True)
class SearchSpec:
    searcher: str = "optuna"
    configurations_per_backbone: int = 1
    parameters: tuple[ParameterSpec, ...] = ()
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    seed: int = 0
    # Wall-clock budget of the search (seconds of its drivers' time): once spent, no configuration starts and
    # those still training stop, except one that gives the study a configuration finished on every fold;
    # None is no limit.
    time_budget_s: float | None = None


@dataclass(frozen=True)
class RegistrySpec:
    model_name: str = "msx-segmenter"
    selection_metric: str = "dsc"


@dataclass(frozen=True)
class BackboneRecipe:
    """One backbone trained apart from the others: its own learning rate, epochs, batch size, width... (the reference
    sizes each backbone's features on its own). Written in YAML as `recipes: {unet: {training: {lr: 8.0e-3}}}`; the
    fields it leaves out are the study's."""

    backbone: str
    settings: tuple[tuple[str, Any], ...]  # (dotted field, value), as written

    def describe(self) -> str:
        return ", ".join(f"{name}={_describe_value(value)}" for name, value in self.settings)

    def as_sections(self) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {}
        for dotted, value in self.settings:
            section, _, name = dotted.partition(".")
            sections.setdefault(section, {})[name] = _to_plain(value)
        return sections


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    registry: RegistrySpec = field(default_factory=RegistrySpec)
    recipes: tuple[BackboneRecipe, ...] = ()

    def __post_init__(self) -> None:
        """Settings left unset (None) take the protocol's defaults, so a built spec holds every value it runs with."""
        if self.inference.protocol not in PROTOCOLS:
            return  # validate_spec names the unknown protocol
        defaults = PROTOCOLS.get(self.inference.protocol).defaults
        inference = self.inference
        if inference.overlap is None:
            inference = dataclasses.replace(inference, overlap=defaults.overlap)
        training = self.training
        for name in ("validation_ddim_steps", "validation_strategy", "validation_overlap"):
            if getattr(training, name) is None:
                training = dataclasses.replace(training, **{name: getattr(defaults, name)})
        if training.validation_overlap is None:
            training = dataclasses.replace(training, validation_overlap=inference.overlap)
        object.__setattr__(self, "inference", inference)
        object.__setattr__(self, "training", training)

    def to_dict(self) -> dict[str, Any]:
        """The spec as its YAML reads (spec_from_dict makes it back)."""
        plain = _to_plain(self)
        plain["recipes"] = {recipe.backbone: recipe.as_sections() for recipe in self.recipes}
        return plain

    def recipe_of(self, backbone: str) -> BackboneRecipe | None:
        return next((recipe for recipe in self.recipes if recipe.backbone == backbone), None)

    def for_backbone(self, backbone: str) -> ExperimentSpec:
        """The spec as ``backbone`` trains: the study's fields, with its recipe's in their place."""
        recipe = self.recipe_of(backbone)
        return self.with_overrides(dict(recipe.settings)) if recipe else self

    # ---- the configs of msx.models, each made here and nowhere else

    def network_config(self, backbone: str) -> NetworkConfig:
        return NetworkConfig(
            backbone=backbone,
            image_channels=len(self.data.modalities),
            width=self.model.width,
            patch_size=self.training.patch_size,
        )

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(self.diffusion.timesteps, self.diffusion.beta_start, self.diffusion.beta_end)

    def inference_config(
        self, strategies: tuple[str, ...] | None = None, protocol: str | None = None
    ) -> InferenceConfig:
        """The test-time inference settings, for ``strategies`` (default: the spec's) under ``protocol`` (default: the
        study's); a compared protocol runs at its own default overlap."""
        protocol = protocol or self.inference.protocol
        own = protocol == self.inference.protocol
        return InferenceConfig(
            ddim_steps=self.inference.ddim_steps,
            samples=self.inference.samples,
            roi_size=self.training.patch_size,
            overlap=self.inference.overlap if own else PROTOCOLS.get(protocol).defaults.overlap,
            sw_batch_size=self.inference.sw_batch_size,
            strategies=self.inference.strategies if strategies is None else strategies,
            connectivity=self.inference.connectivity,
            protocol=protocol,
            # Scored under the study's own protocol only: a compared protocol compares the masks.
            uncertainty_measures=self.inference.uncertainty_measures if own else (),
        )

    def training_config(self) -> TrainingConfig:
        training = self.training
        return TrainingConfig(
            epochs=training.epochs,
            batch_size=training.batch_size,
            patch_size=training.patch_size,
            lr=training.lr,
            weight_decay=training.weight_decay,
            warmup_fraction=training.warmup_fraction,
            loss_weights=LossWeights(training.loss_dice, training.loss_bce, training.loss_mse),
            validate_every=training.validate_every,
            validation_ddim_steps=training.validation_ddim_steps,
            validation_strategy=training.validation_strategy,
            validation_overlap=training.validation_overlap,
            seed=training.seed,
            lesion_patch_fraction=training.lesion_patch_fraction,
            compile=training.compile,
            precision=training.precision,
            optimizer=training.optimizer,
            schedule=training.schedule,
            best_checkpoint=training.best_checkpoint,
        )

    def fold_config(self, backbone: str) -> FoldConfig:
        """What one fold of ``backbone`` trains and evaluates with (msx.models.fold.run_fold), under its recipe, its
        final evaluation also scored under each compared protocol."""
        spec = self.for_backbone(backbone)
        return FoldConfig(
            spec.network_config(backbone),
            spec.training_config(),
            spec.diffusion_config(),
            spec.inference_config(),
            compared=tuple(spec.inference_config(protocol=protocol) for protocol in spec.inference.compare_protocols),
        )

    def with_overrides(self, overrides: Mapping[str, Any]) -> ExperimentSpec:
        """The spec with dotted fields replaced (a trial's searched values, a CLI override)."""
        spec = self
        for dotted, value in overrides.items():
            section_name, _, field_name = dotted.partition(".")
            section = getattr(spec, section_name)
            hint = _field_types(type(section))[field_name]
            section = dataclasses.replace(section, **{field_name: _coerce(value, hint, dotted, "override")})
            spec = dataclasses.replace(spec, **{section_name: section})
        return spec


SEARCHERS = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# Fields a search may vary: numbers and names that change training or inference, never data or resources.
SEARCHABLE_SECTIONS = ("model", "training", "inference", "diffusion")
# A study's protocols decide what its results mean; they are chosen, never searched.
UNSEARCHABLE_FIELDS = ("inference.protocol", "inference.compare_protocols")
# What a backbone's recipe may set apart: how it is sized and trained; what the study compares (data, inference,
# the diffusion process) stays the same for every backbone.
RECIPE_SECTIONS = ("model", "training")
UNRECIPED_FIELDS = ("model.backbones",)


def bundled_spaces() -> dict[str, Path]:
    """The search spaces shipped with msx, by name (file stem)."""
    folder = resources.files("msx.search_spaces")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_space(space: str) -> Path:
    """A path to a YAML file, or the name of a bundled space such as `smoke`."""
    candidate = Path(space)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise SpecError(f"{candidate}: no such spec file")
        return candidate
    bundled = bundled_spaces()
    if space not in bundled:
        raise SpecError(
            f"unknown search space {space!r}; bundled spaces: {', '.join(sorted(bundled))} (or give a YAML path)"
        )
    return bundled[space]


def load_spec(space: str | Path) -> ExperimentSpec:
    path = resolve_space(str(space))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{path}: invalid YAML{where}: {problem}") from None
    except OSError as error:
        raise SpecError(f"{path}: cannot read spec: {error.strerror}") from None
    return spec_from_dict(raw, source=str(path))


def spec_from_dict(raw: Any, source: str = "spec") -> ExperimentSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a mapping of sections, got {type(raw).__name__}")
    if "name" not in raw:
        raise SpecError(f"{source}: missing key 'name'")
    recipes = _build_recipes(raw["recipes"], source) if raw.get("recipes") else ()
    spec = _build(ExperimentSpec, {key: value for key, value in raw.items() if key != "recipes"}, "", source)
    spec = dataclasses.replace(spec, recipes=recipes)
    validate_spec(spec, source)
    return spec


def _build_recipes(raw: Any, source: str) -> tuple[BackboneRecipe, ...]:
    """`recipes: {<backbone>: {<section>: {<field>: value}}}`, each value typed as its spec field."""
    if not isinstance(raw, dict):
        raise SpecError(
            f"{source}: recipes: expected a mapping of backbone -> {{model: ..., training: ...}}, got "
            f"{type(raw).__name__}"
        )
    section_types = _field_types(ExperimentSpec)
    recipes = []
    for backbone, sections in raw.items():
        key = f"recipes.{backbone}"
        if not isinstance(sections, dict) or not sections:
            raise SpecError(
                f"{source}: {key}: expected a mapping of sections ({', '.join(RECIPE_SECTIONS)}), got {sections!r}"
            )
        settings = []
        for section, fields in sections.items():
            if section not in RECIPE_SECTIONS:
                raise SpecError(f"{source}: {key}.{section}: a recipe sets {' or '.join(RECIPE_SECTIONS)} fields only")
            if not isinstance(fields, dict):
                raise SpecError(f"{source}: {key}.{section}: expected a mapping of fields, got {fields!r}")
            field_types = {
                name: hint for name, hint in _field_types(section_types[section]).items()
                if f"{section}.{name}" not in UNRECIPED_FIELDS
            }
            for name, value in fields.items():
                if name not in field_types:
                    raise SpecError(
                        f"{source}: {key}.{section}.{name}: unknown key; valid keys: {', '.join(field_types)}"
                    )
                settings.append(
                    (f"{section}.{name}", _coerce(value, field_types[name], f"{key}.{section}.{name}", source))
                )
        recipes.append(BackboneRecipe(str(backbone), tuple(settings)))
    return tuple(recipes)


def validate_spec(spec: ExperimentSpec, source: str = "spec") -> None:
    """Cross-field checks: registered names, value ranges, searchable fields."""

    def fail(key: str, problem: str) -> None:
        raise SpecError(f"{source}: {key}: {problem}")

    if not spec.name or not all(c.isalnum() or c in "-_." for c in spec.name):
        fail("name", f"{spec.name!r} must be letters, digits, '-', '_' or '.'")
    if not spec.model.backbones:
        fail("model.backbones", "at least one backbone is needed")
    _registered(fail, "model.backbones", spec.model.backbones, BACKBONES)
    searched = {parameter.name: index for index, parameter in enumerate(spec.search.parameters)}
    for recipe in spec.recipes:
        key = f"recipes.{recipe.backbone}"
        if recipe.backbone not in spec.model.backbones:
            fail(
                key,
                f"{recipe.backbone!r} is not a backbone of this study (model.backbones: "
                f"{', '.join(spec.model.backbones)})"
            )
        for name, _ in recipe.settings:
            if name in searched:
                fail(
                    f"{key}.{name}",
                    f"is also searched (search.parameters[{searched[name]}]): a searched field takes the search's "
                    "values"
                )
    for backbone in spec.model.backbones:
        recipe = spec.recipe_of(backbone)
        own = {name for name, _ in recipe.settings} if recipe else set()

        def fail_in_recipe(key: str, problem: str, own=own, backbone=backbone) -> None:
            fail(f"recipes.{backbone}.{key}" if key in own else key, problem)

        _validate_values(spec.for_backbone(backbone), backbone, fail_in_recipe)


def _validate_values(spec: ExperimentSpec, backbone: str, fail) -> None:
    """Every field's check, on the spec as ``backbone`` trains (its recipe applied)."""
    _registered(fail, "inference.strategies", spec.inference.strategies, STRATEGIES)
    _registered(fail, "inference.uncertainty_measures", spec.inference.uncertainty_measures, UNCERTAINTY_MEASURES)
    _registered(fail, "inference.protocol", (spec.inference.protocol,), PROTOCOLS)
    _registered(fail, "inference.compare_protocols", spec.inference.compare_protocols, PROTOCOLS)
    if spec.inference.protocol in spec.inference.compare_protocols:
        fail(
            "inference.compare_protocols",
            f"{spec.inference.protocol!r} is the study's own protocol (inference.protocol)"
        )
    if len(set(spec.inference.compare_protocols)) < len(spec.inference.compare_protocols):
        fail("inference.compare_protocols", "a protocol is listed twice")
    _registered(fail, "training.validation_strategy", (spec.training.validation_strategy,), STRATEGIES)
    _validate_folds(spec.data.folds, fail)
    for modality in spec.data.modalities:
        if modality not in MODALITIES:
            fail("data.modalities", f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if spec.data.rater not in (1, 2):
        fail("data.rater", f"{spec.data.rater} is not a rater; valid: 1, 2")
    if spec.inference.connectivity not in (6, 18, 26):
        fail("inference.connectivity", f"{spec.inference.connectivity}; valid: 6, 18, 26")
    if spec.registry.selection_metric not in SPLIT_METRIC_NAMES:
        fail(
            "registry.selection_metric",
            f"unknown metric {spec.registry.selection_metric!r}; valid: {', '.join(SPLIT_METRIC_NAMES)}"
        )
    if spec.search.searcher not in SEARCHERS:
        fail("search.searcher", f"unknown searcher {spec.search.searcher!r}; valid names: {', '.join(SEARCHERS)}")
    if spec.search.scheduler.name not in SCHEDULERS:
        fail(
            "search.scheduler.name",
            f"unknown scheduler {spec.search.scheduler.name!r}; valid names: {', '.join(SCHEDULERS)}"
        )
    for key, value in (
        ("training.epochs", spec.training.epochs),
        ("training.batch_size", spec.training.batch_size),
        ("training.validate_every", spec.training.validate_every),
        ("training.validation_ddim_steps", spec.training.validation_ddim_steps),
        ("inference.ddim_steps", spec.inference.ddim_steps),
        ("inference.samples", spec.inference.samples),
        ("resources.workers_per_trial", spec.resources.workers_per_trial),
        ("search.configurations_per_backbone", spec.search.configurations_per_backbone),
        ("data.synthetic.patients", spec.data.synthetic.patients),
    ):
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    for key, value in (("training.lr", spec.training.lr), ("model.width", spec.model.width)):
        if value <= 0:
            fail(key, f"must be positive, got {value}")
    if spec.search.scheduler.grace_period < 1:
        fail("search.scheduler.grace_period", f"must be at least 1 epoch, got {spec.search.scheduler.grace_period}")
    if spec.search.scheduler.reduction_factor < 2:
        fail("search.scheduler.reduction_factor", f"must be at least 2, got {spec.search.scheduler.reduction_factor}")
    for key, value in (
        ("resources.cpus_per_worker", spec.resources.cpus_per_worker),
        ("resources.gpus_per_worker", spec.resources.gpus_per_worker),
        ("resources.memory_per_worker_gb", spec.resources.memory_per_worker_gb),
        ("resources.worker_start_timeout_s", spec.resources.worker_start_timeout_s),
    ):
        if value is not None and value <= 0:
            fail(key, f"must be positive (or left out), got {value}")
    if spec.search.time_budget_s is not None and spec.search.time_budget_s <= 0:
        fail(
            "search.time_budget_s", f"must be positive seconds (or null for no limit), got {spec.search.time_budget_s}"
        )
    for key, overlap in (
        ("inference.overlap", spec.inference.overlap), ("training.validation_overlap", spec.training.validation_overlap)
    ):
        if not 0 <= overlap < 1:
            fail(key, f"must be in [0, 1), got {overlap}")
    try:
        check_compile_setting(spec.training.compile, "training.compile")
    except ValueError as error:
        fail("training.compile", str(error).removeprefix("training.compile: "))
    for key, value, valid in (
        ("training.precision", spec.training.precision, PRECISIONS),
        ("training.optimizer", spec.training.optimizer, OPTIMIZERS),
        ("training.schedule", spec.training.schedule, SCHEDULES),
        ("training.best_checkpoint", spec.training.best_checkpoint, BEST_CHECKPOINT_RULES),
    ):
        if value not in valid:
            fail(key, f"unknown name {value!r}; valid names: {', '.join(valid)}")
    if not 0 <= spec.training.warmup_fraction < 1:
        fail("training.warmup_fraction", f"must be in [0, 1), got {spec.training.warmup_fraction}")
    if not 0 <= spec.training.lesion_patch_fraction <= 1:
        fail("training.lesion_patch_fraction", f"must be in [0, 1], got {spec.training.lesion_patch_fraction}")
    if any(side < 8 for side in spec.training.patch_size):
        fail("training.patch_size", f"sides must be at least 8, got {spec.training.patch_size}")
    multiple = spatial_multiple(backbone)
    if any(side % multiple for side in spec.training.patch_size):
        fail(
            "training.patch_size",
            f"{backbone} needs sides that are multiples of {multiple}, got {spec.training.patch_size}"
        )
    for index, parameter in enumerate(spec.search.parameters):
        _validate_parameter(spec, parameter, f"search.parameters[{index}]", fail)


def _registered(fail, key: str, names: tuple[str, ...], registry: Any) -> None:
    for name in names:
        if name not in registry:
            fail(key, f"unknown name {name!r}; valid names: {', '.join(registry.names())}")


def _validate_folds(folds: str | tuple[FoldSpec, ...], fail) -> None:
    if isinstance(folds, str):
        if folds not in FOLD_PLANS:
            fail(
                "data.folds",
                f"unknown fold plan {folds!r}; valid names: {', '.join(FOLD_PLANS.names())} "
                "(or a list of folds, each {train: [...], validation: [...], test: [...]})",
            )
        return
    if not folds:
        fail("data.folds", "an explicit list of folds needs at least one fold")
    for index, fold in enumerate(folds):
        split_of: dict[int, str] = {}
        for split in ("train", "validation", "test"):
            key = f"data.folds[{index}].{split}"
            patients = getattr(fold, split)
            if not patients:
                fail(key, "needs at least one patient number")
            for patient in patients:
                if patient < 1:
                    fail(key, f"{patient} is not a patient number (positive integers)")
                if patient in split_of:
                    where = "twice" if split_of[patient] == split else f"also in {split_of[patient]}"
                    fail(key, f"patient {patient} is {where}; a fold puts each patient in one split")
                split_of[patient] = split


def _validate_parameter(spec: ExperimentSpec, parameter: ParameterSpec, key: str, fail) -> None:
    section_name, _, field_name = parameter.name.partition(".")
    if parameter.name in UNSEARCHABLE_FIELDS:
        fail(f"{key}.name", f"{parameter.name!r} is the study's choice, not a searched value")
    if section_name not in SEARCHABLE_SECTIONS or field_name not in _field_types(type(getattr(spec, section_name))):
        fail(
            f"{key}.name",
            f"{parameter.name!r} is not a searchable field (use <section>.<field> of: {', '.join(SEARCHABLE_SECTIONS)})"
        )
    if parameter.distribution not in DISTRIBUTIONS:
        fail(
            f"{key}.distribution", f"unknown distribution {parameter.distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if parameter.distribution == "choice":
        if not parameter.choices:
            fail(f"{key}.choices", "a choice parameter needs a non-empty list of choices")
    elif parameter.low is None or parameter.high is None or not parameter.low < parameter.high:
        fail(key, f"needs low < high, got low={parameter.low} high={parameter.high}")
    elif parameter.distribution == "loguniform" and parameter.low <= 0:
        fail(f"{key}.low", "a loguniform range must be positive")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "spec"
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    types_by_field = _field_types(cls)
    unknown = sorted(set(raw) - set(types_by_field))
    if unknown:
        raise SpecError(f"{source}: {prefix}{unknown[0]}: unknown key; valid keys: {', '.join(types_by_field)}")
    values = {name: _coerce(value, types_by_field[name], f"{prefix}{name}", source) for name, value in raw.items()}
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    def fail(expected: str) -> typing.NoReturn:
        raise SpecError(f"{source}: {key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", source)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            fail("a value")
        others = [o for o in options if o is not type(None)]
        if str in others and len(others) == 2:
            # A name or a structured value (data.folds: a plan name or a list of folds).
            if isinstance(value, str):
                return value
            (structured,) = [o for o in others if o is not str]
            if structured is bool:  # a name or a switch (training.compile: "auto", true, false)
                return _coerce(value, bool, key, source)
            if not isinstance(value, (list, tuple, dict)):
                fail("a name or a list")
            return _coerce(value, structured, key, source)
        (option,) = others
        return _coerce(value, option, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail("a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(value))
        if len(value) != len(args):
            fail(f"a list of {len(args)}")
        return tuple(
            _coerce(item, arg, f"{key}[{i}]", source) for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"spec field {key} has unsupported type {hint}")


def _describe_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(item) for item in value]
    return value
