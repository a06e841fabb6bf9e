"""All-strategy inference of one scan: msx's single sampling pass against the reference's way, in one process.

msx runs its real code, `msx.models.engine.segment_scan` under an inference protocol (`--protocol`, by default
the reference's, the method the baseline runs): one sampling pass (the s samples of a window batched,
`sw_batch_size` windows batched, the encoder run once per window and reused for every step and sample) serves
every strategy. It is timed twice: as it is, and with the encoder rerun at every step (`WholeNetworkEveryStep`),
which measures encoder reuse alone. The reference-style baseline (below, labelled) runs the reference protocol
the reference's way: it samples the scan again for every strategy (4 chains for uncertainty, 1 for the others),
window by window at batch 1, in float32, copies every step's prediction to the host and fuses each window before
stitching. All arms use the same network (`unet` is the paper's U-Net), scan, DDIM steps, window size and overlap.

    python benchmarks/inference.py                  # CPU: narrow U-Net, 40 x 48 x 40 brain, 32^3 windows
    python benchmarks/inference.py --device cuda    # width 1.0, 160 x 192 x 160 brain, 96^3 windows
    python benchmarks/inference.py --full-size      # msx alone on a 181 x 217 x 181 scan: peak host memory

Ratios only on the CPU: its absolute times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import resource
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from msx.models.data.transforms import prepare_scan_for_inference
from msx.models.diffusion import DiffusionConfig, alphas_cumprod, ddim_timesteps, ddim_update
from msx.models.engine import InferenceConfig, segment_scan, training_autocast_dtype
from msx.models.networks import NetworkConfig, build_network
from msx.models.protocols import PROTOCOLS, REFERENCE

from timing import pick_device, print_table, timed, write_json

IMAGE_CHANNELS = 3
STRATEGIES = InferenceConfig().strategies
# The reference draws 4 samples for its uncertainty strategy and one for each of the others.
REFERENCE_SAMPLES = {"uncertainty": 4}
HOST_MEMORY_TARGET_GIB = 24
GIB = 2**30


def brain_like_scan(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(C, X, Y, Z) float32: an ellipsoid "brain" spanning 90 % of each side with noisy tissue and a few bright
    lesions, zero outside, so that the foreground crop of msx's preprocessing acts as on a skull-stripped scan."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*(np.linspace(-1, 1, side, dtype=np.float32) for side in shape), indexing="ij")
    brain = sum((axis / 0.9) ** 2 for axis in axes) <= 1.0
    scan = np.zeros((IMAGE_CHANNELS, *shape), dtype=np.float32)
    for channel in range(IMAGE_CHANNELS):
        tissue = 1.0 + 0.2 * channel + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        scan[channel] = np.where(brain, tissue, 0.0)
    centres = rng.integers(np.array(shape) // 3, 2 * np.array(shape) // 3, size=(8, 3))
    for x, y, z in centres:
        scan[0, x - 2 : x + 2, y - 2 : y + 2, z - 2 : z + 2] += 1.5
    return scan


class WholeNetworkEveryStep(torch.nn.Module):
    """msx's network without `encode`/`denoise`, so that sampling reruns the encoder at every step."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(image, noisy, timesteps)


@torch.inference_mode()
def reference_style_window_trajectory(
    net: torch.nn.Module, window: torch.Tensor, num_steps: int, num_samples: int
) -> torch.Tensor:
    """REFERENCE-STYLE BASELINE, not msx: DDIM over one window at batch 1, one sample after another.

    The whole network (encoder included) runs at every step in float32, and every step's prediction is copied to
    the host (a synchronisation) as the reference keeps them. Returns the host trajectory as msx lays it out:
    (1, steps * samples, *window), channel = step * samples + sample.
    """
    config = DiffusionConfig()
    timesteps = ddim_timesteps(num_steps, config)
    alpha_bar = alphas_cumprod(config).tolist()
    host_steps = []
    for _ in range(num_samples):
        noisy = torch.randn_like(window[:, :1])
        for step, t in enumerate(timesteps):
            logits = net(window, noisy, torch.full((1,), t, dtype=torch.long, device=window.device))
            host_steps.append(logits.cpu())
            if step + 1 < num_steps:
                noisy = ddim_update(noisy, REFERENCE.x0(logits), alpha_bar[t], alpha_bar[timesteps[step + 1]])
    by_sample = torch.cat(host_steps, dim=1).view(1, num_samples, num_steps, *window.shape[2:])
    return by_sample.transpose(1, 2).reshape(1, num_steps * num_samples, *window.shape[2:])


@torch.inference_mode()
def reference_style_all_strategies(
    net: torch.nn.Module, scan: np.ndarray, config: InferenceConfig, device: torch.device
) -> dict[str, np.ndarray]:
    """REFERENCE-STYLE BASELINE, not msx: a separate full sampling of the scan for every strategy.

    Same preprocessing, windows, overlap and reference-protocol fusion functions as msx; sliding windows at
    batch 1 (one window per network call), each window's steps fused on the host where the reference keeps them,
    the fused maps stitched.
    """
    net.eval()
    prepared, grid = prepare_scan_for_inference(scan, config.roi_size)
    image = prepared.to(device)[None]
    masks = {}
    for strategy in config.strategies:
        samples = REFERENCE_SAMPLES.get(strategy, 1)
        fuse = REFERENCE.strategy(strategy)

        def predict_window(window: torch.Tensor, samples: int = samples, fuse=fuse) -> torch.Tensor:
            steps = reference_style_window_trajectory(net, window, config.ddim_steps, samples)
            return fuse(steps[0].view(config.ddim_steps, samples, *window.shape[2:])).float()[None, None]

        stitched = sliding_window_inference(
            image, config.roi_size, 1, predict_window, overlap=config.overlap, device=torch.device("cpu")
        )
        masks[strategy] = grid.restore((stitched[0, 0] > 0).numpy())
    return masks


def warm_up(net: torch.nn.Module, config: InferenceConfig, device: torch.device, autocast_dtype) -> None:
    """One call at each arm's batch shape, so that no arm pays the device's first-call set-up in its time."""
    with torch.inference_mode():
        for batch, dtype in ((1, None), (config.sw_batch_size * config.samples, autocast_dtype)):
            window = torch.randn((batch, IMAGE_CHANNELS, *config.roi_size), device=device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                net(window, window[:, :1], torch.zeros(batch, dtype=torch.long, device=device))


def peak_host_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def peak_device_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_msx(net: torch.nn.Module, scan: np.ndarray, config: InferenceConfig, device: torch.device) -> dict[str, Any]:
    reset_peak_device_memory(device)
    generator = torch.Generator(device=device).manual_seed(0)
    seconds, masks = timed(
        device,
        lambda: segment_scan(
            net, scan, config, device, generator=generator, autocast_dtype=training_autocast_dtype(device)
        ),
    )
    return {"seconds": seconds, "lesion_voxels": {name: int(mask.sum()) for name, mask in masks.items()},
            "peak_device_gib": peak_device_memory_gib(device)}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbone", default="unet")
    parser.add_argument("--protocol", default="reference", choices=PROTOCOLS.names(), help="msx's inference protocol")
    parser.add_argument("--width", type=float, help="times the reference widths (default: cpu 0.125, cuda 1.0)")
    parser.add_argument("--shape", type=int, nargs=3, help="scan size (default: cpu 40 48 40, cuda 160 192 160)")
    parser.add_argument("--roi", type=int, help="window side (default: cpu 32, cuda 96)")
    parser.add_argument("--overlap", type=float, help="window overlap (default 0.6, the reference's at test time)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--samples", type=int, default=4, help="msx's samples per window (all strategies)")
    parser.add_argument("--sw-batch", type=int, default=4, help="msx's windows per network call")
    parser.add_argument("--skip-reference", action="store_true", help="time msx only")
    parser.add_argument(
        "--full-size", action="store_true",
        help="msx alone on a 181 x 217 x 181 scan (96^3 windows, overlap 0.25 to keep the CPU time down; the "
        "scan-sized trajectory dominates memory either way); reports peak host memory against 24 GiB",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    if args.full_size:
        defaults: dict[str, Any] = {"width": 0.125, "shape": [181, 217, 181], "roi": 96, "overlap": 0.25}
        args.skip_reference = True
    elif on_gpu:
        defaults = {"width": 1.0, "shape": [160, 192, 160], "roi": 96, "overlap": 0.6}
    else:
        defaults = {"width": 0.125, "shape": [40, 48, 40], "roi": 32, "overlap": 0.6}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_arguments()
    device = pick_device(args.device)
    roi = (args.roi,) * 3
    config = InferenceConfig(
        ddim_steps=args.steps, samples=args.samples, roi_size=roi, overlap=args.overlap, sw_batch_size=args.sw_batch,
        strategies=STRATEGIES, protocol=args.protocol,
    )
    torch.manual_seed(0)
    net = build_network(
        NetworkConfig(backbone=args.backbone, image_channels=IMAGE_CHANNELS, width=args.width, patch_size=roi)
    ).to(device).eval()
    scan = brain_like_scan(tuple(args.shape))
    warm_up(net, config, device, training_autocast_dtype(device))

    results: dict[str, Any] = {"msx": run_msx(net, scan, config, device)}
    print(f"msx: {results['msx']['seconds']:.1f} s", flush=True)
    if not args.full_size:
        results["msx_encoder_every_step"] = run_msx(WholeNetworkEveryStep(net), scan, config, device)
        print(f"msx, encoder every step: {results['msx_encoder_every_step']['seconds']:.1f} s", flush=True)
    if not args.skip_reference:
        reset_peak_device_memory(device)
        seconds, _ = timed(device, lambda: reference_style_all_strategies(net, scan, config, device))
        results["reference"] = {"seconds": seconds, "peak_device_gib": peak_device_memory_gib(device)}
        print(f"reference: {seconds:.1f} s", flush=True)
    results["peak_host_gib"] = peak_host_memory_gib()

    reference_seconds = results.get("reference", {}).get("seconds")
    reference_passes = sum(REFERENCE_SAMPLES.get(strategy, 1) for strategy in STRATEGIES)
    labels = {
        "reference": f"reference-style: each strategy sampled anew, batch 1, fp32 ({reference_passes} sample passes)",
        "msx_encoder_every_step": f"msx {args.protocol} protocol, encoder rerun every step ({args.samples} samples, "
                                  "one pass)",
        "msx": f"msx segment_scan, {args.protocol} protocol ({args.samples} samples, one pass, encoder once per "
               "window)",
    }
    rows = []
    for arm, label in labels.items():
        if arm in results:
            seconds = results[arm]["seconds"]
            ratio = reference_seconds / seconds if reference_seconds else "-"
            rows.append([label, seconds, ratio, results[arm]["peak_device_gib"] or "-"])
    print(f"scan {'x'.join(map(str, args.shape))}, {args.backbone} width {args.width}, {args.steps} DDIM steps, "
          f"{args.roi}^3 windows, overlap {args.overlap}, all {len(STRATEGIES)} strategies")
    print_table(["arm", "s per scan", "reference / arm", "peak GPU GiB"], rows)
    if "msx_encoder_every_step" in results:
        gain = results["msx_encoder_every_step"]["seconds"] / results["msx"]["seconds"]
        print(f"encoder reuse alone: {gain:.2f}x")
    print(f"peak host memory (RSS): {results['peak_host_gib']:.2f} GiB (target {HOST_MEMORY_TARGET_GIB} GiB)")
    settings = {key: value for key, value in vars(args).items() if key != "json"}
    write_json(args.json, device, settings, results)


if __name__ == "__main__":
    main()
