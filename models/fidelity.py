"""Reference fidelity: msx's networks, reference protocol and training step against numbers the reference code
computed.

A fixture is an ``.npz`` file of arrays computed with the public MSSegDiff code on a small network
(tests/fixtures/fidelity/README.md describes every array). Three kinds:

- a network fixture (``encoder.*`` and ``denoiser.*`` weights, ``input.*``, ``intermediate.encoder_stage*``,
  ``output.x0_logits``): msx builds its own network from the arrays (the six feature sizes from
  ``meta.features``; the multiencoder when the encoder takes one channel), loads the weights under msx's names
  (``msx_state_dict``) and runs its forward on the inputs;
- a sampling fixture (``input.image``, ``input.noise``, ``steps.*``, ``strategy.*``, ``mask.*``): msx samples
  with the reference protocol from the fixture's starting noise, with the weights of a network fixture, as a
  study samples (the chains in one batch); its trajectories are compared with ``steps.*``, and msx's reference
  strategies and the reference protocol's mask rule, run on the fixture's own trajectories, with ``strategy.*``
  and ``mask.*``;
- a training fixture (``initial.*`` weights, ``step{k}.*`` inputs, ``losses``, ``grad.*``, ``final.*``,
  ``schedule.*``): from the initial weights, msx's own q_sample, x0 loss and backward replay the fixture's steps
  with the optimizer it names (``meta.optimizer``); each step's x_t, every loss term, every step-0 gradient and
  every final weight and buffer are compared, and ``schedule.lr_per_epoch_<N>`` with msx's
  `lr_schedule.reference_lr_per_epoch`.

Each compared array has its measure and tolerance: the largest absolute error within ``TOLERANCE`` (1e-4), a
mask's differing voxels exactly 0, a learning-rate schedule's largest relative error within
``SCHEDULE_TOLERANCE`` (1e-9). An array a check does not compare is an error (`FixtureError`) naming it, never
skipped. The strategies and masks are also computed end to end, from msx's own trajectories, and shown without
being held to the tolerance: float32 differences between machines (1.7e-5 in one forward of the same code) grow
over ten steps and the uncertainty fusion sums forty weighted terms of up to 2, so that the reference code
itself, run on another machine than the one that made the fixture, missed ``strategy.uncertainty`` by 1.9e-4
(docs/FIDELITY.md).
"""

from __future__ import annotations

import contextlib
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .diffusion import (
    LOSS_TERMS,
    DiffusionConfig,
    add_noise,
    ddim_timesteps,
    ddim_trajectory,
    diffusion_loss_terms,
    weighted_loss,
)
from .lr_schedule import reference_lr_per_epoch
from .networks import DiffusionSegmentationNet, NetworkConfig, build_network
from .protocols import REFERENCE

TOLERANCE = 1e-4  # largest absolute error of a float array
SCHEDULE_TOLERANCE = 1e-9  # largest relative error of a learning-rate schedule
ABSOLUTE, RELATIVE, EXACT = "max |error|", "max relative error", "differing"
ENCODER_STAGES = 5
# The reference's base learning rate (AdamW, lr 1e-4): what its schedule.* arrays scale.
REFERENCE_LR = 1e-4
# The reference strategies a sampling fixture holds: array name -> msx strategy name.
SAMPLING_STRATEGIES = {
    "strategy.last": "last",
    "strategy.mean": "mean",
    "strategy.mean_var": "mean-var",
    "strategy.uncertainty": "uncertainty",
    "strategy.staple_posterior": "staple",
}
# The reference's masks (sigmoid(map) > 0.5 on the float32 map): array name -> msx strategy name.
SAMPLING_MASKS = {
    "mask.last": "last",
    "mask.mean": "mean",
    "mask.mean_var": "mean-var",
    "mask.uncertainty": "uncertainty",
    "mask.staple": "staple",
}
NETWORK_INPUTS = ("input.image", "input.x_t", "input.t", "meta.features", "output.x0_logits")
SAMPLING_INPUTS = ("input.image", "input.noise", "steps.timesteps", "steps.logits", "steps.x0", *SAMPLING_STRATEGIES)
TRAINING_INPUTS = ("meta.features", "meta.lr", "meta.optimizer", "losses")
STEP_ARRAYS = ("image", "mask", "t", "noise", "x_t")
# Every array name a fixture of each kind may hold: any other is an error, never skipped.
KNOWN_ARRAYS = {
    "network": (
        r"meta\.features", r"input\.(image|x_t|t)", r"(encoder|denoiser)\..+",
        rf"intermediate\.encoder_stage[0-{ENCODER_STAGES - 1}]", r"output\.x0_logits",
    ),
    "sampling": (
        r"input\.(image|noise)", r"steps\.(timesteps|logits|x0)",
        *(re.escape(name) for name in (*SAMPLING_STRATEGIES, *SAMPLING_MASKS)),
    ),
    "training": (
        r"meta\.(features|lr|optimizer|multiencoder)", r"losses", rf"step[0-9]+\.({'|'.join(STEP_ARRAYS)})",
        r"(initial|grad|final)\.(encoder|denoiser)\..+", r"schedule\.lr_per_epoch_[1-9][0-9]*",
    ),
}


class FixtureError(ValueError):
    """A file that is not a fidelity fixture, or one that lacks an array; the message names the file."""


@dataclass(frozen=True)
class Comparison:
    """One compared array: msx's result against the fixture's.

    `max_abs_error`: the largest absolute difference. `measure` and `error`: what the check holds to `tolerance`:
    ABSOLUTE (the largest absolute difference, within TOLERANCE), EXACT (how many elements differ, none may) or
    RELATIVE (the largest relative difference, within SCHEDULE_TOLERANCE). `gated`: whether the fixture's check
    requires it (end-to-end strategies and masks are shown only). `group`: rows of one group (``grad.denoiser.*``)
    are printed as one line.
    """

    array: str
    shape: tuple[int, ...]
    max_abs_error: float
    computed_from: str
    gated: bool = True
    measure: str = ABSOLUTE
    error: float | None = None  # None: max_abs_error
    tolerance: float = TOLERANCE
    group: str | None = None

    def __post_init__(self) -> None:
        if self.error is None:
            object.__setattr__(self, "error", self.max_abs_error)

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def describe(self) -> str:
        """The measured value in words: 'max |error| 1.7e-05', '0 of 32768 differ', 'max relative error 2e-16'."""
        if self.measure == EXACT:
            return f"{int(self.error)} of {int(np.prod(self.shape))} differ"
        return f"{self.measure} {self.error:.3g}"


@dataclass(frozen=True)
class FidelityReport:
    fixture: str
    kind: str  # "network", "sampling" or "training"
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
                    "array": c.array, "shape": list(c.shape), "max_abs_error": c.max_abs_error, "measure": c.measure,
                    "error": c.error, "tolerance": c.tolerance, "passed": c.passed, "gated": c.gated,
                    "computed_from": c.computed_from, "group": c.group,
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
    """"network", "sampling" or "training", once the kind's required arrays are there and it holds no array the
    kind's check would not compare (a FixtureError names the first)."""
    if "losses" in arrays or any(name.startswith("initial.") for name in arrays):
        kind, required = "training", TRAINING_INPUTS
    elif "steps.logits" in arrays:
        kind, required = "sampling", SAMPLING_INPUTS
    elif any(name.startswith("denoiser.") for name in arrays):
        kind, required = "network", NETWORK_INPUTS
    else:
        raise FixtureError(
            f"{source}: neither a network fixture (denoiser.* weights), a sampling fixture (steps.logits) nor a "
            "training fixture (losses, initial.* weights)"
        )
    _require(arrays, required, source)
    known = re.compile("|".join(f"(?:{pattern})" for pattern in KNOWN_ARRAYS[kind]))
    unknown = sorted(name for name in arrays if not known.fullmatch(name))
    if unknown:
        raise FixtureError(
            f"{source}: array {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f" is not one a {kind} fixture's check compares or reads"
        )
    return kind


def _require(arrays: Mapping[str, np.ndarray], names: tuple[str, ...], source: str) -> None:
    missing = [name for name in names if name not in arrays]
    if missing:
        raise FixtureError(
            f"{source}: missing array {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


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


def msx_name(name: str, multiencoder: bool) -> str | None:
    """msx's parameter name for a reference one (``encoder.<name>`` or ``denoiser.<name>``); None for any other."""
    part, _, inner = name.partition(".")
    if part == "encoder":
        return "encoder." + ("shared." if multiencoder else "") + _rename(inner, ENCODER_RENAMES)
    if part == "denoiser":
        return "denoiser." + _rename(inner, DENOISER_RENAMES)
    return None


def msx_state_dict(arrays: Mapping[str, np.ndarray], multiencoder: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """The fixture's ``<prefix>encoder.*`` and ``<prefix>denoiser.*`` weights under msx's parameter names
    (DENOISER_RENAMES, ENCODER_RENAMES; the multiencoder's shared encoder sits under encoder.shared)."""
    state = {}
    for name in arrays:
        if not name.startswith(prefix):
            continue
        renamed = msx_name(name[len(prefix):], multiencoder)
        if renamed is not None:
            state[renamed] = torch.from_numpy(np.array(arrays[name]))
    return state


def _rename(name: str, rules: tuple[tuple[str, object], ...]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def network_from_arrays(arrays: Mapping[str, np.ndarray], source: str, prefix: str = "") -> DiffusionSegmentationNet:
    """msx's network for a network fixture (or a training fixture's ``initial.`` weights: ``prefix``), its weights
    loaded, in eval mode."""
    encoder_conv, denoiser_conv = (f"{prefix}{part}.conv_0.conv_0.conv.weight" for part in ("encoder", "denoiser"))
    _require(arrays, ("meta.features", encoder_conv, denoiser_conv), source)
    features = tuple(int(f) for f in arrays["meta.features"])
    encoder_channels = arrays[encoder_conv].shape[1]
    image_channels = arrays[denoiser_conv].shape[1] - 1
    multiencoder = encoder_channels == 1 and image_channels > 1
    backbone = "multiencoder" if multiencoder else "unet"
    try:
        net = build_network(NetworkConfig(backbone=backbone, image_channels=image_channels, features=features))
        net.load_state_dict(msx_state_dict(arrays, multiencoder, prefix))
    except (ValueError, RuntimeError) as error:
        raise FixtureError(
            f"{source}: its weights do not fit msx's {backbone} with features {features}: {error}"
        ) from None
    return net.eval()


def check_network(arrays: Mapping[str, np.ndarray], source: str) -> FidelityReport:
    net = network_from_arrays(arrays, source)
    image, noisy, timesteps = (
        torch.from_numpy(np.array(arrays[name])) for name in ("input.image", "input.x_t", "input.t")
    )
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
    """DDIM under the reference protocol from the fixture's starting noise, then every reference strategy and the
    reference protocol's mask of each (exactly: no voxel may differ)."""
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
        Comparison(
            "steps.timesteps", tuple(expected_steps.shape), float(np.abs(timesteps - expected_steps).max()), sampled
        ),
        _compare("steps.logits", step_logits.transpose(0, 1), arrays, sampled),
        _compare("steps.x0", REFERENCE.x0(step_logits).transpose(0, 1), arrays, sampled),
    ]
    fixture_logits = torch.from_numpy(np.array(arrays["steps.logits"])).transpose(0, 1)
    for logits, computed_from, gated in (
        (fixture_logits, "msx's reference strategies and masks on the fixture's steps.logits", True),
        (step_logits, "end to end: msx's reference strategies and masks on msx's trajectories", False),
    ):
        scores = REFERENCE.scores(logits, SAMPLING_STRATEGIES.values())
        comparisons += [
            _compare(array, scores[strategy], arrays, computed_from, gated)
            for array, strategy in SAMPLING_STRATEGIES.items()
        ]
        # The reference stitches its fused maps into MONAI's float32 output and thresholds that.
        comparisons += [
            _compare_exactly(array, REFERENCE.mask(scores[strategy].float()), arrays, computed_from, gated)
            for array, strategy in SAMPLING_MASKS.items()
            if array in arrays
        ]
    return FidelityReport(source, "sampling", net.config.backbone, net.config.features, tuple(comparisons))


def check_training(arrays: Mapping[str, np.ndarray], source: str) -> FidelityReport:
    """The fixture's training steps replayed with msx's q_sample, x0 loss and backward, from its initial weights,
    in train mode, with the optimizer it names; and its learning-rate schedules with msx's reference schedule."""
    net = network_from_arrays(arrays, source, prefix="initial.")
    multiencoder = net.config.backbone == "multiencoder"
    if "meta.multiencoder" in arrays and bool(arrays["meta.multiencoder"]) != multiencoder:
        raise FixtureError(
            f"{source}: meta.multiencoder is {int(arrays['meta.multiencoder'])}, but its initial weights build msx's "
            f"{net.config.backbone}"
        )
    losses = np.asarray(arrays["losses"])
    if losses.ndim != 2 or losses.shape[1] != len(LOSS_TERMS) + 1:
        raise FixtureError(f"{source}: losses must be (steps, 4): dice, bce, mse, total; got {losses.shape}")
    steps = losses.shape[0]
    _require(arrays, tuple(f"step{k}.{part}" for k in range(steps) for part in STEP_ARRAYS), source)
    extra = sorted({name.partition(".")[0] for name in arrays if re.fullmatch(r"step[0-9]+\..*", name)}
                   - {f"step{k}" for k in range(steps)})
    if extra:
        raise FixtureError(f"{source}: arrays {extra[0]}.* belong to no row of losses ({steps} steps)")
    parameters = dict(net.named_parameters())
    state = net.state_dict()
    expected_names = {
        "grad": {
            msx: f"grad.{name}" for msx, name in _reference_names(arrays, "initial.", multiencoder) if msx in parameters
        },
        "final": {msx: f"final.{name}" for msx, name in _reference_names(arrays, "initial.", multiencoder)},
    }
    for kind, names in expected_names.items():
        _require(arrays, tuple(names.values()), source)
        for msx, array in _reference_names(arrays, f"{kind}.", multiencoder):
            if msx not in names:
                raise FixtureError(f"{source}: {kind}.{array}: msx's {net.config.backbone} has no such "
                                   + ("parameter" if kind == "grad" else "weight or buffer"))
    optimizer = _training_optimizer(arrays, net, source)

    diffusion = DiffusionConfig()
    replayed = "msx's q_sample, x0 loss and backward on step*.*"
    comparisons, computed_losses, gradients = [], [], {}
    net.train()
    for k in range(steps):
        image, mask, t, noise = (torch.from_numpy(np.array(arrays[f"step{k}.{part}"])) for part in STEP_ARRAYS[:4])
        t = t.long()
        comparisons.append(
            _compare(f"step{k}.x_t", add_noise(2.0 * mask.float() - 1.0, noise, t, diffusion), arrays, replayed)
        )
        terms = diffusion_loss_terms(net, image, mask, diffusion, timesteps=t, noise=noise)
        loss = weighted_loss(terms)
        computed_losses.append([*(terms[name].item() for name in LOSS_TERMS), loss.item()])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if k == 0:
            gradients = {
                name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                for name, p in net.named_parameters()
            }
        optimizer.step()
    comparisons.insert(0, _compare("losses", torch.tensor(computed_losses, dtype=torch.float64), arrays, replayed))
    for kind, values, computed_from in (
        ("grad", gradients, "msx's gradients at step 0"),
        ("final", net.state_dict(), f"msx's weights and buffers after {steps} {_optimizer_name(arrays)} steps"),
    ):
        for msx, array in expected_names[kind].items():
            group = f"{kind}.{array.split('.')[1]}.*"
            comparisons.append(_compare(array, values[msx], arrays, computed_from, group=group))
    assert set(expected_names["final"]) == set(state)  # load_state_dict(strict) already proved it
    for array in sorted((name for name in arrays if name.startswith("schedule.")), key=_epochs_of):
        epochs = _epochs_of(array)
        rates = torch.tensor(reference_lr_per_epoch(epochs, REFERENCE_LR), dtype=torch.float64)
        comparisons.append(_compare_relative(
            array, rates, arrays, f"msx's reference_lr_per_epoch({epochs}, base lr {REFERENCE_LR:g}, warm-up "
                                  f"{epochs / 10:g})"
        ))
    return FidelityReport(source, "training", net.config.backbone, net.config.features, tuple(comparisons))


def _reference_names(arrays: Mapping[str, np.ndarray], prefix: str, multiencoder: bool) -> list[tuple[str, str]]:
    """(msx's name, the reference's name without ``prefix``) of every ``<prefix>encoder.*``/``denoiser.*`` array."""
    pairs = []
    for name in arrays:
        if name.startswith(prefix):
            renamed = msx_name(name[len(prefix):], multiencoder)
            if renamed is not None:
                pairs.append((renamed, name[len(prefix):]))
    return pairs


def _optimizer_name(arrays: Mapping[str, np.ndarray]) -> str:
    return str(np.asarray(arrays["meta.optimizer"]).item())


def _training_optimizer(arrays: Mapping[str, np.ndarray], net: torch.nn.Module, source: str) -> torch.optim.Optimizer:
    """The optimizer a training fixture names: plain SGD (no momentum, no weight decay) at ``meta.lr``."""
    name = _optimizer_name(arrays)
    if name != "sgd":
        raise FixtureError(f"{source}: meta.optimizer {name!r}: the check replays plain sgd only")
    return torch.optim.SGD(net.parameters(), lr=float(arrays["meta.lr"]), momentum=0.0, weight_decay=0.0)


def _epochs_of(array: str) -> int:
    return int(array.rsplit("_", 1)[1])


def _compare(
    array: str,
    computed: torch.Tensor,
    arrays: Mapping[str, np.ndarray],
    computed_from: str,
    gated: bool = True,
    group: str | None = None,
) -> Comparison:
    """Largest absolute difference; NaN where both are NaN counts as agreement, anywhere else as infinite."""
    expected = np.asarray(arrays[array], dtype=np.float64)
    actual = computed.detach().cpu().double().numpy()
    if actual.shape != expected.shape:
        return Comparison(array, tuple(expected.shape), float("inf"), computed_from, gated, group=group)
    both_nan = np.isnan(expected) & np.isnan(actual)
    difference = np.where(both_nan, 0.0, np.abs(actual - expected))
    error = float(np.nan_to_num(difference, nan=np.inf).max()) if difference.size else 0.0
    return Comparison(array, tuple(expected.shape), error, computed_from, gated, group=group)


def _compare_exactly(
    array: str, computed: torch.Tensor, arrays: Mapping[str, np.ndarray], computed_from: str, gated: bool = True
) -> Comparison:
    """A mask: how many elements differ (none may). A shape that differs counts every element."""
    expected = np.asarray(arrays[array]) != 0
    actual = computed.detach().cpu().numpy() != 0
    if actual.shape != expected.shape:
        return Comparison(array, tuple(expected.shape), 1.0, computed_from, gated, EXACT, float(expected.size), 0.0)
    differing = int(np.count_nonzero(actual != expected))
    return Comparison(
        array, tuple(expected.shape), float(differing > 0), computed_from, gated, EXACT, float(differing), 0.0
    )


def _compare_relative(
    array: str, computed: torch.Tensor, arrays: Mapping[str, np.ndarray], computed_from: str
) -> Comparison:
    """Largest relative difference |computed - expected| / |expected| (0 where both are 0, infinite where only the
    expected value is), held to SCHEDULE_TOLERANCE."""
    expected = np.asarray(arrays[array], dtype=np.float64)
    actual = computed.detach().cpu().double().numpy()
    if actual.shape != expected.shape:
        return Comparison(
            array, tuple(expected.shape), float("inf"), computed_from, True, RELATIVE, float("inf"), SCHEDULE_TOLERANCE
        )
    difference = np.abs(actual - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(difference == 0, 0.0, difference / np.abs(expected))
    relative = np.nan_to_num(relative, nan=np.inf)
    largest = float(relative.max()) if relative.size else 0.0
    return Comparison(
        array, tuple(expected.shape), float(difference.max()) if difference.size else 0.0, computed_from, True,
        RELATIVE, largest, SCHEDULE_TOLERANCE,
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch's CPU work on one thread, as the fixtures' achievable tolerances were measured, restored after.

    One thread also fixes the order of every float32 reduction, and on a busy machine it is the fastest: a
    training fixture's replay takes about 3 s on one thread and above a minute on two threads of two busy cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_fixture(path: str | Path, weights: str | Path | None = None) -> FidelityReport:
    """Check one fixture, on one CPU thread (`one_thread`). A sampling fixture takes its network's weights from
    `weights` (a network fixture), by default unet_reference.npz in its own folder."""
    with one_thread():
        return _check_fixture(path, weights)


def _check_fixture(path: str | Path, weights: str | Path | None) -> FidelityReport:
    source = str(path)
    arrays = load_arrays(path)
    kind = fixture_kind(arrays, source)
    if kind == "network":
        return check_network(arrays, source)
    if kind == "training":
        return check_training(arrays, source)
    network_path = Path(weights) if weights is not None else Path(path).with_name("unet_reference.npz")
    if not network_path.is_file():
        raise FixtureError(
            f"{source}: a sampling fixture needs its network's weights: no {network_path} (give a network fixture)"
        )
    network_arrays = load_arrays(network_path)
    if fixture_kind(network_arrays, str(network_path)) != "network":
        raise FixtureError(f"{network_path}: not a network fixture, so it holds no weights for {source}")
    return check_sampling(arrays, network_arrays, source, str(network_path))
