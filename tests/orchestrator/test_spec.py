import dataclasses
from pathlib import Path

import pytest

from msx.models.diffusion import DiffusionConfig, LossWeights
from msx.models.engine import InferenceConfig
from msx.models.fold import FoldConfig, TrainingConfig
from msx.models.networks import NetworkConfig
from msx.models.protocols import PROTOCOLS
from msx.orchestrator.spec import ExperimentSpec, SpecError, bundled_spaces, load_spec, spec_from_dict


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_bundled_spaces_load_and_validate():
    assert {"smoke", "paper", "paper-msx", "hpo"} <= set(bundled_spaces())
    smoke = load_spec("smoke")
    assert smoke.model.backbones == ("unet", "segresnet")
    assert smoke.data.folds == "paper"
    assert smoke.search.parameters[0].name == "training.weight_decay"
    # The paper U-Net trains under its own recipe (issue: it learns nothing under the study's at this scale).
    assert (
        smoke.for_backbone("unet").training.lr == pytest.approx(8e-3)
        and smoke.for_backbone("segresnet").training.lr == pytest.approx(2e-3)
    )
    assert (smoke.inference.protocol, smoke.inference.compare_protocols) == ("msx", ("reference",))
    paper = load_spec("paper")
    assert paper.training.patch_size == (96, 96, 96)
    assert paper.model.backbones == ("unet", "segresnet", "swinunetr", "multiencoder")
    assert paper.training.lr == pytest.approx(1e-4)
    # The reference networks and protocol, with the reference's validation and test settings.
    assert (paper.inference.protocol, paper.inference.compare_protocols) == ("reference", ("msx",))
    assert (paper.training.validation_ddim_steps, paper.training.validation_strategy) == (50, "last")
    assert (paper.training.validation_overlap, paper.inference.overlap) == (0.25, 0.6)
    paper_msx = load_spec("paper-msx")
    assert (paper_msx.inference.protocol, paper_msx.inference.compare_protocols) == ("msx", ("reference",))
    assert (paper_msx.training.validation_ddim_steps, paper_msx.training.validation_strategy) == (10, "mean")
    assert (paper_msx.training.validation_overlap, paper_msx.inference.overlap) == (0.5, 0.5)
    assert paper_msx.model == paper.model and paper_msx.training.epochs == paper.training.epochs
    hpo = load_spec("hpo")
    assert hpo.model.backbones == paper.model.backbones and hpo.data.folds == "paper"
    assert {p.name for p in hpo.search.parameters} == {
        "training.lr", "training.weight_decay", "model.width", "training.loss_dice", "training.loss_bce",
        "training.loss_mse", "training.lesion_patch_fraction", "inference.ddim_steps",
    }


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    spec = load_spec(write(tmp_path, "name: x\ntraining: {lr: 1e-4}\n"))
    assert spec.training.lr == pytest.approx(1e-4)


def test_unknown_key_is_named_with_its_path(tmp_path):
    with pytest.raises(SpecError, match=r"training\.lrr: unknown key; valid keys: .*lr"):
        load_spec(write(tmp_path, "name: x\ntraining: {lrr: 0.1}\n"))


def test_unknown_backbone_lists_valid_names(tmp_path):
    with pytest.raises(SpecError, match=r"model\.backbones: unknown name 'vnet'; valid names: .*segresnet.*unet"):
        load_spec(write(tmp_path, "name: x\nmodel: {backbones: [unet, vnet]}\n"))


def test_unknown_strategy_lists_valid_names(tmp_path):
    with pytest.raises(SpecError, match=r"inference\.strategies: unknown name 'median'; valid names: .*uncertainty"):
        load_spec(write(tmp_path, "name: x\ninference: {strategies: [mean, median]}\n"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ntraining: {lr: 0.1\nmodel: [\n")
    with pytest.raises(SpecError, match=rf"{path}: invalid YAML \(line \d+, column \d+\)"):
        load_spec(path)


def test_wrong_types_and_ranges_are_named(tmp_path):
    with pytest.raises(SpecError, match=r"training\.epochs: expected an integer, got 'many'"):
        load_spec(write(tmp_path, "name: x\ntraining: {epochs: many}\n"))
    with pytest.raises(SpecError, match=r"training\.patch_size: expected a list of 3"):
        load_spec(write(tmp_path, "name: x\ntraining: {patch_size: [32, 32]}\n"))
    with pytest.raises(SpecError, match=r"training\.patch_size: unet needs sides that are multiples of 32"):
        load_spec(write(tmp_path, "name: x\nmodel: {backbones: [unet]}\ntraining: {patch_size: [48, 32, 32]}\n"))
    with pytest.raises(SpecError, match=r"inference\.overlap: must be in \[0, 1\)"):
        load_spec(write(tmp_path, "name: x\ninference: {overlap: 1.5}\n"))
    with pytest.raises(SpecError, match=r"registry\.selection_metric: unknown metric 'hd95'; valid: dsc, .*, isbi"):
        load_spec(write(tmp_path, "name: x\nregistry: {selection_metric: hd95}\n"))
    assert (
        load_spec(write(tmp_path, "name: x\nregistry: {selection_metric: isbi}\n")).registry.selection_metric == "isbi"
    )
    with pytest.raises(SpecError, match=r"search\.time_budget_s: must be positive seconds"):
        load_spec(write(tmp_path, "name: x\nsearch: {time_budget_s: 0}\n"))
    assert load_spec(write(tmp_path, "name: x\nsearch: {time_budget_s: 3600}\n")).search.time_budget_s == 3600


@pytest.mark.parametrize("fraction", [-0.1, 1.5, ".nan"])
def test_lesion_patch_fraction_must_be_a_probability(tmp_path, fraction):
    with pytest.raises(SpecError, match=r"space\.yaml: training\.lesion_patch_fraction: must be in \[0, 1\], got"):
        load_spec(write(tmp_path, f"name: x\ntraining: {{lesion_patch_fraction: {fraction}}}\n"))


def test_lesion_patch_fraction_defaults_to_uniform_patches_and_takes_the_bounds(tmp_path):
    assert spec_from_dict({"name": "x"}).training.lesion_patch_fraction == 0.0
    for fraction in (0, 1, 0.3):
        spec = load_spec(write(tmp_path, f"name: x\ntraining: {{lesion_patch_fraction: {fraction}}}\n"))
        assert spec.training.lesion_patch_fraction == fraction


def test_search_parameters_must_name_spec_fields(tmp_path):
    text = "name: x\nsearch: {parameters: [{name: os.system, low: 1, high: 2}]}\n"
    with pytest.raises(SpecError, match=r"search\.parameters\[0\]\.name: 'os\.system' is not a searchable field"):
        load_spec(write(tmp_path, text))


def test_unset_validation_and_overlap_take_the_protocols_defaults(tmp_path):
    msx = spec_from_dict({"name": "x"})
    assert (msx.training.validation_ddim_steps, msx.training.validation_strategy) == (10, "mean")
    assert (msx.training.validation_overlap, msx.inference.overlap) == (0.5, 0.5)
    reference = spec_from_dict({"name": "x", "inference": {"protocol": "reference"}})
    assert (reference.training.validation_ddim_steps, reference.training.validation_strategy) == (50, "last")
    assert (reference.training.validation_overlap, reference.inference.overlap) == (0.25, 0.6)
    # Set values stay, whatever the protocol; an unset validation overlap follows the test overlap under msx.
    chosen = spec_from_dict({"name": "x", "training": {"validation_ddim_steps": 5}, "inference": {"overlap": 0.25}})
    assert (chosen.training.validation_ddim_steps, chosen.training.validation_overlap) == (5, 0.25)
    cheap = spec_from_dict(
        {"name": "x", "training": {"validation_ddim_steps": 10}, "inference": {"protocol": "reference"}}
    )
    assert (cheap.training.validation_ddim_steps, cheap.training.validation_strategy) == (10, "last")
    assert spec_from_dict(reference.to_dict()) == reference


def test_protocols_are_registered_names_chosen_not_searched(tmp_path):
    with pytest.raises(SpecError, match=r"inference\.protocol: unknown name 'paper'; valid names: msx, reference"):
        load_spec(write(tmp_path, "name: x\ninference: {protocol: paper}\n"))
    with pytest.raises(
        SpecError, match=r"inference\.compare_protocols: unknown name 'ref'; valid names: msx, reference"
    ):
        load_spec(write(tmp_path, "name: x\ninference: {compare_protocols: [ref]}\n"))
    with pytest.raises(SpecError, match=r"inference\.compare_protocols: 'msx' is the study's own protocol"):
        load_spec(write(tmp_path, "name: x\ninference: {compare_protocols: [msx]}\n"))
    with pytest.raises(SpecError, match=r"inference\.compare_protocols: a protocol is listed twice"):
        load_spec(write(tmp_path, "name: x\ninference: {protocol: msx, compare_protocols: [reference, reference]}\n"))
    text = (
        "name: x\nsearch: {parameters: [{name: inference.protocol, distribution: choice, choices: [msx, reference]}]}\n"
    )
    with pytest.raises(SpecError, match=r"search\.parameters\[0\]\.name: 'inference\.protocol' is the study's choice"):
        load_spec(write(tmp_path, text))
    with pytest.raises(SpecError, match=r"training\.validation_overlap: must be in \[0, 1\)"):
        load_spec(write(tmp_path, "name: x\ntraining: {validation_overlap: 1.0}\n"))


def test_missing_spec_file_and_unknown_bundled_name():
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec("does/not/exist.yaml")
    with pytest.raises(SpecError, match="unknown search space 'smok'; bundled spaces: .*smoke"):
        load_spec("smok")


def test_overrides_and_round_trip():
    spec = spec_from_dict({"name": "x"})
    changed = spec.with_overrides({"training.lr": 3e-3, "model.backbones": ["segresnet"]})
    assert changed.training.lr == 3e-3 and changed.model.backbones == ("segresnet",)
    assert spec.training.lr == ExperimentSpec(name="x").training.lr  # frozen original untouched
    assert spec_from_dict(changed.to_dict()) == changed


def test_folds_name_a_plan_or_list_the_folds(tmp_path):
    assert load_spec(write(tmp_path, "name: x\ndata: {folds: loso}\n")).data.folds == "loso"
    text = (
        "name: x\ndata:\n  folds:\n"
        "    - {train: [1, 2], validation: [3], test: [4]}\n"
        "    - {train: [3, 4], validation: [1], test: [2]}\n"
    )
    spec = load_spec(write(tmp_path, text))
    assert [(f.train, f.validation, f.test) for f in spec.data.folds] == [((1, 2), (3,), (4,)), ((3, 4), (1,), (2,))]
    # Trials receive the spec as a dict and parse it again.
    assert spec_from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["data"]["folds"][1] == {"train": [3, 4], "validation": [1], "test": [2]}


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        ("lopo", r"data\.folds: unknown fold plan 'lopo'; valid names: loso, paper \(or a list of folds"),
        ("'3'", r"data\.folds: unknown fold plan '3'"),
        ("7", r"data\.folds: expected a name or a list, got 7"),
        ("[]", r"data\.folds: an explicit list of folds needs at least one fold"),
        ("[[1, 2]]", r"data\.folds\[0\]: expected a mapping, got list"),
        (
            "[{train: [1], validation: [2], test: [3], extra: [4]}]",
            r"data\.folds\[0\]\.extra: unknown key; valid keys: train, validation, test"
        ),
        ("[{train: [1], validation: [2]}]", r"data\.folds\[0\]\.test: needs at least one patient number"),
        (
            "[{train: [1], validation: [2], test: [3]}, {train: [], validation: [2], test: [3]}]",
            r"data\.folds\[1\]\.train: needs at least one"
        ),
        (
            "[{train: [1, x], validation: [2], test: [3]}]",
            r"data\.folds\[0\]\.train\[1\]: expected an integer, got 'x'"
        ),
        (
            "[{train: [1], validation: [0], test: [3]}]",
            r"data\.folds\[0\]\.validation: 0 is not a patient number \(positive integers\)"
        ),
        (
            "[{train: [1, 2], validation: [3], test: [2]}]",
            r"data\.folds\[0\]\.test: patient 2 is also in train; a fold puts each patient in one split"
        ),
        ("[{train: [1, 1], validation: [3], test: [2]}]", r"data\.folds\[0\]\.train: patient 1 is twice"),
    ],
)
def test_bad_folds_are_named_with_their_index_and_split(tmp_path, folds, message):
    path = write(tmp_path, f"name: x\ndata:\n  folds: {folds}\n")
    with pytest.raises(SpecError, match=rf"^{path}: {message}"):
        load_spec(path)


def test_the_science_sections_default_to_msx_models_configs():
    config = ExperimentSpec(name="x").fold_config("unet")
    # The built spec records the validation overlap its protocol (msx) takes: the final evaluation's.
    assert config.training == dataclasses.replace(TrainingConfig(), validation_overlap=InferenceConfig.overlap)
    assert config.validation == FoldConfig(config.network).validation and config.compared == ()
    assert config.diffusion == DiffusionConfig()
    assert config.evaluation == InferenceConfig()
    assert config.network == NetworkConfig("unet", patch_size=TrainingConfig.patch_size)


def test_engine_configs_carry_the_specs_values():
    spec = load_spec("smoke")
    config = spec.fold_config("segresnet")
    assert config.network == NetworkConfig("segresnet", 3, spec.model.width, spec.training.patch_size)
    assert config.training.loss_weights == LossWeights(
        spec.training.loss_dice, spec.training.loss_bce, spec.training.loss_mse
    )
    assert config.evaluation == InferenceConfig(
        spec.inference.ddim_steps, spec.inference.samples, spec.training.patch_size, spec.inference.overlap,
        spec.inference.sw_batch_size, spec.inference.strategies, spec.inference.connectivity,
    )
    # Validation: one chain with the validation's steps and strategy, the final evaluation's windows.
    assert config.validation == InferenceConfig(
        spec.training.validation_ddim_steps, 1, spec.training.patch_size, spec.inference.overlap,
        spec.inference.sw_batch_size, (spec.training.validation_strategy,), spec.inference.connectivity,
    )
    assert spec.inference_config(("last",)).strategies == ("last",)
    # The compared protocol scores with the same settings, at its own test overlap.
    assert config.compared == (
        dataclasses.replace(
            config.evaluation, overlap=PROTOCOLS.get("reference").defaults.overlap, protocol="reference",
            uncertainty_measures=()
        ),
    )


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_training_compile_is_auto_or_a_switch(tmp_path, value, expected):
    spec = load_spec(write(tmp_path, f"name: x\ntraining: {{compile: {value}}}\n"))
    assert spec.training_config().compile == expected


@pytest.mark.parametrize(
    "value, problem",
    [("always", r"'always' is not a compile setting; valid: \"auto\", true, false"), ("2", "expected true or false")]
)
def test_training_compile_rejects_other_values_naming_the_field(tmp_path, value, problem):
    with pytest.raises(SpecError, match=r"space\.yaml: training\.compile: " + problem):
        load_spec(write(tmp_path, f"name: x\ntraining: {{compile: {value}}}\n"))


# The reference's training and msx's fast path, as the spec names them (docs/FIDELITY.md).
REFERENCE_TRAINING = {
    "precision": "fp32", "compile": False, "optimizer": "adamw", "schedule": "per-epoch", "best_checkpoint": "reference"
}
MSX_TRAINING = {
    "precision": "auto", "compile": "auto", "optimizer": "auto", "schedule": "per-step", "best_checkpoint": "msx"
}


def training_choices(training) -> dict:
    return {name: getattr(training, name) for name in REFERENCE_TRAINING}


def test_paper_trains_as_the_reference_and_the_other_spaces_on_msx_s_fast_path():
    assert training_choices(load_spec("paper").training) == REFERENCE_TRAINING
    assert training_choices(load_spec("paper").fold_config("unet").training) == REFERENCE_TRAINING
    for space in ("paper-msx", "smoke", "hpo"):
        assert training_choices(load_spec(space).training) == MSX_TRAINING, space
    assert training_choices(TrainingConfig()) == MSX_TRAINING  # the defaults: msx's


def test_training_choices_reach_the_fold_config(tmp_path):
    text = (
        "name: x\ntraining: {precision: bf16, optimizer: adamw-fused, schedule: per-epoch, "
        "best_checkpoint: reference}\n"
    )
    training = load_spec(write(tmp_path, text)).fold_config("unet").training
    assert (training.precision, training.optimizer, training.schedule, training.best_checkpoint) == (
        "bf16", "adamw-fused", "per-epoch", "reference",
    )


@pytest.mark.parametrize(
    "field, valid",
    [
        ("precision", "auto, fp32, bf16"),
        ("optimizer", "auto, adamw, adamw-fused"),
        ("schedule", "per-step, per-epoch"),
        ("best_checkpoint", "msx, reference"),
    ],
)
def test_training_choices_reject_unknown_names_naming_the_field(tmp_path, field, valid):
    with pytest.raises(SpecError, match=rf"space\.yaml: training\.{field}: unknown name 'fast'; valid names: {valid}$"):
        load_spec(write(tmp_path, f"name: x\ntraining: {{{field}: fast}}\n"))
    with pytest.raises(SpecError, match=rf"space\.yaml: training\.{field}: expected a string, got 3"):
        load_spec(write(tmp_path, f"name: x\ntraining: {{{field}: 3}}\n"))
    with pytest.raises(ValueError, match=rf"training\.{field}: unknown name 'fast'; valid names: {valid}$"):
        TrainingConfig(**{field: "fast"})


def test_warmup_fraction_is_a_fraction_below_one(tmp_path):
    with pytest.raises(SpecError, match=r"training\.warmup_fraction: must be in \[0, 1\), got 1.0"):
        load_spec(write(tmp_path, "name: x\ntraining: {warmup_fraction: 1.0}\n"))


RECIPE_SPACE = """name: x
model: {backbones: [unet, segresnet], width: 0.125}
training: {lr: 2.0e-3, epochs: 24, batch_size: 2}
search: {parameters: [{name: training.weight_decay, low: 1.0e-4, high: 1.0e-2}]}
recipes:
  unet:
    training: {lr: 8.0e-3, epochs: 32}
    model: {width: 0.25}
"""


def test_a_backbone_recipe_sets_its_fields_apart_and_leaves_the_others_the_studys(tmp_path):
    spec = load_spec(write(tmp_path, RECIPE_SPACE))
    unet, segresnet = spec.fold_config("unet"), spec.fold_config("segresnet")
    assert (unet.training.lr, unet.training.epochs, unet.network.width) == (8e-3, 32, 0.25)
    assert (segresnet.training.lr, segresnet.training.epochs, segresnet.network.width) == (2e-3, 24, 0.125)
    assert unet.training.batch_size == segresnet.training.batch_size == 2  # not in the recipe: the study's
    assert spec.recipe_of("unet").describe() == "training.lr=0.008, training.epochs=32, model.width=0.25"
    assert spec.recipe_of("segresnet") is None
    # The spec's dict is its YAML's shape, and makes the same spec back (a trial's worker and a registered model
    # rebuild it from there).
    assert spec.to_dict()["recipes"] == {"unet": {"training": {"lr": 8e-3, "epochs": 32}, "model": {"width": 0.25}}}
    assert spec_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "recipe, problem",
    [
        ("swinunetr: {training: {lr: 1.0e-3}}", r"recipes\.swinunetr: 'swinunetr' is not a backbone of this study"),
        ("unet: {inference: {samples: 2}}", r"recipes\.unet\.inference: a recipe sets model or training fields only"),
        ("unet: {model: {backbones: [unet]}}", r"recipes\.unet\.model\.backbones: unknown key; valid keys: width"),
        ("unet: {training: {epoch: 3}}", r"recipes\.unet\.training\.epoch: unknown key; valid keys: epochs, "),
        ("unet: {training: {lr: fast}}", r"recipes\.unet\.training\.lr: expected a number, got 'fast'"),
        ("unet: {training: {lr: -1.0}}", r"recipes\.unet\.training\.lr: must be positive, got -1\.0"),
        (
            "unet: {training: {patch_size: [48, 48, 48]}}",
            r"recipes\.unet\.training\.patch_size: unet needs sides that are multiples of 32"
        ),
        (
            "unet: {training: {weight_decay: 1.0e-3}}",
            r"recipes\.unet\.training\.weight_decay: is also searched \(search\.parameters\[0\]\)"
        ),
        ("unet: 3", r"recipes\.unet: expected a mapping of sections \(model, training\), got 3"),
    ],
)
def test_a_recipe_error_names_the_recipe_key_and_what_is_wrong(tmp_path, recipe, problem):
    text = RECIPE_SPACE.split("recipes:")[0] + "recipes:\n  " + recipe + "\n"
    with pytest.raises(SpecError, match=r"space\.yaml: " + problem):
        load_spec(write(tmp_path, text))


def test_a_field_the_study_gets_wrong_is_named_as_the_studys_not_the_recipes(tmp_path):
    with pytest.raises(SpecError, match=r"space\.yaml: training\.batch_size: must be at least 1"):
        load_spec(write(tmp_path, RECIPE_SPACE.replace("batch_size: 2", "batch_size: 0")))
