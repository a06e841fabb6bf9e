"""Graph breaks and compiled training steps: what `torch.compile` makes of each backbone, in one process.

For every backbone: how many graphs dynamo cuts the network's forward and the training loss
(`diffusion_loss`: forward, time steps and noise drawn, x0 loss) into (`torch._dynamo.explain`; one graph and
no break is the goal), then the training step (loss, backward, AdamW step) eager against the same step with the
loss compiled by Inductor (`torch.compile(diffusion_loss, fullgraph=True)`; AOTAutograd compiles the backward
from the same graph). Both arms train deep copies of one network on the same batch; each reports the median of
its timed steps after warm-up, and the compiled arm also its first call (the compilation included).

    python benchmarks/compile_graphs.py                        # CPU: width 0.125, 32^3 (SwinUNETR 64x32x32), batch 2,
                                                               # 1 torch thread
    python benchmarks/compile_graphs.py --graphs-only          # the graph counts alone (seconds, no Inductor)
    python benchmarks/compile_graphs.py --device cuda --width 1.0 --patch 96 --json compile.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch

from msx.models.diffusion import diffusion_loss
from msx.models.networks import BACKBONES, NetworkConfig, build_network

from timing import pick_device, print_table, timed, write_json

IMAGE_CHANNELS = 3
LR, WEIGHT_DECAY = 1e-4, 1e-5
LESION_FRACTION = 0.02
# SwinUNETR's bottleneck (1/32) must hold more than one voxel for instance norm in training mode; UNETR's width
# 0.125 gives it 2 heads (ViT hidden 128).
MINIMUM_TRAINING_PATCH = {"swinunetr": (64, 32, 32)}
MINIMUM_WIDTH = {"swinunetr": 0.25}  # its smallest feature size, 12


def graph_counts(net: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    timesteps = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
    forward = torch._dynamo.explain(net)(image, 2 * mask - 1, timesteps)
    loss = torch._dynamo.explain(diffusion_loss)(net, image, mask)
    return {
        "forward_graphs": forward.graph_count,
        "forward_breaks": forward.graph_break_count,
        "loss_graphs": loss.graph_count,
        "loss_breaks": loss.graph_break_count,
    }


def step_times(net, loss_function, image, mask, device, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(seconds of the first step, seconds of each timed step after `warmup` more)."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        loss = loss_function(net, image, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    first, _ = timed(device, step)
    for _ in range(warmup):
        step()
    return first, [timed(device, step)[0] for _ in range(steps)]


def benchmark_backbone(backbone: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    side = args.patch
    patch = tuple(max(side, low) for low in MINIMUM_TRAINING_PATCH.get(backbone, (0, 0, 0)))
    width = max(args.width, MINIMUM_WIDTH.get(backbone, 0.0))
    torch.manual_seed(0)
    config = NetworkConfig(backbone=backbone, image_channels=IMAGE_CHANNELS, width=width, patch_size=patch)
    initial = build_network(config).to(device).train()
    image = torch.randn((args.batch, IMAGE_CHANNELS, *patch), device=device)
    mask = (torch.rand((args.batch, 1, *patch), device=device) < LESION_FRACTION).float()
    result: dict[str, Any] = {"backbone": backbone, "width": width, "patch": list(patch)}
    torch._dynamo.reset()
    result.update(graph_counts(copy.deepcopy(initial), image, mask))
    if args.graphs_only:
        return result

    torch.manual_seed(1)
    _, eager = step_times(copy.deepcopy(initial), diffusion_loss, image, mask, device, args.warmup, args.steps)
    torch._dynamo.reset()
    compiled_loss = torch.compile(diffusion_loss, fullgraph=True)
    torch.manual_seed(1)
    try:
        first, compiled = step_times(
            copy.deepcopy(initial), compiled_loss, image, mask, device, args.warmup, args.steps
        )
    except Exception as error:  # report the failure of one family, go on with the others
        result["compiled_error"] = f"{type(error).__name__}: {error}"[:500]
        result["eager_s"] = statistics.median(eager)
        return result
    result.update(
        eager_s=statistics.median(eager),
        compiled_s=statistics.median(compiled),
        compiled_first_s=first,
    )
    result["speedup"] = result["eager_s"] / result["compiled_s"]
    return result


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES.names()), choices=BACKBONES.names())
    parser.add_argument("--width", type=float, default=0.125, help="times the reference widths")
    parser.add_argument("--patch", type=int, default=32, help="patch side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--graphs-only", action="store_true", help="count graphs, time nothing")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads on the CPU (default 1: on a shared CPU, threads spin-waiting on each other made "
        "eager steps 10-100x slower)",
    )
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    device = pick_device(args.device, cpu_threads=args.threads)
    settings = {key: value for key, value in vars(args).items() if key != "json"}
    results = []
    for backbone in args.backbones:
        results.append(benchmark_backbone(backbone, args, device))
        print(results[-1], flush=True)
        write_json(args.json, device, settings, results)  # after every backbone: a stopped run keeps its rows
    headers = ["backbone", "width", "patch", "forward graphs / breaks", "training loss graphs / breaks"]
    if not args.graphs_only:
        headers += ["eager s/step", "compiled s/step", "first compiled step s", "eager / compiled"]
    rows = []
    for row in results:
        cells = [row["backbone"], row["width"], "x".join(map(str, row["patch"])),
                 f"{row['forward_graphs']} / {row['forward_breaks']}", f"{row['loss_graphs']} / {row['loss_breaks']}"]
        if not args.graphs_only:
            cells += [row["eager_s"], row.get("compiled_s", row.get("compiled_error")),
                      row.get("compiled_first_s", "-"), row.get("speedup", "-")]
        rows.append(cells)
    print_table(headers, rows)


if __name__ == "__main__":
    main()
