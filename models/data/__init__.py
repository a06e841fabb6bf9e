"""Data layer: cohorts on disk (ISBI 2015 layout or a manifest), patient folds, synthetic patients and MONAI transforms.

The MONAI transforms live in ``msx.models.data.transforms`` and are not re-exported here, because
importing MONAI's transforms takes seconds and listing or checking a cohort should not pay for it.
"""

from .cohort import (
    DEFAULT_MODALITIES,
    MODALITIES,
    Cohort,
    CohortError,
    LoadedScan,
    Scan,
    find_isbi_cohort,
    load_scan,
)
from .folds import FOLD_PLANS, Fold, check_folds, resolve_folds
from .manifest import open_cohort, read_manifest
from .synth import write_synthetic_cohort

__all__ = [
    "DEFAULT_MODALITIES",
    "FOLD_PLANS",
    "MODALITIES",
    "Cohort",
    "CohortError",
    "Fold",
    "LoadedScan",
    "Scan",
    "check_folds",
    "find_isbi_cohort",
    "load_scan",
    "open_cohort",
    "read_manifest",
    "resolve_folds",
    "write_synthetic_cohort",
]
