"""Loading one full-size scan: the NIfTI read, the training preprocessing, and the scan cache (miss and hit).

One synthetic 181 x 217 x 181 patient (3 modalities and a mask, gzipped NIfTI) is measured. Each phase runs
in a process of its own, so its peak resident memory (getrusage) is its own; "after imports" is that
process's peak before the phase starts, the floor under every figure. The source files and cache entries
sit in the operating system's page cache after the first read, so the figures leave out disk reads.

    python benchmarks/load_scan.py                         # one synthetic patient in a temporary folder
    python benchmarks/load_scan.py --data /tmp/msx-patient  # written there once, reused afterwards
    python benchmarks/load_scan.py --repeats 5 --json load_scan.json
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# torch, MONAI and msx are imported inside the phases only: a child process's peak RSS starts at its
# parent's resident size, so the parent stays small for the children's figures to be their own.

SHAPE = (181, 217, 181)
MODALITIES = ("flair", "mprage", "t2")
RATER = 1
PATCH = (96, 96, 96)
PHASES = (
    "nibabel load",
    "preprocessing",
    "cache miss (load + preprocess + write)",
    "cache hit",
    "lesion-sampling centres (once per scan, fraction > 0)",
    "one training patch, uniform (fraction 0)",
    "one training patch, lesion_patch_fraction 0.5",
)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _first_scan(data: Path):
    from msx.models.data.cohort import find_isbi_cohort

    return find_isbi_cohort(data, MODALITIES, RATER).scans[0]


def _write_patient(data: str) -> None:
    from msx.models.data.synth import write_synthetic_cohort

    write_synthetic_cohort(data, patients=1, shape=SHAPE, seed=0)


def _run_phase(phase: str, data: str, cache_root: str, warm_cache: str, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process: set up, then time ``repeats`` runs of the phase's work.

    ``warm_cache`` is a cache folder that already holds the scan, written by another process, so that the
    phases after the miss hold the prepared scan without having prepared it (and its peak memory) here.
    """
    import torch

    from msx.models.data.cache import cached_training_scan, prepare_loaded_scan
    from msx.models.data.cohort import load_scan
    from msx.models.engine import training_dataset

    torch.set_num_threads(1)  # as a training worker with one CPU runs it
    scan = _first_scan(Path(data))
    after_imports = _peak_rss_mib()

    def cached(folder: str):
        return cached_training_scan(scan, MODALITIES, RATER, PATCH, folder)

    work: Callable[[], Any]
    if phase == "nibabel load":
        work = functools.partial(load_scan, scan, MODALITIES, RATER)
    elif phase == "preprocessing":
        work = functools.partial(prepare_loaded_scan, load_scan(scan, MODALITIES, RATER), PATCH)
    elif phase.startswith("cache miss"):

        def work() -> Any:
            return cached(tempfile.mkdtemp(dir=cache_root))

    elif phase == "cache hit":
        work = functools.partial(cached, warm_cache)
    elif phase.startswith("lesion-sampling centres"):
        work = functools.partial(training_dataset, [cached(warm_cache)], PATCH, 0.5)
    else:
        fraction = 0.5 if "0.5" in phase else 0.0
        work = functools.partial(training_dataset([cached(warm_cache)], PATCH, fraction).__getitem__, 0)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return {
        "phase": phase,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "peak_rss_mib": _peak_rss_mib(),
        "rss_after_imports_mib": after_imports,
    }


def _sizes(data: str, cache_root: str) -> dict[str, Any]:
    from msx.models.data.cache import cached_training_scan

    scan = _first_scan(Path(data))
    sources = [scan.images[name] for name in MODALITIES] + [scan.masks[RATER]]
    folder = Path(tempfile.mkdtemp(dir=cache_root))
    prepared = cached_training_scan(scan, MODALITIES, RATER, PATCH, folder)
    return {
        "warm_cache": str(folder),
        "source_files_mib": sum(path.stat().st_size for path in sources) / 2**20,
        "cache_entry_mib": sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 2**20,
        "prepared_shape": list(prepared.image.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder holding (or to receive) the synthetic patient")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase (median reported)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="msx-load-scan-"))
    # spawn and one task per process: each phase starts from a fresh interpreter.
    with get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        try:
            data = args.data or scratch / "data"
            if not (data.is_dir() and any(data.rglob("training01_01_flair_pp.nii*"))):
                print(f"writing one synthetic {SHAPE} patient to {data} ...")
                pool.apply(_write_patient, (str(data),))
            cache_root = scratch / "cache"
            cache_root.mkdir()
            sizes = pool.apply(_sizes, (str(data), str(cache_root)))
            warm_cache = sizes.pop("warm_cache")
            results = [
                pool.apply(_run_phase, (phase, str(data), str(cache_root), warm_cache, args.repeats))
                for phase in PHASES
            ]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    import torch

    from timing import print_table, write_json

    print(
        f"\none {SHAPE} scan, {len(MODALITIES)} modalities + mask: {sizes['source_files_mib']:.1f} MiB of .nii.gz; "
        f"prepared {tuple(sizes['prepared_shape'])}, cache entry {sizes['cache_entry_mib']:.1f} MiB; "
        f"median of {args.repeats}, 1 torch thread\n"
    )
    print_table(
        ["phase", "median s", "min s", "max s", "peak RSS MiB", "after imports MiB"],
        [
            [row["phase"], row["median_s"], row["min_s"], row["max_s"], round(row["peak_rss_mib"]),
             round(row["rss_after_imports_mib"])]
            for row in results
        ],
    )
    settings = {"shape": SHAPE, "modalities": MODALITIES, "patch_size": PATCH, "repeats": args.repeats, **sizes}
    write_json(args.json, torch.device("cpu"), settings, results)


if __name__ == "__main__":
    main()
