"""Validation's Dice, computed on the device on the preprocessed grid, is the full metric's dsc of the restored mask."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from msx.models.data.cohort import load_scan
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.diffusion import DiffusionConfig
from msx.models.engine import (
    InferenceConfig,
    evaluate_scan,
    group_scores,
    prepare_validation,
    validation_dice,
)
from msx.models.metrics import segmentation_metrics
from msx.models.protocols import PROTOCOLS
from msx.models.networks import NetworkConfig, build_network

PATCH = (32, 32, 32)
SEED = 7


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Three scans of different foreground crops, one with lesion voxels outside its crop (the image is blank
    there), which no prediction can reach."""
    root = tmp_path_factory.mktemp("cohort")
    write_synthetic_cohort(root, patients=2, shape=(36, 40, 36))
    cohort = open_cohort(root, ("flair", "t2"), 1)
    loaded = [load_scan(scan, cohort.modalities, cohort.rater) for scan in cohort.scans[:3]]
    corner = loaded[2].mask.copy()
    assert not (loaded[2].image[:, 0, 0, :] > 0).any()
    corner[0, 0, :3] = 1
    loaded[2] = replace(loaded[2], mask=corner)
    return loaded


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network(NetworkConfig("basic-unet", image_channels=2, width=0.125, patch_size=PATCH)).eval()


def config(protocol: str) -> InferenceConfig:
    # Biased towards lesion so that some masks are neither empty nor full.
    return InferenceConfig(
        ddim_steps=1, samples=1, roi_size=PATCH, overlap=0.25, sw_batch_size=3, strategies=("mean",), protocol=protocol
    )


@pytest.mark.parametrize("protocol", ["msx", "reference"])
def test_device_dice_is_the_dsc_of_the_restored_mask(scans, net, protocol):
    settings = config(protocol)
    device = torch.device("cpu")
    groups = prepare_validation(scans, range(len(scans)), settings, device)
    assert len(groups) == (1 if protocol == "msx" else len(scans))  # msx batches every scan on one padded grid
    dice = validation_dice(net, groups, settings, DiffusionConfig(), SEED, None)
    assert sorted(dice) == list(range(len(scans)))

    generator = torch.Generator()
    expected = {}
    for group in groups:
        generator.manual_seed(SEED + group.indices[0])
        scores = group_scores(net, group, settings, DiffusionConfig(), generator, None)["mean"]
        for row, (index, grid) in enumerate(zip(group.indices, group.grids)):
            own = scores[(row, *(slice(0, side) for side in grid.prepared_shape))]
            mask = grid.restore(PROTOCOLS.get(protocol).mask(own).numpy())
            truth = scans[index].mask.astype(bool)
            expected[index] = segmentation_metrics(mask, truth, spacing=scans[index].spacing)["dsc"]
    assert dice == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # The scan with lesion outside its crop cannot be perfect, and the comparison is not all-trivial.
    assert dice[2] < 1.0


def test_reference_validation_equals_evaluate_scan_per_scan(scans, net):
    """Under the reference protocol each scan is sampled on its own grid, seeded per scan, as before."""
    settings = config("reference")
    groups = prepare_validation(scans, range(len(scans)), settings, torch.device("cpu"))
    dice = validation_dice(net, groups, settings, DiffusionConfig(), SEED, None)
    generator = torch.Generator()
    for index, scan in enumerate(scans):
        generator.manual_seed(SEED + index)
        evaluation = evaluate_scan(net, scan, settings, torch.device("cpu"), DiffusionConfig(), generator)
        assert dice[index] == pytest.approx(evaluation.metrics["mean"]["dsc"], rel=1e-12)


def test_a_share_of_the_scans_is_validated_by_index(scans, net):
    settings = config("msx")
    groups = prepare_validation(scans, [1], settings, torch.device("cpu"))
    assert groups[0].images.shape[0] == 1
    assert list(validation_dice(net, groups, settings, DiffusionConfig(), SEED, None)) == [1]
    assert np.isfinite(list(validation_dice(net, groups, settings, DiffusionConfig(), SEED, None).values())).all()
