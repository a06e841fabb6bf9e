"""Inference protocols: how sampled trajectories become masks, as the reference code does it or as msx does.

A protocol decides, for the same network and the same strategy names:

- ``x0``: the clean-mask estimate taken from the network's logits, in the DDIM update and in the strategies;
- which sampled chains each strategy reads;
- its own version of a strategy where it differs (the reference's STAPLE);
- its mask rule: how a fused map becomes a lesion mask (the reference: float32 sigmoid(map) > 0.5; msx: map > 0);
- where fusion happens: in each sliding window, the fused maps then stitched (the reference), or on the
  stitched trajectories of the whole scan (msx);
- its default settings: validation DDIM steps, strategy and sliding-window overlap, and test overlap.

``reference`` reproduces the public MSSegDiff code (proven on its own numbers: ``fidelity.py``); ``msx`` is
msx's corrected protocol. docs/FIDELITY.md lists every difference and why msx corrects it. A study runs one
protocol and may score its final evaluation under others from the same weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .diffusion import X0Map, x0_from_logits
from .registry import Registry
from .strategies import STRATEGIES, Strategy, staple

MaskRule = Callable[[torch.Tensor], torch.Tensor]
"""A fused map (any shape) -> the boolean lesion mask of the same shape."""


def positive_mask(score: torch.Tensor) -> torch.Tensor:
    """msx's mask rule: lesion where the signed score is above 0 (NaN: background)."""
    return score > 0


def reference_mask(score: torch.Tensor) -> torch.Tensor:
    """The reference's mask rule: ``torch.sigmoid(map) > 0.5`` on the float32 map that MONAI's sliding window
    returns. Not the same as ``map > 0``: float32 sigmoid rounds to exactly 0.5 for maps below about 1e-7, so
    voxels that no step voted for (a STAPLE posterior of about 5e-13) are background. NaN is background."""
    return torch.sigmoid(score.float()) > 0.5


@dataclass(frozen=True)
class ProtocolSettings:
    """The numbers a protocol runs with unless a spec sets them."""

    validation_ddim_steps: int
    validation_strategy: str
    validation_overlap: float | None  # None: the test overlap
    overlap: float  # sliding-window overlap of the final evaluation


@dataclass(frozen=True)
class InferenceProtocol:
    name: str
    description: str
    x0: X0Map
    fuse_per_window: bool
    defaults: ProtocolSettings
    # How a fused map becomes the lesion mask.
    mask_rule: MaskRule = positive_mask
    # Strategies that read the first sampled chain only (the others read every chain).
    one_chain_strategies: frozenset[str] = frozenset()
    # This protocol's own implementation of a strategy, instead of STRATEGIES' with its x0.
    own_strategies: Mapping[str, Strategy] = field(default_factory=dict)
    # Sample as the reference code does: float32 (no bf16 autocast on a GPU) and each validation scan on its own
    # grid (not batched with the others on a padded one).
    reference_numerics: bool = False

    def strategy(self, name: str) -> Strategy:
        """The function (N, s, *spatial) step logits -> signed score this protocol computes for `name`."""
        implementation = self.own_strategies.get(name) or functools.partial(STRATEGIES.get(name), x0=self.x0)
        if name in self.one_chain_strategies:
            return functools.partial(_on_first_chain, implementation)
        return implementation

    def scores(self, step_logits: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each named strategy's fused map (lesion where `mask` says so); every name is checked before any work."""
        strategies = {name: self.strategy(name) for name in names}
        return {name: strategy(step_logits) for name, strategy in strategies.items()}

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        """The boolean lesion mask of a fused map (`scores`' values, stitched or not), by this protocol's rule."""
        return self.mask_rule(score)


def _on_first_chain(strategy: Strategy, step_logits: torch.Tensor) -> torch.Tensor:
    return strategy(step_logits[:, :1])


def clamped_x0(logits: torch.Tensor) -> torch.Tensor:
    """The reference's x0: the logits clamped to [-1, 1] (guided-diffusion's clip_denoised)."""
    return logits.clamp(-1.0, 1.0)


def reference_staple(step_logits: torch.Tensor) -> torch.Tensor:
    """The reference's STAPLE over the steps (samples averaged: it is given one chain), posterior as the score.

    The reference casts each step's x0 to int16 before SimpleITK's STAPLE (foreground value 1), so a voxel
    votes lesion only where x0 is exactly 1 (logits >= 1), and calls lesion where the float32 sigmoid of the
    stitched posterior exceeds 0.5 (`reference_mask`): a posterior above about 1e-7, so a voxel that one step
    voted for is lesion, one that no step voted for (posterior about 5e-13) is not. When no step votes lesion
    anywhere (or every step everywhere), SimpleITK returns NaN for every voxel; stitched, NaN makes the window's
    voxels background. Both are kept here.
    """
    votes = clamped_x0(step_logits).mean(dim=1).to(torch.int16) == 1
    if votes.all() or not votes.any():
        return torch.full(votes.shape[1:], float("nan"), dtype=torch.float64, device=votes.device)
    return staple(votes)


PROTOCOLS: Registry[InferenceProtocol] = Registry("inference protocol")

REFERENCE = InferenceProtocol(
    name="reference",
    description=(
        "the public MSSegDiff code's: x0 = logits clamped to [-1, 1]; last, mean, mean-var, STAPLE (and majority) "
        "from one chain, uncertainty from all; STAPLE on int16-cast steps; fused in each window, then stitched; "
        "lesion where the float32 sigmoid of the map > 0.5; validation 50 DDIM steps, last step, overlap 0.25; "
        "test overlap 0.6"
    ),
    x0=clamped_x0,
    fuse_per_window=True,
    defaults=ProtocolSettings(
        validation_ddim_steps=50, validation_strategy="last", validation_overlap=0.25, overlap=0.6
    ),
    mask_rule=reference_mask,
    one_chain_strategies=frozenset({"last", "mean", "mean-var", "staple", "majority"}),
    own_strategies={"staple": reference_staple},
    reference_numerics=True,
)
MSX = InferenceProtocol(
    name="msx",
    description=(
        "msx's: x0 = 2 sigmoid(l) - 1; every strategy over all chains; STAPLE on steps with x0 > 0, lesion where "
        "its posterior >= 0.5; fused on the stitched trajectories; lesion where the map > 0; validation 10 DDIM "
        "steps, mean, overlap 0.5"
    ),
    x0=x0_from_logits,
    fuse_per_window=False,
    defaults=ProtocolSettings(
        validation_ddim_steps=10, validation_strategy="mean", validation_overlap=None, overlap=0.5
    ),
)
for _protocol in (REFERENCE, MSX):
    PROTOCOLS.register(_protocol.name)(_protocol)
