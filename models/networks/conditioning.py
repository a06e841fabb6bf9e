"""Time embedding and the hook that adds per-stage conditioning to an unmodified MONAI network.

The conditioning reaches the denoiser's stage modules through forward hooks, because MONAI's networks
take no extra forward arguments. The hooks read it from a context variable that the caller sets for the
duration of one forward pass, keyed by the hooked module object: nothing per-forward is stored on a
module, so nested or concurrent forwards (threads, DataParallel replicas) each see their own values, and
the network stays picklable and deep-copyable.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

_STAGE_CONDITIONING: ContextVar[Mapping[nn.Module, torch.Tensor]] = ContextVar(
    "msx_stage_conditioning", default=MappingProxyType({})
)


@contextmanager
def stage_conditioning(additions: Mapping[nn.Module, torch.Tensor]) -> Iterator[None]:
    """While active, each hooked module in `additions` has its tensor added to its output."""
    token = _STAGE_CONDITIONING.set(additions)
    try:
        yield
    finally:
        _STAGE_CONDITIONING.reset(token)


def add_stage_conditioning(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: returns the module's output plus the conditioning set for it in this forward pass."""
    addition = _STAGE_CONDITIONING.get().get(module)
    if addition is None:
        raise RuntimeError(
            f"no stage conditioning set for {type(module).__name__}; call the DiffusionSegmentationNet "
            "that owns this denoiser instead of the denoiser itself"
        )
    return output + addition


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of integer diffusion time steps followed by a two-layer SiLU MLP (as in DDPM)."""

    def __init__(self, hidden_dim: int, frequency_dim: int = 128) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        # The trailing SiLU is the nonlinearity the reference applies before each per-stage projection.
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU()
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(get_timestep_embedding(timesteps, self.frequency_dim))
