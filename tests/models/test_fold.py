"""The fold loop without any orchestration, as a notebook runs it: a tiny U-Net on a tiny synthetic cohort."""

import json
import math
import shutil

import pytest
import torch

from msx.models.checkpoint import load_checkpoint
from msx.models.data.folds import Fold
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.engine import InferenceConfig
from msx.models.fold import (
    MODEL_DIR,
    OVERLAY_DIR,
    SCAN_METRICS_FILE,
    STATE_FILE,
    FoldConfig,
    TrainingConfig,
    load_fold_data,
    load_training_state,
    run_fold,
)
from msx.models.metrics import SPLIT_METRIC_NAMES
from msx.models.networks import NetworkConfig

PATCH = (32, 32, 32)
EPOCHS = 2
STRATEGIES = ("mean", "last")
CONFIG = FoldConfig(
    NetworkConfig("unet", image_channels=2, width=0.125, patch_size=PATCH),
    TrainingConfig(epochs=EPOCHS, batch_size=1, patch_size=PATCH, lr=2e-3, validate_every=2, validation_ddim_steps=1),
    evaluation=InferenceConfig(ddim_steps=1, samples=1, roi_size=PATCH, overlap=0.0, strategies=STRATEGIES),
)
FOLD = Fold(index=1, train=(1,), validation=(2,), test=(3,))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    write_synthetic_cohort(root, patients=3, shape=(32, 36, 32))
    # Two time points per patient: enough for a volume correlation (the ISBI score), few enough to be quick.
    for path in root.rglob("training0?_0[3-9]_*"):
        path.unlink()
    return load_fold_data(open_cohort(root, ("flair", "t2"), 1), FOLD, PATCH)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One run of the fold loop, keeping every report and a copy of every checkpoint folder."""
    kept = tmp_path_factory.mktemp("checkpoints")
    reports = []

    def report(epoch_report, checkpoint):
        reports.append(epoch_report)
        if checkpoint is not None:
            shutil.copytree(checkpoint, kept / str(epoch_report.epoch))

    result = run_fold(CONFIG, data, torch.device("cpu"), report=report, model_metadata={"fold": FOLD.index})
    return result, reports, kept


def test_every_epoch_reports_and_the_last_one_validates_and_carries_the_final_evaluation(run, data):
    result, reports, kept = run
    first, last = reports
    assert (first.epoch, last.epoch) == (1, EPOCHS)
    assert all(r.resumed_from_epoch == 0 and not math.isnan(r.train_loss) for r in reports)
    assert (first.validation_dice, first.best_validation_dice, first.final_metrics) == (None, None, None)
    assert 0 <= last.validation_dice == last.best_validation_dice == result.best_validation_dice <= 1
    assert set(result.metrics) == {
        f"{split}/{strategy}/{name}" for split in ("val", "test") for strategy in STRATEGIES for name in SPLIT_METRIC_NAMES
    }
    assert reports[-1].final_metrics == result.metrics
    scans = {split: [scan.scan_id for scan in data.records(split)] for split in ("val", "test")}
    assert sorted((row["split"], row["scan"], row["strategy"]) for row in result.rows) == sorted(
        (split, scan, strategy) for split, ids in scans.items() for scan in ids for strategy in STRATEGIES
    )


def test_checkpoint_folders_hold_the_state_and_at_the_end_the_model_rows_and_overlays(run, data):
    result, _, kept = run
    assert [path.name for path in kept.iterdir()] == [str(EPOCHS)]  # a checkpoint at each validation only
    final = kept / str(EPOCHS)
    assert sorted(path.name for path in final.iterdir()) == sorted([STATE_FILE, MODEL_DIR, SCAN_METRICS_FILE, OVERLAY_DIR])
    assert json.loads((final / SCAN_METRICS_FILE).read_text()) == json.loads(json.dumps(result.rows))
    net, metadata = load_checkpoint(final / MODEL_DIR)
    assert metadata == {"fold": FOLD.index} and net.config == CONFIG.network
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
