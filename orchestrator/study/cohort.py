"""The study's cohort, resolved and checked before any cluster work starts."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from msx.models.data.cohort import Cohort, CohortError
from msx.models.data.folds import check_folds, resolve_folds
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.data.validation import check_cohort

from ..spec import ExperimentSpec


def prepare_cohort(spec: ExperimentSpec, data: Path | None, storage: Path, echo: Callable[[str], None]) -> Cohort:
    """The cohort the study trains on, checked against its folds; a synthetic one is made if none is given.

    ``data`` (else the spec's ``data.path``) is a cohort folder or a manifest file. Runs before Ray starts,
    so bad input fails in seconds with the offending file or field named.
    """
    root = data if data is not None else (Path(spec.data.path) if spec.data.path else None)
    if root is None:
        synthetic = spec.data.synthetic
        shape = "x".join(map(str, synthetic.shape))
        root = storage / "data" / f"synthetic-{synthetic.patients}p-{shape}-seed{synthetic.seed}"
        if not root.is_dir():
            echo(f"writing a synthetic cohort ({synthetic.patients} patients, {shape} voxels) to {root}")
            root.parent.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
            write_synthetic_cohort(partial, patients=synthetic.patients, shape=synthetic.shape, seed=synthetic.seed)
            partial.rename(root)
    # Absolute: trials reopen the cohort from its root in worker processes with another working folder.
    cohort = open_cohort(root.absolute(), spec.data.modalities, spec.data.rater)
    folds = resolve_folds(spec.data.folds, cohort.patients)
    check_folds(folds, cohort.patients)
    report = check_cohort(cohort, folds)
    check_command = _check_command(root, spec)
    if report.errors:
        more = len(report.errors) - 1
        others = f" ... and {more} more problem{'s' if more != 1 else ''}" if more else ""
        raise CohortError(f"{report.errors[0]}{others}; run `{check_command}`")
    if report.warnings:
        echo(f"{len(report.warnings)} data warnings (run `{check_command}` to list them)")
    return cohort


def _check_command(root: Path, spec: ExperimentSpec) -> str:
    """The `msx data check` line that checks the cohort with the study's own choices."""
    command = f"msx data check {root} --modalities {','.join(spec.data.modalities)} --rater {spec.data.rater}"
    # Explicit fold lists live only in the spec; the check's fold-free findings still apply to them.
    return f"{command} --folds {spec.data.folds}" if isinstance(spec.data.folds, str) else command
