from __future__ import annotations

import pytest

from msx.models.data.cohort import find_isbi_cohort
from msx.models.data.folds import FOLD_PLANS, Fold, check_folds, resolve_folds
from msx.models.data.synth import write_synthetic_cohort
from msx.models.registry import UnknownNameError

# Table 1 of the paper, typed in from SCIENCE.md: fold -> (train, validation, test).
PAPER_TABLE = {
    1: ((1, 2, 3), (4,), (5,)),
    2: ((1, 2, 5), (3,), (4,)),
    3: ((1, 4, 5), (2,), (3,)),
    4: ((3, 4, 5), (1,), (2,)),
    5: ((2, 3, 4), (5,), (1,)),
}


@pytest.fixture(scope="module")
def synthetic_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("isbi")
    write_synthetic_cohort(root, patients=5, shape=(16, 16, 16), seed=3)
    return find_isbi_cohort(root)


PAPER_PATIENTS = (1, 2, 3, 4, 5)


def _assert_each_patient_in_one_split_per_fold(folds, patients):
    for fold in folds:
        assert sorted(fold.train + fold.validation + fold.test) == sorted(patients), f"fold {fold.index}"


def test_paper_plan_is_table_1():
    folds = resolve_folds("paper", PAPER_PATIENTS)
    assert {f.index: (f.train, f.validation, f.test) for f in folds} == PAPER_TABLE
    assert [f.index for f in folds] == [1, 2, 3, 4, 5]
    assert "paper" in FOLD_PLANS


def test_paper_plan_is_leave_one_subject_out():
    folds = resolve_folds("paper", PAPER_PATIENTS)
    assert sorted(p for f in folds for p in f.test) == [1, 2, 3, 4, 5]
    assert sorted(p for f in folds for p in f.validation) == [1, 2, 3, 4, 5]
    for fold in folds:
        assert sorted(fold.train + fold.validation + fold.test) == [1, 2, 3, 4, 5]


def test_unknown_plan_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown fold plan 'lopo'; valid names: loso, paper"):
        resolve_folds("lopo", PAPER_PATIENTS)


def test_paper_plan_ignores_the_cohort_and_check_folds_names_what_is_missing():
    folds = resolve_folds("paper", (1, 2, 3, 7))
    assert {f.index: (f.train, f.validation, f.test) for f in folds} == PAPER_TABLE
    with pytest.raises(ValueError, match=r"fold 1 validation uses patients \[4\] that the cohort lacks"):
        check_folds(folds, (1, 2, 3, 7))


def test_loso_on_patients_1_to_5_is_table_1():
    folds = resolve_folds("loso", [5, 3, 1, 4, 2])
    assert {f.index: (f.train, f.validation, f.test) for f in folds} == PAPER_TABLE
    assert folds == resolve_folds("paper", PAPER_PATIENTS)


@pytest.mark.parametrize("count", range(3, 9))
def test_loso_tests_and_validates_each_patient_exactly_once(count):
    patients = tuple(range(10, 10 + 3 * count, 3))  # not 1..k: any patient numbers work
    folds = resolve_folds("loso", patients)
    assert [f.index for f in folds] == list(range(1, count + 1))
    check_folds(folds, patients)
    _assert_each_patient_in_one_split_per_fold(folds, patients)
    assert all(len(f.test) == 1 and len(f.validation) == 1 for f in folds)
    assert sorted(p for f in folds for p in f.test) == list(patients)
    assert sorted(p for f in folds for p in f.validation) == list(patients)
    # Fold i tests the i-th patient from the end and validates on the one before it, wrapping round.
    assert [f.test[0] for f in folds] == list(reversed(patients))
    assert [f.validation[0] for f in folds] == [*reversed(patients[:-1]), patients[-1]]


def test_loso_needs_three_patients():
    with pytest.raises(ValueError, match=r"fold plan 'loso' needs at least 3 patients .*the cohort has \[2, 7\]"):
        resolve_folds("loso", (7, 2, 2))


def test_explicit_folds_are_numbered_by_position():
    explicit = [
        Fold(index=9, train=(1, 2, 6), validation=(3,), test=(4,)),
        Fold(index=9, train=[3, 4], validation=[6], test=[1, 2]),
    ]
    folds = resolve_folds(explicit, patients=(1, 2, 3, 4, 6))
    assert folds == (
        Fold(index=1, train=(1, 2, 6), validation=(3,), test=(4,)),
        Fold(index=2, train=(3, 4), validation=(6,), test=(1, 2)),
    )
    check_folds(folds, (1, 2, 3, 4, 6))
    _assert_each_patient_in_one_split_per_fold(folds, (1, 2, 3, 4, 6))


@pytest.mark.parametrize(
    "plan",
    [
        "paper",
        "loso",
        (Fold(0, train=(1, 2), validation=(3,), test=(4, 5)), Fold(0, train=(5,), validation=(1, 2), test=(3, 4))),
    ],
    ids=["paper", "loso", "explicit"],
)
def test_every_patients_time_points_stay_in_one_split(synthetic_cohort, plan):
    cohort = synthetic_cohort
    assert len(cohort.scans) == 21
    folds = resolve_folds(plan, cohort.patients)
    check_folds(folds, cohort.patients)
    for fold in folds:
        split_of_scan = {}
        for split in ("train", "validation", "test"):
            for scan in cohort.scans_of(getattr(fold, split)):
                assert scan.scan_id not in split_of_scan
                split_of_scan[scan.scan_id] = split
        assert len(split_of_scan) == 21, f"fold {fold.index} leaves scans out"
        for patient in cohort.patients:
            splits = {split_of_scan[s.scan_id] for s in cohort.scans if s.patient == patient}
            assert len(splits) == 1, f"fold {fold.index} splits patient {patient} across {splits}"
    # Patient 3 has five time points, all in the test split of the fold that tests it.
    (testing_3,) = [fold for fold in folds if 3 in fold.test]
    assert [s.timepoint for s in cohort.scans_of([3])] == [1, 2, 3, 4, 5]
    assert {s.scan_id for s in cohort.scans_of([3])} <= {s.scan_id for s in cohort.scans_of(testing_3.test)}


def test_fold_using_a_patient_the_cohort_lacks():
    with pytest.raises(ValueError, match=r"fold 1 test uses patients \[5\] that the cohort lacks"):
        check_folds(resolve_folds("paper", (1, 2, 3, 4)), patients=(1, 2, 3, 4))


@pytest.mark.parametrize(
    ("fold", "message"),
    [
        (Fold(7, train=(1, 2), validation=(2,), test=(3,)), "fold 7 has patient 2 in train and validation"),
        (Fold(8, train=(1, 2), validation=(4,), test=(1,)), "fold 8 has patient 1 in train and test"),
        (Fold(9, train=(1,), validation=(3,), test=(3,)), "fold 9 has patient 3 in validation and test"),
        (Fold(2, train=(1, 1), validation=(2,), test=(3,)), "fold 2 has patient 1 twice in train"),
    ],
)
def test_patient_in_two_splits_of_one_fold(fold, message):
    good = Fold(1, train=(1, 2), validation=(3,), test=(4,))
    check_folds([good], patients=range(1, 5))
    with pytest.raises(ValueError, match=message):
        check_folds([good, fold], patients=range(1, 5))
