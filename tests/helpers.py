"""What tests across the layers share: a free port, the repository's root, ISBI-named NIfTI files, tiny specs and
networks. Heavy imports (torch, msx's networks) happen inside the functions that need them."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
MODALITIES = ("flair", "mprage", "t2")


def ray_head_session(gcs_port: int) -> str:
    """The session folder of the Ray head a test started with `ray start --head --port=gcs_port`."""
    import psutil

    head = next(
        p for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "gcs_server" and f"--gcs_server_port={gcs_port}" in " ".join(p.info["cmdline"] or [])
    )
    return next(arg for arg in head.cmdline() if arg.startswith("--log_dir=")).split("=", 1)[1].rsplit("/logs", 1)[0]


def stop_ray_session(session: str, gcs_port: int) -> None:
    """Kill only that Ray's processes (every one names its session folder), and, as `ray stop` would, forget it as
    "the current cluster", or later drivers on this machine (and Ray Train's placement-group cleaner in their
    workers) would look for it."""
    import psutil
    from ray._common.utils import get_ray_address_file

    for process in psutil.process_iter(["cmdline"]):
        if session in " ".join(process.info["cmdline"] or []):
            process.kill()
    current = Path(get_ray_address_file(None))
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (once the probe closes)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_isbi_scan(
    folder: Path,
    patient: int,
    timepoint: int,
    images: Mapping[str, np.ndarray],
    masks: Mapping[int, np.ndarray],
    affine: np.ndarray | None = None,
    suffix: str = ".nii.gz",
) -> dict[str, Path]:
    """One scan under the ISBI 2015 names in `folder`: `trainingPP_TT_<modality>_pp<suffix>` per image and
    `trainingPP_TT_mask<rater><suffix>` per mask. Returns the paths by modality and by `mask<rater>`."""
    stem = f"training{patient:02d}_{timepoint:02d}"
    files = {name: save_nifti(folder / f"{stem}_{name}_pp{suffix}", volume, affine) for name, volume in images.items()}
    for rater, mask in masks.items():
        files[f"mask{rater}"] = save_nifti(folder / f"{stem}_mask{rater}{suffix}", mask, affine)
    return files


def write_isbi_cohort(
    root: Path,
    patients: Iterable[int],
    timepoints: Iterable[int],
    image: Callable[[int, int, str], np.ndarray],
    mask: Callable[[int, int, int], np.ndarray],
    affine: np.ndarray | None = None,
    suffix: str = ".nii.gz",
    modalities: Iterable[str] = MODALITIES,
    raters: Iterable[int] = (1, 2),
) -> Path:
    """A cohort laid out as copies of the challenge data are, a folder per patient: `image(patient, time point,
    modality)` and `mask(patient, time point, rater)` give each file's voxels."""
    for patient in patients:
        for timepoint in timepoints:
            write_isbi_scan(
                root / f"training{patient:02d}", patient, timepoint,
                {name: image(patient, timepoint, name) for name in modalities},
                {rater: mask(patient, timepoint, rater) for rater in raters},
                affine, suffix,
            )
    return root


# The smallest study that trains on a CPU: a U-Net at an eighth of the reference width on 32^3 patches, one epoch
# validated once, one DDIM step, one sample, windows without overlap. The U-Net is the lighter MONAI one: these
# settings test the orchestration, and batch 1 suits no batch norm in training (the paper U-Net's).
TINY_U_NET = "basic-unet"
TINY_SPEC: dict[str, Any] = {
    "model": {"backbones": [TINY_U_NET], "width": 0.125},
    "training": {
        "epochs": 1, "batch_size": 1, "patch_size": [32, 32, 32], "validate_every": 1, "validation_ddim_steps": 1,
        "validation_strategy": "mean",
    },
    "inference": {"strategies": ["mean"], "ddim_steps": 1, "samples": 1, "overlap": 0.0},
}


def tiny_spec(name: str, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """TINY_SPEC named `name`, each given section's keys replacing or adding to its own."""
    spec = copy.deepcopy(TINY_SPEC)
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **copy.deepcopy(dict(values))}
    return {"name": name, **spec}


def tiny_fold_data(root: Path, shape: tuple[int, int, int], patch: tuple[int, int, int]):
    """Fold 1 (train patient 1, validate 2, test 3) of a synthetic 3-patient cohort written under `root`, FLAIR and
    T2 only, two time points per patient: enough for a volume correlation (the ISBI score), few enough to be quick."""
    from msx.models.data.folds import Fold
    from msx.models.data.manifest import open_cohort
    from msx.models.data.synth import write_synthetic_cohort
    from msx.models.fold import load_fold_data

    write_synthetic_cohort(root, patients=3, shape=shape)
    for path in root.rglob("training0?_0[3-9]_*"):
        path.unlink()
    fold = Fold(index=1, train=(1,), validation=(2,), test=(3,))
    return load_fold_data(open_cohort(root, ("flair", "t2"), 1), fold, patch)


def tiny_network(backbone: str = TINY_U_NET, image_channels: int = 3):
    """An untrained network of TINY_SPEC's width."""
    from msx.models.networks import NetworkConfig, build_network

    return build_network(NetworkConfig(backbone=backbone, image_channels=image_channels, width=0.125))


def save_tiny_checkpoint(folder: Path, metadata: Mapping[str, Any] | None = None, backbone: str = TINY_U_NET) -> Path:
    """An untrained `tiny_network` saved as an msx checkpoint in `folder`."""
    from msx.models.checkpoint import save_checkpoint

    return save_checkpoint(folder, tiny_network(backbone), dict(metadata or {}))


def run_msx(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """`msx ARGUMENTS` in the folder `cwd`, as a shell runs it: exit status, stdout and stderr apart. It runs in this
    process through click's test runner, so a test pays msx's imports once rather than once per command; an error
    that is not msx's own one-line report raises here with its traceback."""
    from click.testing import CliRunner

    from msx.orchestrator.cli import main

    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner(catch_exceptions=False).invoke(
            main, [str(argument) for argument in arguments], prog_name="msx"
        )
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["msx", *arguments], result.exit_code, result.stdout, result.stderr)


def as_numpy(statistics):
    """A sampler's ChainStatistics as the engine hands them over: float32 arrays on the input grid."""
    from msx.models.uncertainty import ChainStatistics

    return ChainStatistics(*(value.numpy().astype("float32") for value in statistics.values()))
