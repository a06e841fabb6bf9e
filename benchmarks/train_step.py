"""Training step: msx's `train_step` against a reference-style step, for every backbone, in one process.

msx runs its real step (`msx.models.engine.train_step`, configured as the Ray Train worker configures it:
`training_autocast_dtype`, i.e. bf16 autocast on a GPU, and `training_optimizer`, i.e. AdamW fused on a GPU),
with the batch already on the device and no host synchronisation inside the step; `--compile` runs it through
torch.compile. The reference-style step (below, labelled) trains the same network on the same batch the way
the published MSSegDiff code does. Each arm: warm-up steps, then the median of synchronised single steps.
msx's "pipelined" column is the mean over the same number of steps queued back to back with one
synchronisation at the end: what not waiting for the device buys (the reference reads the loss every step,
so it cannot run ahead).

    python benchmarks/train_step.py                          # CPU: narrow networks, 32^3, batch 2 (ratios only)
    python benchmarks/train_step.py --device cuda            # the reference's sizes: width 1.0, 96^3, batch 2
    python benchmarks/train_step.py --device cuda --compile --backbones unet segresnet --json train.json

On the CPU msx's configuration is the reference's (float32, unfused AdamW, and the batch is on the CPU either
way), so the CPU ratio is about 1 and only checks the harness; the gains are the GPU's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from msx.models.diffusion import diffusion_loss
from msx.models.engine import train_step, training_autocast_dtype, training_optimizer
from msx.models.networks import BACKBONES, NetworkConfig, build_network

from timing import pick_device, print_table, synchronize, timed, write_json

IMAGE_CHANNELS = 3  # FLAIR, T1, T2 as in the paper
LR, WEIGHT_DECAY = 1e-4, 1e-5
LESION_FRACTION = 0.02
# SwinUNETR's bottleneck (1/32) must hold more than one voxel for instance norm in training mode.
MINIMUM_TRAINING_PATCH = {"swinunetr": (64, 32, 32)}
GIB = 2**30


def reference_style_step(
    net: torch.nn.Module,
    host_image: torch.Tensor,
    host_mask: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> float:
    """REFERENCE-STYLE BASELINE, not msx: one step as the published MSSegDiff code takes it.

    float32, eager, plain AdamW (PyTorch's default implementation, not fused), the batch copied from host
    memory every step, and the loss read back (`.item()`, a host synchronisation) every step. The loss itself
    is msx's `diffusion_loss` (the same x0 objective), so that the two arms differ only in how the step runs.
    """
    image = host_image.to(device)
    mask = host_mask.to(device)
    loss = diffusion_loss(net, image, mask)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def training_patch(backbone: str, side: int) -> tuple[int, int, int]:
    minimum = MINIMUM_TRAINING_PATCH.get(backbone, (0, 0, 0))
    return tuple(max(side, low) for low in minimum)  # type: ignore[return-value]


def synchronised_step_times(device: torch.device, step: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    return [timed(device, step)[0] for _ in range(steps)]


def pipelined_step_time(device: torch.device, step: Callable[[], Any], steps: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def benchmark_backbone(backbone: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    patch = training_patch(backbone, args.patch)
    torch.manual_seed(0)
    initial = build_network(
        NetworkConfig(backbone=backbone, image_channels=IMAGE_CHANNELS, width=args.width, patch_size=patch)
    )
    host_image = torch.randn((args.batch, IMAGE_CHANNELS, *patch))
    host_mask = (torch.rand((args.batch, 1, *patch)) < LESION_FRACTION).float()
    result: dict[str, Any] = {
        "backbone": backbone,
        "patch": list(patch),
        "params": sum(p.numel() for p in initial.parameters()),
    }

    reset_peak_memory(device)
    net = copy.deepcopy(initial).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    times = synchronised_step_times(
        device, lambda: reference_style_step(net, host_image, host_mask, optimizer, device), args.warmup, args.steps
    )
    result.update(reference_s=statistics.median(times), reference_peak_gib=peak_memory_gib(device))
    del net, optimizer

    reset_peak_memory(device)
    net = copy.deepcopy(initial).to(device).train()
    optimizer = training_optimizer(net.parameters(), LR, WEIGHT_DECAY, device)
    model = torch.compile(net) if args.compile else net
    image, mask = host_image.to(device), host_mask.to(device)
    autocast_dtype = training_autocast_dtype(device)

    def msx_step() -> torch.Tensor:
        return train_step(model, image, mask, optimizer, autocast_dtype=autocast_dtype)

    try:
        times = synchronised_step_times(device, msx_step, args.warmup, args.steps)
    except Exception as error:  # torch.compile can fail on one family and not the others: report, go on
        if not args.compile:
            raise
        result["msx_error"] = f"{type(error).__name__}: {error}"[:500]
        return result
    result.update(
        msx_s=statistics.median(times),
        msx_pipelined_s=pipelined_step_time(device, msx_step, args.steps),
        msx_peak_gib=peak_memory_gib(device),
    )
    result["ratio"] = result["reference_s"] / result["msx_s"]
    return result


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES.names()), choices=BACKBONES.names())
    parser.add_argument("--width", type=float, help="times the reference widths (default: cpu 0.125, cuda 1.0)")
    parser.add_argument("--patch", type=int, help="patch side (default: cpu 32, cuda 96)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: cpu 2, cuda 4)")
    parser.add_argument("--steps", type=int, help="timed steps (default: cpu 5, cuda 8)")
    parser.add_argument("--compile", action="store_true", help="msx's step through torch.compile")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    defaults = {"width": 1.0, "patch": 96, "warmup": 4, "steps": 8} if on_gpu else {
        "width": 0.125, "patch": 32, "warmup": 2, "steps": 5}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_arguments()
    device = pick_device(args.device)
    settings = {key: value for key, value in vars(args).items() if key != "json"}
    results = []
    for backbone in args.backbones:
        results.append(benchmark_backbone(backbone, args, device))
        row = results[-1]
        msx_seconds = row.get("msx_s", float("nan"))
        print(f"{backbone}: reference {row['reference_s']:.3f} s, msx {msx_seconds:.3f} s", flush=True)
        # After every backbone: a run stopped by a time limit keeps what it measured.
        write_json(args.json, device, settings, results)
    msx_label = "msx compiled" if args.compile else "msx"
    headers = ["backbone", "params (M)", "patch", "reference s/step", f"{msx_label} s/step",
               f"{msx_label} pipelined s/step", "ratio"]
    if device.type == "cuda":
        headers += ["reference peak GiB", "msx peak GiB"]
    rows = []
    for row in results:
        cells = [row["backbone"], row["params"] / 1e6, "x".join(map(str, row["patch"])), row["reference_s"],
                 row.get("msx_s", row.get("msx_error")), row.get("msx_pipelined_s", "-"), row.get("ratio", "-")]
        if device.type == "cuda":
            cells += [row["reference_peak_gib"], row.get("msx_peak_gib", "-")]
        rows.append(cells)
    print_table(headers, rows)


if __name__ == "__main__":
    main()
