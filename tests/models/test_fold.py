"""The fold loop without any orchestration, as a notebook runs it: a tiny U-Net on a tiny synthetic cohort."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from msx.models.checkpoint import load_checkpoint
from msx.models.engine import InferenceConfig
from msx.models.fold import (
    MODEL_DIR,
    OVERLAY_DIR,
    SCAN_METRICS_FILE,
    STATE_FILE,
    FoldConfig,
    TrainingConfig,
    load_training_state,
    run_fold,
)
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
    compared=(replace(EVALUATION, protocol="reference"),),
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
    assert set(result.metrics) == {
        f"{split}/{strategy}/{name}" for split in ("val", "test") for strategy in STRATEGIES for name in SPLIT_METRIC_NAMES
    } | {f"reference/test/{strategy}/{name}" for strategy in STRATEGIES for name in SPLIT_METRIC_NAMES}
    assert reports[-1].final_metrics == result.metrics
    scans = {split: [scan.scan_id for scan in data.records(split)] for split in ("val", "test")}
    assert sorted((row["protocol"], row["split"], row["scan"], row["strategy"]) for row in result.rows) == sorted(
        [("msx", split, scan, strategy) for split, ids in scans.items() for scan in ids for strategy in STRATEGIES]
        + [("reference", "test", scan, strategy) for scan in scans["test"] for strategy in STRATEGIES]
    )


def test_checkpoint_folders_hold_the_state_and_at_the_end_the_model_rows_and_overlays(run, data):
    result, _, kept = run
    assert [path.name for path in kept.iterdir()] == [str(EPOCHS)]  # a checkpoint at each validation only
    final = kept / str(EPOCHS)
    assert sorted(path.name for path in final.iterdir()) == sorted([STATE_FILE, MODEL_DIR, SCAN_METRICS_FILE, OVERLAY_DIR])
    assert json.loads((final / SCAN_METRICS_FILE).read_text()) == json.loads(json.dumps(result.rows))
    net, metadata = load_checkpoint(final / MODEL_DIR)
    assert metadata == {"fold": data.fold.index} and net.config == CONFIG.network
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, result.net.state_dict()[name]), name
    assert sorted(path.name for path in (final / OVERLAY_DIR).iterdir()) == [
        f"{split}-{data.records(split)[0].scan_id}-mean.png" for split in ("test", "val")
    ]


def test_resumed_from_its_final_state_it_reports_the_same_evaluation_without_training(run, data):
    result, _, kept = run
    reports = []
    again = run_fold(
        CONFIG, data, torch.device("cpu"), report=lambda r, _: reports.append(r),
        resume=load_training_state(kept / str(EPOCHS), torch.device("cpu")),
    )
    (only,) = reports
    assert (only.epoch, only.resumed_from_epoch) == (EPOCHS, EPOCHS) and math.isnan(only.train_loss)
    assert again.metrics == pytest.approx(result.metrics, nan_ok=True)


def test_inference_windows_must_be_the_training_patch():
    with pytest.raises(ValueError, match=r"inference windows \(96, 96, 96\) must be the training patch size \(32, 32, 32\)"):
        FoldConfig(CONFIG.network, CONFIG.training)
    with pytest.raises(ValueError, match=r"inference windows \(96, 96, 96\)"):
        FoldConfig(CONFIG.network, CONFIG.training, evaluation=EVALUATION, compared=(InferenceConfig(protocol="reference"),))


def test_a_protocol_is_evaluated_once_and_validation_takes_its_own_overlap():
    with pytest.raises(ValueError, match="each protocol is evaluated once"):
        FoldConfig(CONFIG.network, CONFIG.training, evaluation=EVALUATION, compared=(EVALUATION,))
    assert CONFIG.validation.overlap == EVALUATION.overlap  # unset: the final evaluation's
    validated = FoldConfig(CONFIG.network, replace(CONFIG.training, validation_overlap=0.25), evaluation=EVALUATION)
    assert (validated.validation.overlap, validated.validation.samples, validated.validation.strategies) == (0.25, 1, ("mean",))


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
