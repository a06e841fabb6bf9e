from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import list_data_collate

from msx.models.data.cache import prepare_loaded_scan
from msx.models.data.cohort import LoadedScan
from msx.models.engine import training_dataset

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
