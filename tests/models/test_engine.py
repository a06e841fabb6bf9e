from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.data import list_data_collate

from msx.models.data.cache import prepare_loaded_scan
from msx.models.data.cohort import LoadedScan, load_scan
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.diffusion import DiffusionConfig
from msx.models.engine import (
    InferenceConfig,
    evaluate_scan,
    group_scores,
    prepare_validation,
    segment_scan,
    segment_scan_with_maps,
    train_epoch,
    train_step,
    training_autocast_dtype,
    training_dataset,
    training_optimizer,
    validation_dice,
)
from msx.models.lesion_maps import binary_entropy_bits
from msx.models.metrics import METRIC_NAMES, VOLUME_NAMES, retention_fractions, segmentation_metrics
from msx.models.networks import NetworkConfig, build_network
from msx.models.protocols import PROTOCOLS
from msx.models.uncertainty import lesion_maps

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
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


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
    maps = lesion_maps(segmentation.statistics)
    probability, uncertainty = maps.probability, maps.uncertainty["steps"]
    for volume in (*segmentation.statistics.values(), probability, *maps.uncertainty.values()):
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
    config = InferenceConfig(
        ddim_steps=3, samples=2, roi_size=PATCH, overlap=0.25, sw_batch_size=2, strategies=("mean", "last")
    )

    evaluation = evaluate_scan(net, scan, config, torch.device("cpu"), generator=torch.Generator().manual_seed(1))

    assert evaluation.metrics.keys() == evaluation.masks.keys() == {"mean", "last"}
    for name, mask in evaluation.masks.items():
        values = evaluation.metrics[name]
        shifts = ("ndsc", "lesion_f1", *(f"r_aac_{m}" for m in (*config.uncertainty_measures, "random")))
        assert tuple(values) == METRIC_NAMES + VOLUME_NAMES + shifts
        assert int(mask.sum()) > 0
        assert values["pred_volume_mm3"] == pytest.approx(1.5 * int(mask.sum()))
        assert values["gt_volume_mm3"] == pytest.approx(1.5 * 8)  # the 2 x 2 x 2 lesion of _loaded
        expected = segmentation_metrics(mask, scan.mask, spacing=scan.spacing)
        assert {key: values[key] for key in METRIC_NAMES} == pytest.approx(expected, nan_ok=True)
        assert all(0 <= values[key] <= 1 for key in shifts), values
        # Each R-AAC is the area above the retention curve the evaluation keeps.
        curves = evaluation.retention[name]
        assert list(curves) == [*config.uncertainty_measures, "random"]
        for measure, curve in curves.items():
            assert curve.shape == retention_fractions().shape
            assert values[f"r_aac_{measure}"] == pytest.approx(1 - np.trapezoid(curve, retention_fractions()))
    # Without uncertainty measures, no Shifts scores and no curves.
    plain = evaluate_scan(net, scan, dataclasses.replace(config, uncertainty_measures=()), torch.device("cpu"))
    assert all(tuple(values) == METRIC_NAMES + VOLUME_NAMES for values in plain.metrics.values())
    assert plain.retention == {}


def test_the_uncertainty_maps_come_from_the_same_pass_as_the_masks_under_both_protocols():
    """Each measure's map, stitched from the one sampling pass, scores the masks that pass gave: the masks are those of
    an evaluation without measures, for the same generator state; under the reference protocol too (fused in
    each window)."""
    scan = _loaded(0)
    torch.manual_seed(0)
    net = TinyConvNet(image_channels=2)
    for protocol in ("msx", "reference"):
        config = InferenceConfig(ddim_steps=2, samples=2, roi_size=PATCH, overlap=0.25, sw_batch_size=2,
                                 strategies=("mean",), protocol=protocol)
        scored = evaluate_scan(net, scan, config, torch.device("cpu"), generator=torch.Generator().manual_seed(3))
        plain = evaluate_scan(net, scan, dataclasses.replace(config, uncertainty_measures=()), torch.device("cpu"),
                              generator=torch.Generator().manual_seed(3))
        np.testing.assert_array_equal(scored.masks["mean"], plain.masks["mean"])
        assert {key: scored.metrics["mean"][key] for key in METRIC_NAMES} == pytest.approx(
            {key: plain.metrics["mean"][key] for key in METRIC_NAMES}, nan_ok=True
        )
        assert {f"r_aac_{m}" for m in config.uncertainty_measures} <= set(scored.metrics["mean"])


# --------------------------------------------------------------------------------------------------------------
# Training: one step (train_step), the unit train_epoch repeats and benchmarks/train_step.py times
# One training step, the unit that train_epoch repeats and benchmarks/train_step.py times.
# --------------------------------------------------------------------------------------------------------------


# The step is the same for every backbone: SegResNet at its smallest input (8^3, two samples for its norms in
# training) keeps each step a few hundredths of a second.
STEP_BACKBONE = "segresnet"
STEP_SIDE = 8


def tiny_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 1, STEP_SIDE, STEP_SIDE, STEP_SIDE)
    return {
        "image": torch.randn(shape, generator=generator),
        "label": (torch.rand(shape, generator=generator) < 0.1).float(),
    }


def test_train_step_updates_the_weights_and_returns_the_detached_loss():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(backbone=STEP_BACKBONE, image_channels=1, width=0.125)).train()
    device = torch.device("cpu")
    optimizer = training_optimizer(net.parameters(), lr=1e-3, weight_decay=0.0, device=device)
    before = [p.detach().clone() for p in net.parameters()]
    batch = tiny_batch(1)
    loss = train_step(net, batch["image"], batch["label"], optimizer, autocast_dtype=training_autocast_dtype(device))
    assert loss.shape == () and not loss.requires_grad and torch.isfinite(loss)
    assert any(not torch.equal(old, new) for old, new in zip(before, net.parameters(), strict=True))


def test_train_epoch_averages_its_steps_losses():
    batches = [tiny_batch(2), tiny_batch(3)]
    device = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        net = build_network(NetworkConfig(backbone=STEP_BACKBONE, image_channels=1, width=0.125)).train()
        return net, training_optimizer(net.parameters(), lr=1e-3, weight_decay=0.0, device=device)

    net, optimizer = fresh()
    schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    torch.manual_seed(4)
    mean = train_epoch(net, batches, optimizer, schedule, device)

    net, optimizer = fresh()
    torch.manual_seed(4)
    losses = [train_step(net, b["image"], b["label"], optimizer) for b in batches]
    torch.testing.assert_close(mean, torch.stack(losses).mean())


def test_precision_fp32_never_autocasts_auto_only_on_a_gpu_bf16_everywhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (training_autocast_dtype(cpu, "fp32"), training_autocast_dtype(cuda, "fp32")) == (None, None)
    assert (training_autocast_dtype(cpu), training_autocast_dtype(cuda)) == (None, torch.bfloat16)  # "auto"
    assert (training_autocast_dtype(cpu, "bf16"), training_autocast_dtype(cuda, "bf16")) == (torch.bfloat16,) * 2
    with pytest.raises(ValueError, match="precision: unknown name 'fp16'; valid names: auto, fp32, bf16"):
        training_autocast_dtype(cpu, "fp16")


def test_optimizer_is_plain_adamw_unless_fused_is_asked_for_or_auto_on_a_gpu():
    net = torch.nn.Linear(2, 2)
    cpu = torch.device("cpu")
    for kind, fused in (("auto", None), ("adamw", None), ("adamw-fused", True)):
        optimizer = training_optimizer(net.parameters(), 1e-3, 0.0, cpu, kind)
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is fused, kind
    with pytest.raises(ValueError, match="optimizer: unknown name 'sgd'; valid names: auto, adamw, adamw-fused"):
        training_optimizer(net.parameters(), 1e-3, 0.0, cpu, "sgd")


# --------------------------------------------------------------------------------------------------------------
# Validation (prepare_validation, group_scores, validation_dice)
# Validation's Dice, computed on the device on the preprocessed grid, is the full metric's dsc of the restored mask.
# --------------------------------------------------------------------------------------------------------------


VALIDATION_PATCH = (32, 32, 32)
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
    return build_network(NetworkConfig("basic-unet", image_channels=2, width=0.125, patch_size=VALIDATION_PATCH)).eval()


def config(protocol: str) -> InferenceConfig:
    # Biased towards lesion so that some masks are neither empty nor full.
    return InferenceConfig(
        ddim_steps=1,
        samples=1,
        roi_size=VALIDATION_PATCH,
        overlap=0.25,
        sw_batch_size=3,
        strategies=("mean",),
        protocol=protocol,
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
        for row, (index, grid) in enumerate(zip(group.indices, group.grids, strict=True)):
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
