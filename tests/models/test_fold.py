"""The fold loop without any orchestration, as a notebook runs it: a tiny U-Net on a tiny synthetic cohort."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from msx.models import fold as fold_module
from msx.models.checkpoint import load_checkpoint
from msx.models.engine import InferenceConfig
from msx.models.fold import (
    MODEL_DIR,
    OVERLAY_DIR,
    RETENTION_CURVES_FILE,
    SCAN_METRICS_FILE,
    STATE_FILE,
    FoldConfig,
    TrainingConfig,
    initial_best_score,
    keeps_weights,
    load_training_state,
    run_fold,
)
from msx.models.lr_schedule import reference_lr_per_epoch
from msx.models.metrics import SPLIT_METRIC_NAMES
from msx.models.networks import NetworkConfig
from tests.helpers import tiny_fold_data

PATCH = (32, 32, 32)
EPOCHS = 2
STRATEGIES = ("mean", "last")
EVALUATION = InferenceConfig(ddim_steps=1, samples=1, roi_size=PATCH, overlap=0.0, strategies=STRATEGIES)
# The lighter U-Net: batch 1 suits no batch norm in training (the paper U-Net's). The final evaluation is also
# scored under the reference protocol, from the same weights.
CONFIG = FoldConfig(
    NetworkConfig("basic-unet", image_channels=2, width=0.125, patch_size=PATCH),
    TrainingConfig(epochs=EPOCHS, batch_size=1, patch_size=PATCH, lr=2e-3, validate_every=2, validation_ddim_steps=1),
    evaluation=EVALUATION,
    compared=(replace(EVALUATION, protocol="reference", uncertainty_measures=()),),  # as a spec makes it
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fold_data(tmp_path_factory.mktemp("cohort"), (32, 36, 32), PATCH)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One run of the fold loop, keeping every report and a copy of every checkpoint folder."""
    kept = tmp_path_factory.mktemp("checkpoints")
    reports = []

    def report(epoch_report, checkpoint):
        reports.append(epoch_report)
        if checkpoint is not None:
            shutil.copytree(checkpoint, kept / str(epoch_report.epoch))

    result = run_fold(CONFIG, data, torch.device("cpu"), report=report, model_metadata={"fold": data.fold.index})
    return result, reports, kept


def test_every_epoch_reports_and_the_last_one_validates_and_carries_the_final_evaluation(run, data):
    result, reports, kept = run
    first, last = reports
    assert (first.epoch, last.epoch) == (1, EPOCHS)
    assert all(r.resumed_from_epoch == 0 and not math.isnan(r.train_loss) for r in reports)
    assert (first.validation_dice, first.best_validation_dice, first.final_metrics) == (None, None, None)
    assert 0 <= last.validation_dice == last.best_validation_dice == result.best_validation_dice <= 1
    # The compared protocol scores the test scans only: nothing is selected under it.
    # The Shifts scores too, under the fold's own protocol: each mask's nDSC, lesion F1, and R-AAC under each measure.
    shifts = ("ndsc", "lesion_f1", *(f"r_aac_{m}" for m in (*CONFIG.evaluation.uncertainty_measures, "random")))
    assert set(result.metrics) == {
        f"{split}/{strategy}/{name}" for split in ("val", "test") for strategy in STRATEGIES
        for name in (*SPLIT_METRIC_NAMES, *shifts)
    } | {f"reference/test/{strategy}/{name}" for strategy in STRATEGIES for name in SPLIT_METRIC_NAMES}
    assert reports[-1].final_metrics == result.metrics
    # Where the run's time went: training, validation and the final evaluation under each protocol.
    assert first.phase_seconds is None
    assert set(last.phase_seconds) == {"training", "validation", "evaluation_msx", "evaluation_reference"}
    assert all(seconds > 0 for seconds in last.phase_seconds.values()), last.phase_seconds
    scans = {split: [scan.scan_id for scan in data.records(split)] for split in ("val", "test")}
    assert sorted((row["protocol"], row["split"], row["scan"], row["strategy"]) for row in result.rows) == sorted(
        [("msx", split, scan, strategy) for split, ids in scans.items() for scan in ids for strategy in STRATEGIES]
        + [("reference", "test", scan, strategy) for scan in scans["test"] for strategy in STRATEGIES]
    )


def test_checkpoint_folders_hold_the_state_and_at_the_end_the_model_rows_and_overlays(run, data):
    result, _, kept = run
    assert [path.name for path in kept.iterdir()] == [str(EPOCHS)]  # a checkpoint at each validation only
    final = kept / str(EPOCHS)
    assert sorted(path.name for path in final.iterdir()) == sorted(
        [STATE_FILE, MODEL_DIR, SCAN_METRICS_FILE, RETENTION_CURVES_FILE, OVERLAY_DIR]
    )
    assert json.loads((final / SCAN_METRICS_FILE).read_text()) == json.loads(json.dumps(result.rows))
    # A retention curve per scan, strategy and uncertainty measure (and the random order) of the fold's protocol,
    # whose area gives the R-AAC in that scan's row.
    retention = json.loads((final / RETENTION_CURVES_FILE).read_text())
    fractions = np.array(retention["fractions"])
    rows = {(row["split"], row["scan"], row["strategy"]): row for row in result.rows if row["protocol"] == "msx"}
    measures = (*CONFIG.evaluation.uncertainty_measures, "random")
    assert len(retention["curves"]) == len(rows) * len(measures)
    for curve in retention["curves"]:
        row = rows[curve["split"], curve["scan"], curve["strategy"]]
        assert row[f"r_aac_{curve['measure']}"] == pytest.approx(1 - np.trapezoid(curve["ndsc"], fractions), abs=1e-5)
    net, metadata = load_checkpoint(final / MODEL_DIR)
    assert metadata == {"fold": data.fold.index} and net.config == CONFIG.network
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, result.net.state_dict()[name]), name
    assert sorted(path.name for path in (final / OVERLAY_DIR).iterdir()) == [
        f"{split}-{data.records(split)[0].scan_id}-mean.png" for split in ("test", "val")
    ]


def test_resumed_from_its_final_state_it_reports_the_same_evaluation_without_training(run, data):
    result, reports, kept = run
    replayed = []
    again = run_fold(
        CONFIG, data, torch.device("cpu"), report=lambda r, _: replayed.append(r),
        resume=load_training_state(kept / str(EPOCHS), torch.device("cpu")),
    )
    (only,) = replayed
    assert (only.epoch, only.resumed_from_epoch, only.replayed) == (EPOCHS, EPOCHS, True)
    # That epoch was trained by the run that saved the checkpoint: its loss comes with the state.
    assert only.train_loss == reports[-1].train_loss and not math.isnan(only.train_loss)
    assert again.metrics == pytest.approx(result.metrics, nan_ok=True)


def test_inference_windows_must_be_the_training_patch():
    with pytest.raises(
        ValueError, match=r"inference windows \(96, 96, 96\) must be the training patch size \(32, 32, 32\)"
    ):
        FoldConfig(CONFIG.network, CONFIG.training)
    with pytest.raises(ValueError, match=r"inference windows \(96, 96, 96\)"):
        FoldConfig(
            CONFIG.network, CONFIG.training, evaluation=EVALUATION, compared=(InferenceConfig(protocol="reference"),)
        )


def test_a_protocol_is_evaluated_once_and_validation_takes_its_own_overlap():
    with pytest.raises(ValueError, match="each protocol is evaluated once"):
        FoldConfig(CONFIG.network, CONFIG.training, evaluation=EVALUATION, compared=(EVALUATION,))
    assert CONFIG.validation.overlap == EVALUATION.overlap  # unset: the final evaluation's
    validated = FoldConfig(CONFIG.network, replace(CONFIG.training, validation_overlap=0.25), evaluation=EVALUATION)
    assert (validated.validation.overlap, validated.validation.samples, validated.validation.strategies) == (
        0.25, 1, ("mean",)
    )


class _Stop(Exception):
    pass


def test_resumed_mid_training_it_first_replays_the_report_of_the_checkpoint_it_resumed_from(run, data):
    _, reports, kept = run
    state = load_training_state(kept / str(EPOCHS), torch.device("cpu"))
    checkpointed = reports[-1]
    # The final checkpoint's state, presented as the state of an earlier validation epoch.
    state["epoch"] = EPOCHS - 1
    replays = []

    def report(epoch_report, folder):
        replays.append((epoch_report, folder))
        raise _Stop  # the replay must come before any training: nothing after it is needed here

    with pytest.raises(_Stop):
        run_fold(CONFIG, data, torch.device("cpu"), report=report, resume=state)
    ((replayed, folder),) = replays
    assert replayed.replayed and folder is None
    assert (replayed.epoch, replayed.resumed_from_epoch) == (EPOCHS - 1, EPOCHS - 1)
    assert replayed.validation_dice == checkpointed.validation_dice
    assert replayed.best_validation_dice == checkpointed.best_validation_dice
    assert replayed.train_loss == checkpointed.train_loss
    assert not any(r.replayed for r in reports)


def test_the_best_checkpoint_rules():
    """msx keeps the first validation's weights whatever they score; the reference keeps only a strict improvement
    over a best that starts at 0.0. Both keep the earlier weights on a tie."""
    assert (initial_best_score("msx"), initial_best_score("reference")) == (-math.inf, 0.0)
    assert keeps_weights("msx", 0.0, -math.inf, has_best=False)
    assert keeps_weights("msx", math.nan, -math.inf, has_best=False)
    assert not keeps_weights("reference", 0.0, 0.0, has_best=False)
    assert not keeps_weights("reference", math.nan, 0.0, has_best=False)
    assert keeps_weights("reference", 1e-6, 0.0, has_best=False)
    for rule in ("msx", "reference"):
        assert keeps_weights(rule, 0.5, 0.4, has_best=True)
        assert not keeps_weights(rule, 0.4, 0.4, has_best=True)
        assert not keeps_weights(rule, 0.3, 0.4, has_best=True)
    with pytest.raises(ValueError, match="best_checkpoint: unknown name 'last'; valid names: msx, reference"):
        keeps_weights("last", 0.5, 0.4, True)


def test_the_reference_s_training_its_per_epoch_rates_and_no_kept_weights_when_validation_never_beats_0(
    data, monkeypatch, tmp_path
):
    """`paper`'s training choices in run_fold: each epoch trains at the reference's rate for it (and reports it),
    resumed runs too; validations scoring 0 keep no weights under the reference's rule, so the last are evaluated.
    Validation and the final evaluation are stubbed out: only the training loop is under test."""
    epochs = 5  # warm-up 0.3 x 5 = 1.5 epochs: the reference's overshoot to 2x the base rate at epoch 2
    training = replace(
        CONFIG.training, epochs=epochs, validate_every=2, warmup_fraction=0.3, precision="fp32", compile=False,
        optimizer="adamw", schedule="per-epoch", best_checkpoint="reference",
    )
    config = replace(CONFIG, training=training)
    rates = reference_lr_per_epoch(epochs, training.lr, warmup_epochs=0.3 * epochs)
    assert rates[:2] == [0.0, 2 * training.lr]
    trained_at = []
    evaluated = []

    def recording_train_epoch(net, loader, optimizer, lr_schedule, device, diffusion, loss_weights, autocast_dtype):
        assert lr_schedule is None and autocast_dtype is None  # stepped per epoch by run_fold; float32
        assert not any(group.get("fused") for group in optimizer.param_groups)
        trained_at.append(optimizer.param_groups[0]["lr"])
        return train_epoch(net, loader, optimizer, lr_schedule, device, diffusion, loss_weights, autocast_dtype)

    def final_evaluation(net, config, data, device, overlay_folder):
        evaluated.append({k: v.clone() for k, v in net.state_dict().items()})  # the bare net: compile is off
        return fold_module.FinalEvaluation({}, [], [], {})

    train_epoch = fold_module.train_epoch
    monkeypatch.setattr(fold_module, "train_epoch", recording_train_epoch)
    monkeypatch.setattr(fold_module, "validate_distributed", lambda *args, **kwargs: [0.0] * len(data.validation))
    monkeypatch.setattr(fold_module, "final_evaluation", final_evaluation)
    reports = []

    def report(epoch_report, folder):
        reports.append(epoch_report)
        if folder is not None:
            shutil.copytree(folder, tmp_path / str(epoch_report.epoch))

    result = run_fold(config, data, torch.device("cpu"), report=report)
    assert trained_at == rates  # exactly the reference's rate in every epoch, epoch 1 at 0
    assert [r.lr for r in reports] == rates and [r.epoch for r in reports] == list(range(1, epochs + 1))
    assert [r.best_validation_dice for r in reports if r.validation_dice is not None] == [0.0, 0.0, 0.0]
    assert result.best_validation_dice == 0.0
    state = load_training_state(tmp_path / str(epochs), torch.device("cpu"))
    assert state["best_model"] is None  # none kept: the last weights were evaluated, and are the result's
    (weights,) = evaluated
    for name, tensor in result.net.state_dict().items():
        assert torch.equal(weights[name], tensor) and torch.equal(state["model"][name], tensor), name

    # Resumed from the epoch-2 checkpoint: the replayed report and the epoch after it at the reference's rates.
    trained_at.clear()
    resumed = []

    def stop_after_epoch_3(epoch_report, folder):
        resumed.append(epoch_report)
        if epoch_report.epoch == 3:
            raise _Stop

    with pytest.raises(_Stop):
        run_fold(config, data, torch.device("cpu"), report=stop_after_epoch_3,
                 resume=load_training_state(tmp_path / "2", torch.device("cpu")))
    assert [(r.epoch, r.replayed, r.lr) for r in resumed] == [(2, True, rates[1]), (3, False, rates[2])]
    assert trained_at == [rates[2]]
