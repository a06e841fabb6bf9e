"""Patient-level cross-validation plans (leave one subject out).

Folds split patients, never scans: all time points of a patient stay in one split, so a test
patient's earlier scans cannot leak into training. A plan is a function of the cohort's patients;
:func:`resolve_folds` turns a plan name, or folds listed explicitly, into numbered :class:`Fold` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..registry import Registry


@dataclass(frozen=True)
class Fold:
    """Patients used to train, to select models and configurations (validation), and to report (test)."""

    index: int
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]


class FoldSplits(Protocol):
    """A fold's three patient lists without its number: a :class:`Fold`, or a fold typed into a spec."""

    @property
    def train(self) -> Sequence[int]: ...

    @property
    def validation(self) -> Sequence[int]: ...

    @property
    def test(self) -> Sequence[int]: ...


# A plan maps the cohort's patients (sorted, distinct) to its folds.
FOLD_PLANS: Registry[Callable[[tuple[int, ...]], tuple[Fold, ...]]] = Registry("fold plan")


@FOLD_PLANS.register("paper")
def paper_folds(patients: tuple[int, ...]) -> tuple[Fold, ...]:
    """The comparative MSSegDiff study's Table 1 on the five ISBI 2015 training patients.

    The table is fixed whatever ``patients`` holds: :func:`check_folds` names the patients a cohort lacks.
    """
    return (
        Fold(index=1, train=(1, 2, 3), validation=(4,), test=(5,)),
        Fold(index=2, train=(1, 2, 5), validation=(3,), test=(4,)),
        Fold(index=3, train=(1, 4, 5), validation=(2,), test=(3,)),
        Fold(index=4, train=(3, 4, 5), validation=(1,), test=(2,)),
        Fold(index=5, train=(2, 3, 4), validation=(5,), test=(1,)),
    )


@FOLD_PLANS.register("loso")
def loso_folds(patients: tuple[int, ...]) -> tuple[Fold, ...]:
    """Leave one subject out for k >= 3 patients p_1 < ... < p_k, one fold per patient.

    Fold i tests p_(k-i+1), validates on the patient before it (p_(k-i), wrapping round to p_k) and
    trains on the rest, so every patient is tested once and validates once. On patients 1..5 this is
    exactly the paper's Table 1.
    """
    ordered = sorted(set(patients))
    if len(ordered) < 3:
        raise ValueError(
            f"fold plan 'loso' needs at least 3 patients (one each to train, validate and test); "
            f"the cohort has {ordered}"
        )
    count = len(ordered)
    folds = []
    for index in range(1, count + 1):
        test = ordered[count - index]
        # For the last fold this is ordered[-1]: the validation patient wraps round to p_k.
        validation = ordered[count - index - 1]
        train = tuple(p for p in ordered if p not in (test, validation))
        folds.append(Fold(index=index, train=train, validation=(validation,), test=(test,)))
    return tuple(folds)


def resolve_folds(plan_or_folds: str | Sequence[FoldSplits], patients: Iterable[int]) -> tuple[Fold, ...]:
    """The folds of a registered plan for ``patients``, or explicit folds numbered by position from 1.

    An unknown plan name raises :class:`~msx.models.registry.UnknownNameError` listing the valid plans;
    a plan that cannot be built for these patients raises ValueError. Whether the folds fit the cohort
    is :func:`check_folds`' question.
    """
    if isinstance(plan_or_folds, str):
        return FOLD_PLANS.get(plan_or_folds)(tuple(sorted(set(patients))))
    return tuple(
        Fold(index=index, train=tuple(fold.train), validation=tuple(fold.validation), test=tuple(fold.test))
        for index, fold in enumerate(plan_or_folds, start=1)
    )


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
