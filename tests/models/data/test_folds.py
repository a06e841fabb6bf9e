from __future__ import annotations

import pytest

from msx.models.data.cohort import find_isbi_cohort
from msx.models.data.folds import FOLD_PLANS, Fold, check_folds, fold_plan
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


def test_paper_plan_is_table_1():
    folds = fold_plan("paper")
    assert {f.index: (f.train, f.validation, f.test) for f in folds} == PAPER_TABLE
    assert [f.index for f in folds] == [1, 2, 3, 4, 5]
    assert "paper" in FOLD_PLANS


def test_paper_plan_is_leave_one_subject_out():
    folds = fold_plan("paper")
    assert sorted(p for f in folds for p in f.test) == [1, 2, 3, 4, 5]
    assert sorted(p for f in folds for p in f.validation) == [1, 2, 3, 4, 5]
    for fold in folds:
        assert sorted(fold.train + fold.validation + fold.test) == [1, 2, 3, 4, 5]


def test_unknown_plan_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown fold plan 'lopo'; valid names: .*paper"):
        fold_plan("lopo")


def test_every_patients_time_points_stay_in_one_split(synthetic_cohort):
    cohort = synthetic_cohort
    assert len(cohort.scans) == 21
    folds = fold_plan("paper")
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
    # Patient 3 has five time points, all in fold 3's test split.
    fold_3 = folds[2]
    assert [s.timepoint for s in cohort.scans_of(fold_3.test)] == [1, 2, 3, 4, 5]


def test_fold_using_a_patient_the_cohort_lacks():
    with pytest.raises(ValueError, match=r"fold 1 test uses patients \[5\] that the cohort lacks"):
        check_folds(fold_plan("paper"), patients=(1, 2, 3, 4))


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
