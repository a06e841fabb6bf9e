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
    assert "unet_reference.npz: network fixture, msx unet, features [8, 8, 16, 16, 32, 8], tolerance 0.0001" in result.output
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


def test_a_changed_expected_output_exits_1_naming_the_array(tmp_path):
    with np.load(FIXTURES / "unet_reference.npz") as archive:
        arrays = dict(archive)
    arrays["output.x0_logits"] = arrays["output.x0_logits"] + 1e-3
    np.savez(tmp_path / "changed.npz", **arrays)
    result = fidelity(tmp_path / "changed.npz")
    assert result.exit_code == 1
    assert "output.x0_logits" in result.output and "FAIL" in result.output and "FAILED" in result.output
    assert "not within 0.0001: changed.npz: output.x0_logits" in result.stderr


def test_a_file_that_is_no_fixture_is_a_one_line_error(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    result = fidelity(tmp_path / "other.npz")
    assert result.exit_code == 1
    assert "other.npz: neither a network fixture" in result.stderr and "Traceback" not in result.stderr
