"""Patient-level cross-validation plans (leave one subject out).

Folds split patients, never scans: all time points of a patient stay in one split, so a test
patient's earlier scans cannot leak into training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..registry import Registry


@dataclass(frozen=True)
class Fold:
    """Patients used to train, to select models and configurations (validation), and to report (test)."""

    index: int
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]


FOLD_PLANS: Registry[Callable[[], tuple[Fold, ...]]] = Registry("fold plan")


@FOLD_PLANS.register("paper")
def paper_folds() -> tuple[Fold, ...]:
    """The comparative MSSegDiff study's Table 1 on the five ISBI 2015 training patients."""
    return (
        Fold(index=1, train=(1, 2, 3), validation=(4,), test=(5,)),
        Fold(index=2, train=(1, 2, 5), validation=(3,), test=(4,)),
        Fold(index=3, train=(1, 4, 5), validation=(2,), test=(3,)),
        Fold(index=4, train=(3, 4, 5), validation=(1,), test=(2,)),
        Fold(index=5, train=(2, 3, 4), validation=(5,), test=(1,)),
    )


def fold_plan(name: str) -> tuple[Fold, ...]:
    """The folds of a registered plan; an unknown name raises an error listing the valid plans."""
    return FOLD_PLANS.get(name)()


def check_folds(folds: Sequence[Fold], patients: Iterable[int]) -> None:
    """Raise ValueError if a fold names a patient the cohort lacks or puts one patient in two splits."""
    available = set(patients)
    for fold in folds:
        splits = {"train": fold.train, "validation": fold.validation, "test": fold.test}
        seen: dict[int, str] = {}
        for split, members in splits.items():
            absent = sorted(set(members) - available)
            if absent:
                raise ValueError(
                    f"fold {fold.index} {split} uses patients {absent} that the cohort lacks "
                    f"(cohort patients: {sorted(available)})"
                )
            for patient in members:
                if patient in seen:
                    where = "twice in " + split if seen[patient] == split else f"in {seen[patient]} and {split}"
                    raise ValueError(f"fold {fold.index} has patient {patient} {where}")
                seen[patient] = split
