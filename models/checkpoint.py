"""Network checkpoints: a directory with the weights and the configuration that rebuilds the network.

The network is rebuilt from `network.json` through the backbone registry and the weights are read with
`torch.load(weights_only=True)`, so loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .networks import DiffusionSegmentationNet, NetworkConfig, build_network

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "network.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable."""


def save_checkpoint(
    directory: str | os.PathLike[str], net: DiffusionSegmentationNet, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `net` to `directory` atomically and return the directory.

    The checkpoint is assembled in a sibling temporary directory and renamed into place, so `directory`
    never holds a partial checkpoint. A previous checkpoint there is moved aside only once the new one is
    complete, then deleted; a crash between those two renames leaves it inside a `.<name>.replaced-*`
    directory beside `directory`.
    """
    if not isinstance(net, DiffusionSegmentationNet):
        raise TypeError(
            f"expected a DiffusionSegmentationNet, got {type(net).__name__}; pass net.module for a "
            "DistributedDataParallel wrapper and net._orig_mod for a torch.compile'd network"
        )
    # Serialise first: metadata that is not JSON must fail before anything touches the disk.
    config_text = json.dumps(
        {"format_version": FORMAT_VERSION, "network": net.config.to_dict(), "metadata": metadata or {}},
        indent=2,
        sort_keys=True,
    )
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_sibling(target, "tmp")
    try:
        torch.save(net.state_dict(), staging / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(config_text)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            _fsync(staging / name)
        _fsync(staging)
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_checkpoint(
    directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[DiffusionSegmentationNet, dict[str, Any]]:
    """Rebuild the network saved in `directory` on `map_location`; returns (network, metadata)."""
    source = Path(directory)
    try:
        record = json.loads((source / CONFIG_FILE).read_text())
        config = NetworkConfig(**record["network"])
        metadata = record["metadata"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read network configuration {source / CONFIG_FILE}: {error}") from error
    net = build_network(config).to(map_location)
    try:
        # Any failure to read this one file (missing, truncated, not a tensor archive, tensors that do not
        # fit the configured network) means the same thing to the caller: this checkpoint is unusable.
        net.load_state_dict(torch.load(source / WEIGHTS_FILE, map_location=map_location, weights_only=True))
    except Exception as error:
        raise CheckpointError(f"cannot load weights {source / WEIGHTS_FILE}: {error}") from error
    return net, metadata


def _publish(staging: Path, target: Path) -> None:
    """Rename a complete checkpoint into place, replacing (and deleting) any previous one."""
    if not target.exists():
        os.replace(staging, target)
    else:
        # A non-empty directory cannot be renamed over, so the previous checkpoint moves aside first.
        replaced = _fresh_sibling(target, "replaced")
        os.replace(target, replaced / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(replaced / target.name, target)
            replaced.rmdir()
            raise
        shutil.rmtree(replaced, ignore_errors=True)
    _fsync(target.parent)


def _fresh_sibling(target: Path, purpose: str) -> Path:
    """Create an empty hidden directory next to `target` (same file system, so renames are atomic)."""
    sibling = target.parent / f".{target.name}.{purpose}-{uuid.uuid4().hex[:12]}"
    sibling.mkdir()
    return sibling


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a rename cannot publish data still only in the page cache."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
