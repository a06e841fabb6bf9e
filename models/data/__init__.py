"""Data layer: the ISBI 2015 cohort on disk, patient folds, synthetic patients and MONAI transforms.

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
from .folds import FOLD_PLANS, Fold, check_folds, fold_plan
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
    "fold_plan",
    "load_scan",
    "write_synthetic_cohort",
]
