"""The study's cohort, resolved and checked before any cluster work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from msx.models.data.cohort import Cohort, find_isbi_cohort
from msx.models.data.folds import check_folds, fold_plan
from msx.models.data.synth import write_synthetic_cohort

from .spec import ExperimentSpec


def prepare_cohort(spec: ExperimentSpec, data: Path | None, storage: Path, echo: Callable[[str], None]) -> Cohort:
    """The cohort the study trains on, checked against the fold plan; a synthetic one is made if none is given.

    Runs before Ray starts, so bad input fails in seconds with the offending file or field named.
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
    cohort = find_isbi_cohort(root, spec.data.modalities, spec.data.rater)
    check_folds(fold_plan(spec.data.folds), cohort.patients)
    return cohort
