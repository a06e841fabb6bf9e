from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.data import list_data_collate

from msx.models.data.cache import prepare_loaded_scan
from msx.models.data.cohort import LoadedScan
from msx.models.engine import InferenceConfig, evaluate_scan, segment_scan, segment_scan_with_maps, training_dataset
from msx.models.lesion_maps import binary_entropy_bits
from msx.models.metrics import METRIC_NAMES, VOLUME_NAMES, segmentation_metrics

from .diffusion.stand_ins import TinyConvNet

PATCH = (8, 8, 8)


def _loaded(seed: int) -> LoadedScan:
    rng = np.random.default_rng(seed)
    image = np.zeros((2, 14, 12, 10), np.float32)
    image[:, 2:12, 1:10, 2:9] = rng.uniform(10, 100, (2, 10, 9, 7))
    mask = np.zeros((14, 12, 10), np.uint8)
    mask[5:7, 4:6, 4:6] = 1
    return LoadedScan(image=image, mask=mask, affine=np.eye(4), spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("lesion_patch_fraction", [0.0, 0.5, 1.0])
def test_training_batches_from_loaded_and_prepared_scans(lesion_patch_fraction):
    loaded = [_loaded(0), _loaded(1), _loaded(2)]
    for scans in (loaded, [prepare_loaded_scan(scan, PATCH) for scan in loaded]):
        dataset = training_dataset(scans, PATCH, lesion_patch_fraction)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=list_data_collate)
        batches = list(loader)
        assert [batch["image"].shape for batch in batches] == [(2, 2, *PATCH), (1, 2, *PATCH)]
        for batch in batches:
            assert set(batch) == {"image", "label"}
            assert batch["image"].dtype == batch["label"].dtype == torch.float32
            assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
            if lesion_patch_fraction == 1.0:
                assert batch["label"].flatten(1).any(dim=1).all()


def test_a_prepared_scan_is_not_changed_by_training_on_it():
    prepared = prepare_loaded_scan(_loaded(0), PATCH)
    image, label = prepared.image.copy(), prepared.label.copy()
    dataset = training_dataset([prepared], PATCH, 0.5)
    for _ in range(4):
        dataset[0]
    np.testing.assert_array_equal(prepared.image, image)
    np.testing.assert_array_equal(prepared.label, label)


@pytest.mark.parametrize("lesion_patch_fraction", [0.0, 0.5])
def test_a_seed_fixes_the_patches_and_augmentations(lesion_patch_fraction):
    scans = [_loaded(0), _loaded(1)]

    def draws(seed: int) -> list[torch.Tensor]:
        dataset = training_dataset(scans, PATCH, lesion_patch_fraction, seed=seed)
        return [list_data_collate([dataset[i] for i in range(len(dataset))])["image"] for _ in range(3)]

    first, again, other = draws(7), draws(7), draws(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_maps_come_from_the_masks_sampling_pass_and_lie_on_the_input_grid():
    image = _loaded(0).image  # foreground box [2:12, 1:10, 2:9]; z (7 voxels) is padded to the 8-voxel window
    box = np.zeros(image.shape[1:], bool)
    box[2:12, 1:10, 2:9] = True
    torch.manual_seed(0)
    net = TinyConvNet(image_channels=2)
    config = InferenceConfig(ddim_steps=3, samples=2, roi_size=PATCH, overlap=0.25, sw_batch_size=2)
    device = torch.device("cpu")

    masks = segment_scan(net, image, config, device, generator=torch.Generator().manual_seed(1))
    segmentation = segment_scan_with_maps(net, image, config, device, generator=torch.Generator().manual_seed(1))

    assert segmentation.masks.keys() == masks.keys()
    for name, mask in masks.items():
        np.testing.assert_array_equal(segmentation.masks[name], mask, err_msg=name)
    probability, uncertainty = segmentation.maps.probability, segmentation.maps.uncertainty
    for volume in (probability, uncertainty):
        assert volume.shape == image.shape[1:] and volume.dtype == np.float32
        assert (volume[~box] == 0).all() and (volume >= 0).all() and (volume <= 1).all()
    assert (probability[box] > 0).all() and (probability[box] < 1).all()  # an untrained net is never certain
    mean_mask = segmentation.masks["mean"]
    assert 0 < int(mean_mask.sum()) < int(box.sum())
    decided = probability != 0.5
    np.testing.assert_array_equal(mean_mask[decided], probability[decided] > 0.5)
    np.testing.assert_array_equal(uncertainty, binary_entropy_bits(torch.from_numpy(probability)).numpy())


def test_evaluation_gives_each_strategys_metrics_and_lesion_volumes_in_mm3():
    scan = dataclasses.replace(_loaded(0), spacing=(0.5, 1.5, 2.0))  # 1.5 mm^3 per voxel
    torch.manual_seed(0)
    net = TinyConvNet(image_channels=2)
    config = InferenceConfig(ddim_steps=3, samples=2, roi_size=PATCH, overlap=0.25, sw_batch_size=2, strategies=("mean", "last"))

    evaluation = evaluate_scan(net, scan, config, torch.device("cpu"), generator=torch.Generator().manual_seed(1))

    assert evaluation.metrics.keys() == evaluation.masks.keys() == {"mean", "last"}
    for name, mask in evaluation.masks.items():
        values = evaluation.metrics[name]
        assert tuple(values) == METRIC_NAMES + VOLUME_NAMES
        assert int(mask.sum()) > 0
        assert values["pred_volume_mm3"] == pytest.approx(1.5 * int(mask.sum()))
        assert values["gt_volume_mm3"] == pytest.approx(1.5 * 8)  # the 2 x 2 x 2 lesion of _loaded
        expected = segmentation_metrics(mask, scan.mask, spacing=scan.spacing)
        assert {key: values[key] for key in METRIC_NAMES} == pytest.approx(expected, nan_ok=True)
