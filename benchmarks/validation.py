"""One fold's validation: what `run_fold` did before (each scan segmented, restored to its grid on the host, the
full metric set computed to read one Dice) against what it does now (the validation strategy's Dice on the
device, on the preprocessed grid, the msx protocol's scans batched on one padded grid), in one process.

Both arms use one network, the same scans, the fold's validation settings (one chain, the protocol's validation
steps and overlap) and the same seeds. The baseline (labelled "per scan + full metrics") is `engine.evaluate_scan`
per scan, as main's `evaluate_distributed` ran it for validation, under the autocast it used (bf16 on a GPU for
either protocol). The new arm is `engine.prepare_validation` (once per fold, timed apart) and
`engine.validation_dice` (per validation) under `inference_autocast_dtype` (bf16 on a GPU under msx, float32 under
the reference protocol), optionally with the sampler compiled (`--compile`). Windows are counted both ways: the
padded common grid can add windows.

    python benchmarks/validation.py                       # CPU: smoke sizes (width 0.125, 32^3, 48x56x48, 4 scans)
    python benchmarks/validation.py --device cuda --compile --width 1.0 --roi 96 --shape 181 217 181
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from msx.models.compilation import compiled_denoiser
from msx.models.data.cohort import load_scan
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.data.transforms import prepare_scan_for_inference
from msx.models.diffusion import DiffusionConfig
from msx.models.engine import (
    InferenceConfig,
    evaluate_scan,
    inference_autocast_dtype,
    prepare_validation,
    segment_scan,
    training_autocast_dtype,
    validation_dice,
)
from msx.models.networks import NetworkConfig, build_network
from msx.models.protocols import PROTOCOLS

from timing import pick_device, print_table, timed, write_json

MODALITIES = ("flair", "mprage", "t2")
SEED = 10


def windows(shape, roi, overlap) -> int:
    """How many windows MONAI's sliding window places on a grid of ``shape``."""
    return len(dense_patch_slices(shape, roi, _get_scan_interval(shape, roi, 3, (overlap,) * 3)))


def baseline(net, scans, config, device, autocast_dtype) -> list[float]:
    """Main's validation before this change: every scan segmented and scored with the full metric set."""
    generator = torch.Generator(device=device)
    dice = []
    for index, scan in enumerate(scans):
        generator.manual_seed(SEED + index)
        evaluation = evaluate_scan(net, scan, config, device, DiffusionConfig(), generator, autocast_dtype)
        dice.append(evaluation.metrics[config.strategies[0]]["dsc"])
    return dice


def sampling_only(net, scans, config, device, autocast_dtype) -> None:
    generator = torch.Generator(device=device)
    for index, scan in enumerate(scans):
        generator.manual_seed(SEED + index)
        segment_scan(net, scan.image, config, device, DiffusionConfig(), generator, autocast_dtype)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="unet")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--roi", type=int, default=32, help="window side (the training patch)")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 56, 48), help="synthetic scan shape")
    parser.add_argument("--scans", type=int, default=4, help="validation scans")
    parser.add_argument("--protocol", default="msx", choices=PROTOCOLS.names())
    parser.add_argument("--steps", type=int, help="validation DDIM steps (default: the protocol's)")
    parser.add_argument("--sw-batch-size", type=int, default=InferenceConfig.sw_batch_size)
    parser.add_argument("--repeats", type=int, default=2, help="timed validations per arm (median)")
    parser.add_argument("--compile", action="store_true", help="compile the new arm's sampler (Inductor)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--json")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    device = pick_device(args.device, cpu_threads=args.threads)
    defaults = PROTOCOLS.get(args.protocol).defaults
    roi = (args.roi,) * 3
    config = InferenceConfig(
        ddim_steps=args.steps or defaults.validation_ddim_steps, samples=1, roi_size=roi,
        overlap=defaults.validation_overlap if defaults.validation_overlap is not None else defaults.overlap,
        sw_batch_size=args.sw_batch_size, strategies=(defaults.validation_strategy,), protocol=args.protocol,
    )
    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_cohort(folder, patients=math.ceil(args.scans / 2) + 1, shape=tuple(args.shape))
        cohort = open_cohort(folder, MODALITIES, 1)
        scans = [load_scan(scan, cohort.modalities, cohort.rater) for scan in cohort.scans[: args.scans]]
    torch.manual_seed(0)
    net = build_network(
        NetworkConfig(args.backbone, image_channels=len(MODALITIES), width=args.width, patch_size=roi)
    ).to(device).eval()

    old_autocast = training_autocast_dtype(device)
    old = [timed(device, lambda: baseline(net, scans, config, device, old_autocast)) for _ in range(args.repeats)]
    # The baseline's sampling alone (masks restored to the host grid, no metrics): the rest is the metric set.
    old_sampling = [
        timed(device, lambda: sampling_only(net, scans, config, device, old_autocast))[0] for _ in range(args.repeats)
    ]
    prepare_s, groups = timed(device, lambda: prepare_validation(scans, range(len(scans)), config, device))
    sampler = compiled_denoiser(net) if args.compile else net
    new_autocast = inference_autocast_dtype(args.protocol, device)
    first_new_s, _ = timed(
        device, lambda: validation_dice(sampler, groups, config, DiffusionConfig(), SEED, new_autocast)
    )
    new = [
        timed(device, lambda: validation_dice(sampler, groups, config, DiffusionConfig(), SEED, new_autocast))
        for _ in range(args.repeats)
    ]
    own_windows = sum(
        windows(prepare_scan_for_inference(scan.image, roi)[1].prepared_shape, roi, config.overlap) for scan in scans
    )
    batched_windows = sum(windows(tuple(g.images.shape[2:]), roi, config.overlap) * g.images.shape[0] for g in groups)
    result = {
        "protocol": args.protocol,
        "scans": len(scans),
        "ddim_steps": config.ddim_steps,
        "old_s": statistics.median(seconds for seconds, _ in old),
        "old_sampling_only_s": statistics.median(old_sampling),
        "new_s": statistics.median(seconds for seconds, _ in new),
        "new_first_s": first_new_s,
        "prepare_once_s": prepare_s,
        "windows_per_scan_grids": own_windows,
        "windows_batched": batched_windows,
        "old_mean_dice": float(np.mean(old[0][1])),
        "new_mean_dice": float(np.mean(list(new[0][1].values()))),
    }
    result["old_over_new"] = result["old_s"] / result["new_s"]
    print(result, flush=True)
    write_json(args.json, device, vars(args), [result])
    print_table(
        ["protocol", "scans", "steps", "per scan + full metrics s (baseline)", "of which sampling s",
         "device Dice, batched s", "first (compiles) s", "prepared once s", "windows own grids / batched",
         "baseline / new"],
        [[args.protocol, len(scans), config.ddim_steps, result["old_s"], result["old_sampling_only_s"], result["new_s"],
          first_new_s, prepare_s, f"{own_windows} / {batched_windows}", result["old_over_new"]]],
    )


if __name__ == "__main__":
    main()
