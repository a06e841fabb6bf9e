"""What a registered model was made from: a fingerprint of the study's data, and the code version.

Both are computed once, before Ray starts, and travel to registration, where they become version tags:
the champion alias only moves between versions selected on the same data (see registry.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from msx.models.data.cohort import Cohort
from msx.models.data.folds import Fold

HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Provenance:
    data_fingerprint: str
    code_version: str


def study_provenance(cohort: Cohort, folds: Sequence[Fold]) -> Provenance:
    return Provenance(cohort_fingerprint(cohort, folds), code_version())


def cohort_fingerprint(cohort: Cohort, folds: Sequence[Fold]) -> str:
    """sha256 (hex) of the scans' files the study reads, its modalities, rater and folds.

    Only the chosen modalities and the chosen rater's masks count, so other files beside them (the other
    rater, an unused modality, notes) leave it unchanged. File names but not folders count: the same
    files copied elsewhere fingerprint the same.
    """
    scans = sorted(cohort.scans, key=lambda scan: (scan.patient, scan.timepoint))
    document = {
        "modalities": list(cohort.modalities),
        "rater": cohort.rater,
        "folds": [
            {
                "fold": fold.index, "train": list(fold.train), "validation": list(fold.validation),
                "test": list(fold.test)
            }
            for fold in folds
        ],
        "scans": [
            {
                "patient": scan.patient,
                "timepoint": scan.timepoint,
                "files": [_file_record(scan.images[modality]) for modality in cohort.modalities]
                + ([_file_record(scan.masks[cohort.rater])] if cohort.rater is not None else []),
            }
            for scan in scans
        ],
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _file_record(path: Path) -> dict[str, str | int]:
    content = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            content.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "sha256": content.hexdigest()}


def code_version() -> str:
    """"msx VERSION", plus the git commit when msx runs from a git checkout ("+ uncommitted changes" if dirty)."""
    version = f"msx {importlib.metadata.version('msx')}"
    source = Path(__file__).resolve().parent
    commit = _git(source, "rev-parse", "HEAD")
    # An installed copy inside some checkout's ignored folder (a .venv) is not that checkout's code.
    if commit is None or _git(source, "check-ignore", "-q", ".") is not None:
        return version
    changes = _git(source, "status", "--porcelain", "--untracked-files=no")
    return f"{version}, git {commit}{' + uncommitted changes' if changes else ''}"


def _git(folder: Path, *arguments: str) -> str | None:
    """git's stripped output in `folder`; None when git is missing, fails, or `folder` is not in a checkout."""
    try:
        result = subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
