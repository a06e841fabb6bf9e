"""msx against the MSSegDiff reference code's own numbers (tests/fixtures/fidelity/README.md).

Run with ``pytest -s`` to see the largest error of every compared array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msx.models.fidelity import (
    EXACT,
    RELATIVE,
    SCHEDULE_TOLERANCE,
    TOLERANCE,
    FixtureError,
    check_fixture,
    load_arrays,
    msx_state_dict,
)
from msx.models.protocols import REFERENCE, positive_mask, reference_mask

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fidelity"
VARIANT = FIXTURES / "variant"  # other feature sizes, seeds, a batch of 3 and 2 chains


STRATEGIES = [
    "strategy.last", "strategy.mean", "strategy.mean_var", "strategy.uncertainty", "strategy.staple_posterior"
]
MASKS = ["mask.last", "mask.mean", "mask.mean_var", "mask.uncertainty", "mask.staple"]


def describe(report) -> str:
    return "\n".join(
        f"  {c.array:<28} {c.describe()}{'' if c.gated else ' (end to end, shown only)'}" for c in report.comparisons
    )


@pytest.fixture(scope="module")
def reports():
    return {
        "unet": check_fixture(FIXTURES / "unet_reference.npz"),
        "multiencoder": check_fixture(FIXTURES / "multiencoder_reference.npz"),
        "sampling": check_fixture(FIXTURES / "sampling_reference.npz"),
        "variant unet": check_fixture(VARIANT / "unet_reference.npz"),
        "variant sampling": check_fixture(VARIANT / "sampling_reference.npz"),  # its unet_reference.npz beside it
    }


class TrainingReports(dict):
    """Each training fixture's replay, made when first asked for: 4 training steps at 32^3, about 2 s each."""

    FILES = {"training": "training_reference.npz", "training multiencoder": "training_multiencoder_reference.npz"}

    def __missing__(self, name: str):
        self[name] = check_fixture(FIXTURES / self.FILES[name])
        return self[name]


@pytest.fixture(scope="module")
def training_reports():
    return TrainingReports()


@pytest.mark.parametrize("name", ["unet", "multiencoder", "sampling", "variant unet", "variant sampling"])
def test_fixture_reproduces_within_the_tolerance(reports, name):
    report = reports[name]
    print(f"\n{name} ({report.fixture}):\n{describe(report)}")
    gated = [c for c in report.comparisons if c.gated]
    assert report.passed and all(c.error <= c.tolerance for c in gated), describe(report)


@pytest.mark.parametrize("name", ["training", "training multiencoder"])
def test_training_fixture_reproduces_within_the_tolerance(training_reports, name):
    report = training_reports[name]
    print(f"\n{name} ({report.fixture}):\n{describe(report)}")
    assert report.passed, describe(report)
    absolute = [c for c in report.comparisons if c.measure != RELATIVE]
    assert all(c.tolerance == TOLERANCE and c.max_abs_error <= TOLERANCE for c in absolute)


def test_a_training_fixture_compares_every_loss_gradient_weight_buffer_and_schedule(training_reports):
    for name, backbone in (("training", "unet"), ("training multiencoder", "multiencoder")):
        report = training_reports[name]
        assert (report.kind, report.backbone) == ("training", backbone)
        arrays = load_arrays(report.fixture)
        compared = [c.array for c in report.comparisons]
        assert compared[:5] == ["losses", "step0.x_t", "step1.x_t", "step2.x_t", "step3.x_t"]
        assert compared[-2:] == ["schedule.lr_per_epoch_24", "schedule.lr_per_epoch_500"]
        # Every gradient and every final weight and buffer of the fixture, each once; nothing else left over.
        for kind in ("grad.", "final."):
            assert sorted(c for c in compared if c.startswith(kind)) == sorted(n for n in arrays if n.startswith(kind))
        assert len([c for c in compared if c.startswith("final.")]) == 368  # 272 parameters + 96 batch-norm buffers
        assert {c.group for c in report.comparisons if c.array.startswith("grad.")} == {
            "grad.encoder.*", "grad.denoiser.*"
        }
        inputs = {n for n in arrays if n.startswith(("initial.", "step", "meta."))} - {f"step{k}.x_t" for k in range(4)}
        assert set(compared) | inputs == set(arrays)
        schedules = [c for c in report.comparisons if c.array.startswith("schedule.")]
        assert all(c.measure == RELATIVE and c.tolerance == SCHEDULE_TOLERANCE and c.error <= 1e-12 for c in schedules)


def test_a_changed_training_fixture_fails_naming_each_changed_array(tmp_path):
    arrays = load_arrays(FIXTURES / "training_reference.npz")
    arrays["losses"] = arrays["losses"] + np.eye(4)[1] * 3 * TOLERANCE  # step 0's BCE
    arrays["grad.denoiser.final_conv.bias"] = arrays["grad.denoiser.final_conv.bias"] + 3 * TOLERANCE
    arrays["final.denoiser.dsa2.conv.conv.1.running_mean"][0] += 3 * TOLERANCE  # a batch-norm buffer
    arrays["schedule.lr_per_epoch_24"] = arrays["schedule.lr_per_epoch_24"] * (1 + 10 * SCHEDULE_TOLERANCE)
    np.savez(tmp_path / "changed.npz", **arrays)
    report = check_fixture(tmp_path / "changed.npz")
    assert not report.passed
    assert {c.array for c in report.comparisons if not c.passed} == {
        "losses", "grad.denoiser.final_conv.bias", "final.denoiser.dsa2.conv.conv.1.running_mean",
        "schedule.lr_per_epoch_24",
    }


def test_each_fixture_kind_compares_what_its_readme_lists(reports):
    stages = [f"intermediate.encoder_stage{i}" for i in range(5)]
    for name in ("unet", "multiencoder"):
        assert [c.array for c in reports[name].comparisons] == [*stages, "output.x0_logits"]
    assert (reports["unet"].backbone, reports["multiencoder"].backbone) == ("unet", "multiencoder")
    assert (
        reports["unet"].features == (8, 8, 16, 16, 32, 8) and reports["variant unet"].features == (8, 8, 8, 16, 24, 8)
    )
    sampling = reports["sampling"].comparisons
    assert [c.array for c in sampling if c.gated] == [
        "steps.timesteps", "steps.logits", "steps.x0", *STRATEGIES, *MASKS
    ]
    assert [c.array for c in sampling if not c.gated] == [*STRATEGIES, *MASKS]
    assert [c.shape for c in sampling[:3]] == [(10,), (4, 10, 32, 32, 32), (4, 10, 32, 32, 32)]
    # The end-to-end errors are reported, and small where nothing sums many terms.
    end_to_end = {c.array: c.max_abs_error for c in sampling if not c.gated}
    assert end_to_end["strategy.mean"] < TOLERANCE and end_to_end["strategy.staple_posterior"] < TOLERANCE
    # The variant fixture holds no masks: nothing to compare them with.
    variant = [c.array for c in reports["variant sampling"].comparisons if c.gated]
    assert variant == ["steps.timesteps", "steps.logits", "steps.x0", *STRATEGIES]


def test_the_reference_masks_are_reproduced_exactly(reports):
    masks = [c for c in reports["sampling"].comparisons if c.array.startswith("mask.") and c.gated]
    assert [c.array for c in masks] == MASKS
    assert all(c.measure == EXACT and c.tolerance == 0 and c.error == 0 for c in masks), describe(reports["sampling"])
    assert masks[0].describe() == "0 of 32768 differ"


def test_the_reference_mask_rule_is_float32_sigmoid_not_the_sign():
    """STAPLE's posterior of a voxel no step voted for is about 5e-13: lesion under map > 0, not under the
    reference's float32 sigmoid(map) > 0.5, whose mask.staple covers 13,740 of the 32,768 voxels."""
    arrays = load_arrays(FIXTURES / "sampling_reference.npz")
    posterior = torch.from_numpy(arrays["strategy.staple_posterior"])
    expected = arrays["mask.staple"].astype(bool)
    assert expected.sum() == 13740
    assert np.array_equal(reference_mask(posterior).numpy(), expected)
    assert positive_mask(posterior).numpy().sum() == 32768
    assert REFERENCE.mask is not None and torch.equal(REFERENCE.mask(posterior), reference_mask(posterior))
    # float32 sigmoid is exactly 0.5 below about 1e-7; the rule casts a float64 map to float32 first.
    tiny = torch.tensor([5e-13, 5e-8, 2e-7, -2e-7, float("nan")], dtype=torch.float64)
    assert reference_mask(tiny).tolist() == [False, False, True, False, False]
    assert positive_mask(tiny).tolist() == [True, True, True, False, False]


def test_a_changed_mask_fails_with_the_count_of_differing_voxels(tmp_path):
    source = FIXTURES / "sampling_reference.npz"
    arrays = load_arrays(source)
    arrays["mask.staple"] = arrays["mask.staple"].copy()
    arrays["mask.staple"].reshape(-1)[:3] ^= 1
    np.savez(tmp_path / source.name, **arrays)
    report = check_fixture(tmp_path / source.name, weights=FIXTURES / "unet_reference.npz")
    failed = [c for c in report.comparisons if c.gated and not c.passed]
    assert [(c.array, c.error) for c in failed] == [("mask.staple", 3.0)]
    assert failed[0].describe() == "3 of 32768 differ"


@pytest.mark.parametrize(
    ("fixture", "extra", "message"),
    [
        ("unet_reference.npz", "output.noise", "array output.noise is not one a network fixture's check compares"),
        ("unet_reference.npz", "intermediate.encoder_stage5", "array intermediate.encoder_stage5 is not one"),
        ("sampling_reference.npz", "mask.majority", "array mask.majority is not one a sampling fixture's"),
        ("sampling_reference.npz", "strategy.staple", "array strategy.staple is not one a sampling fixture's"),
        ("training_reference.npz", "meta.momentum", "array meta.momentum is not one a training fixture's"),
        ("training_reference.npz", "step4.image", r"arrays step4\.\* belong to no row of losses \(4 steps\)"),
        (
            "training_reference.npz", "grad.denoiser.extra.weight",
            "grad.denoiser.extra.weight: msx's unet has no such parameter"
        ),
        (
            "training_reference.npz", "final.encoder.conv_0.extra",
            "final.encoder.conv_0.extra: msx's unet has no such weight"
        ),
    ],
)
def test_an_array_the_check_does_not_compare_is_an_error_naming_it(tmp_path, fixture, extra, message):
    arrays = load_arrays(FIXTURES / fixture)
    arrays[extra] = np.zeros(2, np.float32)
    np.savez(tmp_path / fixture, **arrays)
    with pytest.raises(FixtureError, match=message):
        check_fixture(tmp_path / fixture, weights=FIXTURES / "unet_reference.npz")


def test_a_training_fixture_without_an_array_or_with_another_optimizer_is_refused(tmp_path):
    arrays = load_arrays(FIXTURES / "training_reference.npz")
    np.savez(tmp_path / "no_grad.npz", **{k: v for k, v in arrays.items() if k != "grad.denoiser.final_conv.bias"})
    with pytest.raises(FixtureError, match="missing array grad.denoiser.final_conv.bias"):
        check_fixture(tmp_path / "no_grad.npz")
    np.savez(tmp_path / "adam.npz", **{**arrays, "meta.optimizer": np.array("adamw")})
    with pytest.raises(FixtureError, match="meta.optimizer 'adamw': the check replays plain sgd only"):
        check_fixture(tmp_path / "adam.npz")
    np.savez(tmp_path / "multi.npz", **{**arrays, "meta.multiencoder": np.array(1)})
    with pytest.raises(FixtureError, match="meta.multiencoder is 1, but its initial weights build msx's unet"):
        check_fixture(tmp_path / "multi.npz")


def changed_copy(source: Path, folder: Path, array: str, delta: float) -> Path:
    arrays = load_arrays(source)
    changed = arrays[array].copy()
    changed.reshape(-1)[changed.size // 2] += delta
    arrays[array] = changed
    target = folder / source.name
    np.savez(target, **arrays)
    return target


@pytest.mark.parametrize("array", ["output.x0_logits", "intermediate.encoder_stage3"])
def test_a_changed_network_output_fails_naming_the_array(tmp_path, array):
    report = check_fixture(changed_copy(FIXTURES / "unet_reference.npz", tmp_path, array, 3 * TOLERANCE))
    assert not report.passed
    assert [c.array for c in report.comparisons if not c.passed] == [array]


def test_a_changed_sampling_fixture_fails_naming_each_changed_array(tmp_path):
    changed = changed_copy(VARIANT / "sampling_reference.npz", tmp_path, "strategy.uncertainty", 3 * TOLERANCE)
    changed = changed_copy(changed, tmp_path, "steps.logits", -3 * TOLERANCE)
    report = check_fixture(changed, weights=VARIANT / "unet_reference.npz")
    assert not report.passed
    assert {c.array for c in report.comparisons if c.gated and not c.passed} == {"steps.logits", "strategy.uncertainty"}


def test_weights_that_do_not_fit_and_files_that_are_no_fixtures_are_named(tmp_path):
    arrays = load_arrays(FIXTURES / "unet_reference.npz")
    arrays["meta.features"] = np.array([8, 8, 16, 16, 64, 8])
    np.savez(tmp_path / "wrong.npz", **arrays)
    with pytest.raises(
        FixtureError, match=r"wrong\.npz: its weights do not fit msx's unet with features \(8, 8, 16, 16, 64, 8\)"
    ):
        check_fixture(tmp_path / "wrong.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(FixtureError, match=r"other\.npz: neither a network fixture .* nor a training fixture"):
        check_fixture(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(FixtureError, match=r"text\.npz: not a readable \.npz fixture"):
        check_fixture(tmp_path / "text.npz")
    del arrays["output.x0_logits"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(FixtureError, match=r"partial\.npz: missing array output\.x0_logits"):
        check_fixture(tmp_path / "partial.npz")
    sampling = tmp_path / "alone" / "sampling_reference.npz"
    sampling.parent.mkdir()
    sampling.write_bytes((VARIANT / "sampling_reference.npz").read_bytes())
    with pytest.raises(FixtureError, match="needs its network's weights: no .*alone/unet_reference.npz"):
        check_fixture(sampling)


def test_every_reference_weight_gets_an_msx_name():
    for fixture, prefix in (
        ("unet_reference.npz", "encoder.stages."), ("multiencoder_reference.npz", "encoder.shared.stages.")
    ):
        arrays = load_arrays(FIXTURES / fixture)
        state = msx_state_dict(arrays, multiencoder=prefix != "encoder.stages.")
        weights = [name for name in arrays if name.startswith(("encoder.", "denoiser."))]
        assert len(state) == len(weights)
        assert all(name.startswith((prefix, "denoiser.")) for name in state)
        assert "denoiser.down_attention.0.features.1.adn.N.running_var" in state  # dsa1.conv.conv.4
        assert "denoiser.up_attention.3.attention.0.conv.weight" in state  # usa1.conv_atten.conv.0
        assert "denoiser.time_embedding.mlp.2.weight" in state  # temb.dense.1
        assert "denoiser.upcat_1.convs.time_projection.bias" in state  # upcat_1.convs.temb_proj
