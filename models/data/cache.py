"""An on-disk cache of scans preprocessed for training, safe to share between concurrent trials.

Loading a scan (NIfTI, gzip) and preprocessing it (crop, pad, z-score) costs the same in every trial, so
each result is kept as plain ``.npy`` arrays with a JSON description. Nothing is ever unpickled: arrays
are read with ``allow_pickle=False`` and metadata is JSON. An entry's name is a sha256 over everything
that determines its content (each source file's resolved path, size and modification time, modalities,
rater, patch size, the cache format and MONAI's version), so a changed input never hits a stale entry.
Entries are written to a temporary folder and renamed into place; a reader sees a whole entry or none.
An entry that does not match its description (truncated, wrong shape or dtype, object arrays) is
discarded and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import monai
import numpy as np

from .cohort import CohortError, LoadedScan, Scan, check_choices, load_scan
from .transforms import preprocessing_transforms

log = logging.getLogger(__name__)

# Raise whenever the preprocessing or the entry layout changes: every older entry then misses.
CACHE_FORMAT_VERSION = 1
_DESCRIPTION = "entry.json"
# Name and dtype of each array of an entry, in the order they are written.
_ARRAYS = {"image": np.dtype(np.float32), "label": np.dtype(np.uint8)}
_PARTIAL_PREFIX = ".partial-"
_DISCARDED_PREFIX = ".discarded-"


@dataclass(frozen=True)
class PreparedScan:
    """A scan after training preprocessing: ``image`` (C, X, Y, Z) float32, ``label`` (1, X, Y, Z) uint8 in {0, 1}."""

    image: np.ndarray
    label: np.ndarray


class _UnusableEntry(Exception):
    """A cache entry that cannot be trusted; the message says why."""


def prepare_loaded_scan(loaded: LoadedScan, patch_size: Sequence[int]) -> PreparedScan:
    """The training preprocessing of a scan already in memory."""
    prepared = preprocessing_transforms(patch_size)({"image": loaded.image, "label": loaded.mask[np.newaxis]})
    return PreparedScan(image=prepared["image"].numpy(), label=prepared["label"].numpy().astype(np.uint8))


def prepare_training_scan(scan: Scan, modalities: Sequence[str], rater: int, patch_size: Sequence[int]) -> PreparedScan:
    """Load one scan and run the training preprocessing on it (no cache)."""
    return prepare_loaded_scan(load_scan(scan, modalities, rater), patch_size)


def cache_key(scan: Scan, modalities: Sequence[str], rater: int, patch_size: Sequence[int]) -> str:
    """sha256 (hex) of everything that determines the prepared scan."""
    chosen = check_choices(modalities, rater)
    missing = [name for name in chosen if name not in scan.images]
    missing += [f"mask{rater}"] if rater not in scan.masks else []
    if missing:
        raise CohortError(f"scan {scan.scan_id} lacks {', '.join(missing)}")
    files = []
    for path in [scan.images[name] for name in chosen] + [scan.masks[rater]]:
        try:
            resolved = Path(path).resolve()
            status = resolved.stat()
        except OSError as error:
            raise CohortError(f"cannot read {path}: {error.strerror}") from error
        files.append([str(resolved), status.st_size, status.st_mtime_ns])
    identity = {
        "format": CACHE_FORMAT_VERSION,
        # MONAI's transforms do the preprocessing; another version may round or pad differently.
        "monai": monai.__version__,
        "files": files,
        "modalities": list(chosen),
        "rater": rater,
        "patch_size": [int(side) for side in patch_size],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_training_scan(
    scan: Scan, modalities: Sequence[str], rater: int, patch_size: Sequence[int], cache_dir: str | Path
) -> PreparedScan:
    """The prepared scan from ``cache_dir`` if a valid entry exists; otherwise prepared, stored and returned."""
    cache_dir = Path(cache_dir)
    key = cache_key(scan, modalities, rater, patch_size)
    entry = cache_dir / f"{scan.scan_id}-{key}"
    if entry.is_dir():
        try:
            return _read_entry(entry, key)
        except _UnusableEntry as problem:
            log.warning("discarding cache entry %s: %s", entry, problem)
            _discard(entry, cache_dir)
    prepared = prepare_training_scan(scan, modalities, rater, patch_size)
    _write_entry(entry, key, prepared, cache_dir)
    return prepared


def _read_entry(entry: Path, key: str) -> PreparedScan:
    try:
        description = json.loads((entry / _DESCRIPTION).read_text())
        if description["format"] != CACHE_FORMAT_VERSION or description["key"] != key:
            raise _UnusableEntry(f"{_DESCRIPTION} describes format {description['format']}, key {description['key']}")
        arrays = {}
        for name, dtype in _ARRAYS.items():
            path = entry / f"{name}.npy"
            array = np.load(path, allow_pickle=False)
            shape = tuple(description["arrays"][name]["shape"])
            if array.dtype != dtype or array.shape != shape:
                raise _UnusableEntry(f"{path} holds {array.dtype} {array.shape}, expected {dtype} {shape}")
            arrays[name] = array
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        # ValueError covers truncated arrays, object arrays (refused without pickle) and malformed JSON.
        raise _UnusableEntry(f"{type(error).__name__}: {' '.join(str(error).split())}") from error
    if arrays["image"].ndim != 4 or arrays["label"].shape != (1, *arrays["image"].shape[1:]):
        raise _UnusableEntry(f"image {arrays['image'].shape} and label {arrays['label'].shape} are not one grid")
    return PreparedScan(**arrays)


def _write_entry(entry: Path, key: str, prepared: PreparedScan, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=cache_dir))
    try:
        description = {"format": CACHE_FORMAT_VERSION, "key": key, "arrays": {}}
        for name, dtype in _ARRAYS.items():
            array = np.ascontiguousarray(getattr(prepared, name), dtype=dtype)
            np.save(partial / f"{name}.npy", array, allow_pickle=False)
            description["arrays"][name] = {"shape": list(array.shape), "dtype": dtype.str}
        (partial / _DESCRIPTION).write_text(json.dumps(description, indent=1))
        try:
            os.rename(partial, entry)
        except OSError:
            # Another process renamed its own complete entry into place first; keep that one.
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _discard(entry: Path, cache_dir: Path) -> None:
    # Renamed aside first (atomic), so no other process can read it half-deleted.
    aside = Path(tempfile.mkdtemp(prefix=_DISCARDED_PREFIX, dir=cache_dir))
    with contextlib.suppress(FileNotFoundError):  # another process discarded it already
        os.replace(entry, aside / entry.name)
    shutil.rmtree(aside, ignore_errors=True)
