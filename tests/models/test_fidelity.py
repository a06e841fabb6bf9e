"""msx against the MSSegDiff reference code's own numbers (tests/fixtures/fidelity/README.md).

Run with ``pytest -s`` to see the largest error of every compared array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msx.models.fidelity import TOLERANCE, FixtureError, check_fixture, load_arrays, msx_state_dict

FIXTURES = Path(__file__).parents[1] / "fixtures" / "fidelity"
VARIANT = FIXTURES / "variant"  # other feature sizes, seeds, a batch of 3 and 2 chains


def describe(report) -> str:
    return "\n".join(
        f"  {c.array:<28} {c.max_abs_error:.3g}{'' if c.gated else ' (end to end, shown only)'}" for c in report.comparisons
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


@pytest.mark.parametrize("name", ["unet", "multiencoder", "sampling", "variant unet", "variant sampling"])
def test_fixture_reproduces_within_the_tolerance(reports, name):
    report = reports[name]
    print(f"\n{name} ({report.fixture}):\n{describe(report)}")
    gated = [c for c in report.comparisons if c.gated]
    assert report.passed and all(c.max_abs_error <= TOLERANCE for c in gated), describe(report)


def test_each_fixture_kind_compares_what_its_readme_lists(reports):
    stages = [f"intermediate.encoder_stage{i}" for i in range(5)]
    for name in ("unet", "multiencoder"):
        assert [c.array for c in reports[name].comparisons] == [*stages, "output.x0_logits"]
    assert (reports["unet"].backbone, reports["multiencoder"].backbone) == ("unet", "multiencoder")
    assert reports["unet"].features == (8, 8, 16, 16, 32, 8) and reports["variant unet"].features == (8, 8, 8, 16, 24, 8)
    strategies = ["strategy.last", "strategy.mean", "strategy.mean_var", "strategy.uncertainty", "strategy.staple_posterior"]
    sampling = reports["sampling"].comparisons
    assert [c.array for c in sampling if c.gated] == ["steps.timesteps", "steps.logits", "steps.x0", *strategies]
    assert [c.array for c in sampling if not c.gated] == strategies
    assert [c.shape for c in sampling[:3]] == [(10,), (4, 10, 32, 32, 32), (4, 10, 32, 32, 32)]
    # The end-to-end errors are reported, and small where nothing sums many terms.
    end_to_end = {c.array: c.max_abs_error for c in sampling if not c.gated}
    assert end_to_end["strategy.mean"] < TOLERANCE and end_to_end["strategy.staple_posterior"] < TOLERANCE


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
    with pytest.raises(FixtureError, match=r"wrong\.npz: its weights do not fit msx's unet with features \(8, 8, 16, 16, 64, 8\)"):
        check_fixture(tmp_path / "wrong.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(FixtureError, match=r"other\.npz: neither a network fixture"):
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
    for fixture, prefix in (("unet_reference.npz", "encoder.stages."), ("multiencoder_reference.npz", "encoder.shared.stages.")):
        arrays = load_arrays(FIXTURES / fixture)
        state = msx_state_dict(arrays, multiencoder=prefix != "encoder.stages.")
        weights = [name for name in arrays if name.startswith(("encoder.", "denoiser."))]
        assert len(state) == len(weights)
        assert all(name.startswith((prefix, "denoiser.")) for name in state)
        assert "denoiser.down_attention.0.features.1.adn.N.running_var" in state  # dsa1.conv.conv.4
        assert "denoiser.up_attention.3.attention.0.conv.weight" in state  # usa1.conv_atten.conv.0
        assert "denoiser.time_embedding.mlp.2.weight" in state  # temb.dense.1
        assert "denoiser.upcat_1.convs.time_projection.bias" in state  # upcat_1.convs.temb_proj
