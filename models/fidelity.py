"""Reference fidelity: msx's networks and reference protocol against numbers the reference code computed.

A fixture is an ``.npz`` file of float32 arrays computed with the public MSSegDiff code on a small network
(tests/fixtures/fidelity/README.md describes every array). Two kinds:

- a network fixture (``encoder.*`` and ``denoiser.*`` weights, ``input.*``, ``intermediate.encoder_stage*``,
  ``output.x0_logits``): msx builds its own network from the arrays (the six feature sizes from
  ``meta.features``; the multiencoder when the encoder takes one channel), loads the weights under msx's names
  (``msx_state_dict``) and runs its forward on the inputs;
- a sampling fixture (``input.image``, ``input.noise``, ``steps.*``, ``strategy.*``): msx samples with the
  reference protocol from the fixture's starting noise, with the weights of a network fixture, as a study
  samples (the chains in one batch); its trajectories are compared with ``steps.*``, and msx's reference
  strategies, run on the fixture's own trajectories, with ``strategy.*``.

Every compared array's largest absolute error must be within ``TOLERANCE``. The strategies are also computed
end to end, from msx's own trajectories, and shown without being held to it: float32 differences between
machines (1.7e-5 in one forward of the same code) grow over ten steps and the uncertainty fusion sums forty
weighted terms of up to 2, so that the reference code itself, run on another machine than the one that made
the fixture, missed ``strategy.uncertainty`` by 1.9e-4 (docs/FIDELITY.md).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .diffusion import DiffusionConfig, ddim_timesteps, ddim_trajectory
from .networks import DiffusionSegmentationNet, NetworkConfig, build_network
from .protocols import REFERENCE

TOLERANCE = 1e-4
ENCODER_STAGES = 5
# The reference strategies a sampling fixture holds: array name -> msx strategy name.
SAMPLING_STRATEGIES = {
    "strategy.last": "last",
    "strategy.mean": "mean",
    "strategy.mean_var": "mean-var",
    "strategy.uncertainty": "uncertainty",
    "strategy.staple_posterior": "staple",
}
NETWORK_INPUTS = ("input.image", "input.x_t", "input.t", "meta.features", "output.x0_logits")
SAMPLING_INPUTS = ("input.image", "input.noise", "steps.timesteps", "steps.logits", "steps.x0", *SAMPLING_STRATEGIES)


class FixtureError(ValueError):
    """A file that is not a fidelity fixture, or one that lacks an array; the message names the file."""


@dataclass(frozen=True)
class Comparison:
    """One compared array: msx's result against the fixture's, largest absolute difference.

    `gated`: whether the fixture's check requires it within TOLERANCE (end-to-end strategies are shown only).
    """

    array: str
    shape: tuple[int, ...]
    max_abs_error: float
    computed_from: str
    gated: bool = True

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= TOLERANCE


@dataclass(frozen=True)
class FidelityReport:
    fixture: str
    kind: str  # "network" or "sampling"
    backbone: str
    features: tuple[int, ...]
    comparisons: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(comparison.passed for comparison in self.comparisons if comparison.gated)

    def to_dict(self) -> dict:
        return {
            "fixture": self.fixture, "kind": self.kind, "backbone": self.backbone, "features": list(self.features),
            "tolerance": TOLERANCE, "passed": self.passed,
            "arrays": [
                {
                    "array": c.array, "shape": list(c.shape), "max_abs_error": c.max_abs_error, "passed": c.passed,
                    "gated": c.gated, "computed_from": c.computed_from,
                }
                for c in self.comparisons
            ],
        }


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an .npz fixture, by name; never unpickles (object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise FixtureError(f"{path}: not a readable .npz fixture ({error})") from None


def fixture_kind(arrays: Mapping[str, np.ndarray], source: str) -> str:
    if "steps.logits" in arrays:
        _require(arrays, SAMPLING_INPUTS, source)
        return "sampling"
    if any(name.startswith("denoiser.") for name in arrays):
        _require(arrays, NETWORK_INPUTS, source)
        return "network"
    raise FixtureError(f"{source}: neither a network fixture (denoiser.* weights) nor a sampling fixture (steps.logits)")


def _require(arrays: Mapping[str, np.ndarray], names: tuple[str, ...], source: str) -> None:
    missing = [name for name in names if name not in arrays]
    if missing:
        raise FixtureError(f"{source}: missing array {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# The reference's state-dict names -> msx's, applied in order to the names under "denoiser." (the encoder's are
# MONAI BasicUNet's: its conv_0 and down_k become stages k of msx's down-path encoder).
_SQUEEZE_LAYERS = {"0": "0.conv", "1": "0.adn.N", "3": "1.conv", "4": "1.adn.N"}
DENOISER_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^temb\.dense\.0\.", "time_embedding.mlp.0."),  # sinusoid -> 512
    (r"^temb\.dense\.1\.", "time_embedding.mlp.2."),  # 512 -> 512 (msx's mlp.1 and mlp.3 are SiLUs)
    (r"\.temb_proj\.", ".time_projection."),  # per two-convolution block
    (r"^dsa([1-4])\.", lambda m: f"down_attention.{int(m[1]) - 1}."),  # after down_1 .. down_4
    (r"^usa([1-4])\.", lambda m: f"up_attention.{4 - int(m[1])}."),  # after upcat_4 .. upcat_1
    (r"\.conv\.conv\.([0134])\.", lambda m: f".features.{_SQUEEZE_LAYERS[m[1]]}."),  # [conv, BN, ReLU] x 2 on x
    (r"\.conv_atten\.conv\.([0134])\.", lambda m: f".attention.{_SQUEEZE_LAYERS[m[1]]}."),  # the same on pooled x
)
ENCODER_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^conv_0\.", "stages.0.0."),
    (r"^down_([1-4])\.", r"stages.\1.0."),
)


def msx_state_dict(arrays: Mapping[str, np.ndarray], multiencoder: bool) -> dict[str, torch.Tensor]:
    """The fixture's encoder.* and denoiser.* weights under msx's parameter names (DENOISER_RENAMES,
    ENCODER_RENAMES; the multiencoder's shared encoder sits under encoder.shared)."""
    state = {}
    for name, array in arrays.items():
        part, _, inner = name.partition(".")
        if part == "encoder":
            renamed = _rename(inner, ENCODER_RENAMES)
            state["encoder." + ("shared." if multiencoder else "") + renamed] = torch.from_numpy(np.array(array))
        elif part == "denoiser":
            state["denoiser." + _rename(inner, DENOISER_RENAMES)] = torch.from_numpy(np.array(array))
    return state


def _rename(name: str, rules: tuple[tuple[str, object], ...]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def network_from_arrays(arrays: Mapping[str, np.ndarray], source: str) -> DiffusionSegmentationNet:
    """msx's network for a network fixture, its weights loaded, in eval mode."""
    _require(arrays, ("meta.features", "encoder.conv_0.conv_0.conv.weight", "denoiser.conv_0.conv_0.conv.weight"), source)
    features = tuple(int(f) for f in arrays["meta.features"])
    encoder_channels = arrays["encoder.conv_0.conv_0.conv.weight"].shape[1]
    image_channels = arrays["denoiser.conv_0.conv_0.conv.weight"].shape[1] - 1
    multiencoder = encoder_channels == 1 and image_channels > 1
    backbone = "multiencoder" if multiencoder else "unet"
    try:
        net = build_network(NetworkConfig(backbone=backbone, image_channels=image_channels, features=features))
        net.load_state_dict(msx_state_dict(arrays, multiencoder))
    except (ValueError, RuntimeError) as error:
        raise FixtureError(f"{source}: its weights do not fit msx's {backbone} with features {features}: {error}") from None
    return net.eval()


def check_network(arrays: Mapping[str, np.ndarray], source: str) -> FidelityReport:
    net = network_from_arrays(arrays, source)
    image, noisy, timesteps = (torch.from_numpy(np.array(arrays[name])) for name in ("input.image", "input.x_t", "input.t"))
    with torch.inference_mode():
        stages = net.encode(image)
        logits = net(image, noisy, timesteps.long())
    comparisons = [
        _compare(f"intermediate.encoder_stage{index}", stage, arrays, "msx's encoder on input.image")
        for index, stage in enumerate(stages[:ENCODER_STAGES])
        if f"intermediate.encoder_stage{index}" in arrays
    ]
    comparisons.append(_compare("output.x0_logits", logits, arrays, "msx's network on input.*"))
    return FidelityReport(source, "network", net.config.backbone, net.config.features, tuple(comparisons))


def check_sampling(
    arrays: Mapping[str, np.ndarray], network_arrays: Mapping[str, np.ndarray], source: str, network_source: str
) -> FidelityReport:
    """DDIM under the reference protocol from the fixture's starting noise, then every reference strategy."""
    net = network_from_arrays(network_arrays, network_source)
    image = torch.from_numpy(np.array(arrays["input.image"]))
    noise = torch.from_numpy(np.array(arrays["input.noise"]))
    expected_steps = arrays["steps.timesteps"]
    chains = noise.shape[0]
    if image.ndim != 5 or image.shape[0] != 1:
        raise FixtureError(f"{source}: input.image must be one image (1, C, X, Y, Z), got {tuple(image.shape)}")
    timesteps = np.array(ddim_timesteps(len(expected_steps), DiffusionConfig()))
    trajectory = ddim_trajectory(net, image, len(expected_steps), chains, x0=REFERENCE.x0, noise=noise)
    step_logits = trajectory[0]  # (steps, chains, X, Y, Z)
    sampled = "msx's reference-protocol DDIM from input.noise"
    comparisons = [
        Comparison("steps.timesteps", tuple(expected_steps.shape), float(np.abs(timesteps - expected_steps).max()), sampled),
        _compare("steps.logits", step_logits.transpose(0, 1), arrays, sampled),
        _compare("steps.x0", REFERENCE.x0(step_logits).transpose(0, 1), arrays, sampled),
    ]
    fixture_logits = torch.from_numpy(np.array(arrays["steps.logits"])).transpose(0, 1)
    for logits, computed_from, gated in (
        (fixture_logits, "msx's reference strategies on the fixture's steps.logits", True),
        (step_logits, "end to end: msx's reference strategies on msx's trajectories", False),
    ):
        scores = REFERENCE.scores(logits, SAMPLING_STRATEGIES.values())
        comparisons += [
            _compare(array, scores[strategy], arrays, computed_from, gated)
            for array, strategy in SAMPLING_STRATEGIES.items()
        ]
    return FidelityReport(source, "sampling", net.config.backbone, net.config.features, tuple(comparisons))


def _compare(
    array: str, computed: torch.Tensor, arrays: Mapping[str, np.ndarray], computed_from: str, gated: bool = True
) -> Comparison:
    """Largest absolute difference; NaN where both are NaN counts as agreement, anywhere else as infinite."""
    expected = np.asarray(arrays[array], dtype=np.float64)
    actual = computed.detach().cpu().double().numpy()
    if actual.shape != expected.shape:
        return Comparison(array, tuple(expected.shape), float("inf"), computed_from, gated)
    both_nan = np.isnan(expected) & np.isnan(actual)
    difference = np.where(both_nan, 0.0, np.abs(actual - expected))
    error = float(np.nan_to_num(difference, nan=np.inf).max()) if difference.size else 0.0
    return Comparison(array, tuple(expected.shape), error, computed_from, gated)


def check_fixture(path: str | Path, weights: str | Path | None = None) -> FidelityReport:
    """Check one fixture. A sampling fixture takes its network's weights from `weights` (a network fixture),
    by default unet_reference.npz in its own folder."""
    source = str(path)
    arrays = load_arrays(path)
    if fixture_kind(arrays, source) == "network":
        return check_network(arrays, source)
    network_path = Path(weights) if weights is not None else Path(path).with_name("unet_reference.npz")
    if not network_path.is_file():
        raise FixtureError(
            f"{source}: a sampling fixture needs its network's weights: no {network_path} (give a network fixture)"
        )
    network_arrays = load_arrays(network_path)
    if fixture_kind(network_arrays, str(network_path)) != "network":
        raise FixtureError(f"{network_path}: not a network fixture, so it holds no weights for {source}")
    return check_sampling(arrays, network_arrays, source, str(network_path))
