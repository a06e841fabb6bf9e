"""`msx fidelity check` on the reference fixtures: the exit status, the table, the JSON, the errors."""

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from msx.orchestrator.cli import main

FIXTURES = Path(__file__).parents[2] / "fixtures" / "fidelity"


def fidelity(*args):
    return CliRunner().invoke(main, ["fidelity", "check", *map(str, args)])


def test_the_network_fixtures_pass_and_every_array_is_listed():
    result = fidelity(FIXTURES / "unet_reference.npz", FIXTURES / "multiencoder_reference.npz")
    assert result.exit_code == 0, result.output + result.stderr
    assert (
        "unet_reference.npz: network fixture, msx unet, features [8, 8, 16, 16, 32, 8], tolerance 0.0001"
        in result.output
    )
    assert "multiencoder_reference.npz: network fixture, msx multiencoder" in result.output
    for stage in range(5):
        assert result.output.count(f"intermediate.encoder_stage{stage}") == 2
    assert result.output.count("output.x0_logits") == 2 and result.output.count("  passed") == 2


def test_a_sampling_fixture_with_its_weights_in_json():
    variant = FIXTURES / "variant"
    result = fidelity(variant / "sampling_reference.npz", "--weights", variant / "unet_reference.npz", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "sampling" and report["passed"] and report["tolerance"] == 1e-4
    gated = {entry["array"]: entry["max_abs_error"] for entry in report["arrays"] if entry["gated"]}
    assert set(gated) == {
        "steps.timesteps", "steps.logits", "steps.x0", "strategy.last", "strategy.mean", "strategy.mean_var",
        "strategy.uncertainty", "strategy.staple_posterior",
    }
    assert max(gated.values()) <= 1e-4


def test_the_sampling_fixture_compares_its_masks_exactly():
    result = fidelity(FIXTURES / "sampling_reference.npz")
    assert result.exit_code == 0, result.output + result.stderr
    for mask in ("last", "mean", "mean_var", "uncertainty", "staple"):
        line = next(line for line in result.output.splitlines() if line.strip().startswith(f"mask.{mask} "))
        assert line.endswith("0 of 32768 differ  ok"), line
    assert "msx's reference strategies and masks on the fixture's steps.logits:" in result.output


def test_a_training_fixture_passes_and_groups_its_gradients_and_weights():
    result = fidelity(FIXTURES / "training_reference.npz")
    assert result.exit_code == 0, result.output + result.stderr
    assert "training_reference.npz: training fixture, msx unet, features [8, 8, 16, 16, 32, 8]" in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    for label in ("grad.encoder.* (40 arrays)", "grad.denoiser.* (232 arrays)", "final.encoder.* (40 arrays)",
                  "final.denoiser.* (328 arrays)", "losses", "step3.x_t", "schedule.lr_per_epoch_500"):
        line = next(line for line in lines if line.startswith(label + " "))
        assert line.endswith("  ok"), line
    assert "msx's gradients at step 0:" in result.output and "after 4 sgd steps:" in result.output
    assert "max relative error" in result.output and "  passed" in result.output


def test_a_changed_expected_output_exits_1_naming_the_array(tmp_path):
    with np.load(FIXTURES / "unet_reference.npz") as archive:
        arrays = dict(archive)
    arrays["output.x0_logits"] = arrays["output.x0_logits"] + 1e-3
    np.savez(tmp_path / "changed.npz", **arrays)
    result = fidelity(tmp_path / "changed.npz")
    assert result.exit_code == 1
    assert "output.x0_logits" in result.output and "FAIL" in result.output and "FAILED" in result.output
    assert "failed: changed.npz: output.x0_logits (max |error| 0.001, tolerance 0.0001)" in result.stderr


def test_an_array_no_check_compares_is_a_one_line_error(tmp_path):
    with np.load(FIXTURES / "unet_reference.npz") as archive:
        arrays = dict(archive)
    np.savez(tmp_path / "extra.npz", **arrays, **{"output.other": np.zeros(2)})
    result = fidelity(tmp_path / "extra.npz")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "extra.npz: array output.other is not one a network fixture's check compares or reads" in result.stderr


def test_a_file_that_is_no_fixture_is_a_one_line_error(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    result = fidelity(tmp_path / "other.npz")
    assert result.exit_code == 1
    assert "other.npz: neither a network fixture" in result.stderr and "Traceback" not in result.stderr
