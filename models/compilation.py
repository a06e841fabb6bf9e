"""`torch.compile` for a fold: the training loss and the sampler's network calls, each compiled once.

What is compiled, and why there:

- Training: the network's forward, in place (`torch.nn.Module.compile`, ``fullgraph=True``): the module object
  stays the same, so its state dict keeps its plain keys (no ``_orig_mod.``) and checkpoints are the same with
  compilation on or off. Under DDP (Ray Train's `prepare_model`) the bare module is compiled after wrapping and
  DDP's own forward stays eager: DDP's forward calls into its logger, which dynamo cannot trace
  (``fullgraph=True`` then fails, whether the loss function or the DDP wrapper is compiled), while the module it
  calls compiles into one graph and sets up no hooks of its own, so DDP's gradient reduction runs as it does
  eagerly (dynamo sees the active DDP module and may split the graph at its gradient buckets). The loss around
  the forward (noise, x0 loss: a few element-wise operations on one channel) stays eager.
- Sampling: the bare network's ``encode`` and ``denoise`` (or its forward), bound methods compiled with
  ``dynamic=False``. Sliding-window inference hands the sampler ``sw_batch_size`` windows at a time except for a
  smaller last batch; `sample_scan_fused(pad_windows=True)` pads that batch, so every call has one shape and no
  validation recompiles. Validation and the final evaluation sample the same windows when they draw the same
  number of chains; otherwise the final evaluation compiles once more.

Compilation is wanted where it pays: ``"auto"`` compiles on a CUDA device (on an H200 the reference U-Net's bf16
step goes from 0.107 s to 0.077 s compiled) and not on the CPU, where Inductor takes minutes per backbone to
compile for no measured gain at the sizes trained there (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .diffusion.training import EncodingDenoiser

COMPILE_AUTO = "auto"
COMPILE_SETTINGS = (COMPILE_AUTO, True, False)
# Inductor on a GPU; tests pass "aot_eager" (the same traced graphs, run without code generation).
DEFAULT_BACKEND = "inductor"


def check_compile_setting(setting: Any, name: str = "compile") -> None:
    """A ValueError naming ``name`` unless ``setting`` is "auto", true or false."""
    if not (setting is True or setting is False or setting == COMPILE_AUTO):
        raise ValueError(f"{name}: {setting!r} is not a compile setting; valid: \"auto\", true, false")


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """Whether ``setting`` ("auto", True, False) compiles on ``device``: "auto" is on for CUDA only."""
    check_compile_setting(setting)
    if setting == COMPILE_AUTO:
        return device.type == "cuda"
    return bool(setting)


def compile_seconds_so_far() -> float:
    """Seconds this process has spent compiling (dynamo's frames and AOTAutograd's backwards), by torch's own
    cumulative timers: the difference over a call is that call's compilation."""
    # torch._dynamo.utils is the only place torch keeps these totals (tlparse and TORCH_LOGS read the same).
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def compile_for_training(net: torch.nn.Module, backend: str = DEFAULT_BACKEND) -> None:
    """Compile the bare network ``net``'s forward in place, one graph (training patches have one shape)."""
    net.compile(fullgraph=True, dynamic=False, backend=backend)


class CompiledDenoiser:
    """A network's sampling calls compiled once, for the sampler (`ddim_trajectory`) to call many times; the
    network itself is untouched (its weights, as they change in training, are what the compiled code reads)."""

    def __init__(self, net: torch.nn.Module, backend: str = DEFAULT_BACKEND) -> None:
        self.module = net
        self._forward = torch.compile(net.forward, fullgraph=True, dynamic=False, backend=backend)

    def eval(self) -> CompiledDenoiser:
        self.module.eval()
        return self

    def __call__(self, image: torch.Tensor, noisy_mask: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self._forward(image, noisy_mask, timesteps)


class CompiledEncodingDenoiser(CompiledDenoiser):
    """`CompiledDenoiser` of an `EncodingDenoiser`: its encoder and denoiser compiled apart, as the sampler runs the
    encoder once per window and the denoiser at every step."""

    def __init__(self, net: torch.nn.Module, backend: str = DEFAULT_BACKEND) -> None:
        super().__init__(net, backend)
        self._encode = torch.compile(net.encode, fullgraph=True, dynamic=False, backend=backend)
        self._denoise = torch.compile(net.denoise, fullgraph=True, dynamic=False, backend=backend)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self._encode(image)

    def denoise(
        self, image: torch.Tensor, noisy_mask: torch.Tensor, timesteps: torch.Tensor, stage_features: list[torch.Tensor]
    ) -> torch.Tensor:
        return self._denoise(image, noisy_mask, timesteps, stage_features)


def compiled_denoiser(net: torch.nn.Module, backend: str = DEFAULT_BACKEND) -> CompiledDenoiser:
    """The sampler's compiled view of the bare network ``net`` (not a DDP wrapper: sampling runs no backward)."""
    if isinstance(net, EncodingDenoiser):
        return CompiledEncodingDenoiser(net, backend)
    return CompiledDenoiser(net, backend)
