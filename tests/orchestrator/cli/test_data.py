from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from msx.models.data.cohort import CohortError
from msx.orchestrator.cli.data import data
from msx.orchestrator.spec import DataSpec, ExperimentSpec, spec_from_dict
from msx.orchestrator.study.cohort import prepare_cohort
from tests.helpers import save_nifti, write_isbi_cohort

SHAPE = (6, 7, 5)


def _rater_mask(patient: int, timepoint: int, rater: int) -> np.ndarray:
    """Rater 1: one 2x2x2 lesion; rater 2: the same plus one voxel."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[0:2, 0:2, 0:2] = 1
    if rater == 2:
        mask[4, 5, 3] = 1
    return mask


def _write_cohort(root: Path, patients=(1, 2, 3, 4, 5), affine=None) -> Path:
    """One scan per patient: three modalities holding the patient's number, and both raters' masks."""
    return write_isbi_cohort(
        root, patients, (1,),
        image=lambda patient, _, __: np.full(SHAPE, patient, dtype=np.float32),
        mask=_rater_mask,
        affine=affine,
    )


def _snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def invoke():
    cli = click.Group("msx")
    cli.add_command(data)
    runner = CliRunner()
    return lambda *args: runner.invoke(cli, ["data", *map(str, args)])


def test_check_of_a_clean_cohort_exits_0_with_one_ok_line(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort")
    before = _snapshot(root)
    result = invoke("check", root)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        f"OK: 5 patients, 5 scans in {root} (flair, mprage, t2, rater 1; fold plan 'paper' fits), 0 warnings"
    ]
    assert _snapshot(root) == before


def test_check_reports_every_error_and_exits_1_without_touching_files(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort")
    bad = root / "training02" / "training02_01_mask1.nii.gz"
    save_nifti(bad, np.full(SHAPE, 2, dtype=np.uint8))
    truncated = root / "training03" / "training03_01_t2_pp.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:30])
    before = _snapshot(root)
    result = invoke("check", root)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and str(bad) in errors[0] and str(truncated) in errors[1]
    assert "2 errors, 0 warnings" in result.output
    assert _snapshot(root) == before


def test_check_warnings_alone_exit_0(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort", affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    result = invoke("check", root)
    assert result.exit_code == 0
    assert sum(line.startswith("warning: ") for line in result.output.splitlines()) == 5
    assert result.output.splitlines()[-1].startswith("OK: 5 patients") and "5 warnings" in result.output


def test_check_options_choose_modalities_rater_and_folds(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort", patients=(1, 2, 3))
    result = invoke("check", root)
    assert result.exit_code == 1 and "fold plan needs patients [1, 2, 3, 4, 5]" in result.output
    (root / "training01" / "training01_01_t2_pp.nii.gz").unlink()
    (root / "training02" / "training02_01_mask1.nii.gz").unlink()
    result = invoke("check", root, "--folds", "paper", "--modalities", "flair,mprage", "--rater", "2")
    assert result.exit_code == 1 and "scan training" not in result.output and "1 error, 0 warnings" in result.output
    assert invoke("check", root, "--folds", "nope").exit_code == 2
    assert invoke("check", root, "--modalities", "flair,dwi").exit_code == 2
    assert invoke("check", tmp_path / "absent").exit_code == 2


def test_inspect_prints_per_scan_numbers_and_totals(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort", patients=(1, 2), affine=np.diag([2.0, 1.0, 1.5, 1.0]))
    before = _snapshot(root)
    result = invoke("inspect", root)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == [
        "patient", "tp", "shape", "spacing", "mm", "lesions", "r1", "mL", "r1", "lesions", "r2", "mL", "r2", "Dice",
        "r1-r2"
    ]
    # rater 1: one 8-voxel lesion; rater 2: that lesion plus a lone voxel; voxels are 3 mm^3.
    assert lines[1].split() == ["1", "1", "6x7x5", "2x1x1.5", "1", "0.02", "2", "0.03", f"{16 / 17:.3f}"]
    assert lines[2].split()[0:2] == ["2", "1"]
    assert lines[3] == (
        "total: 2 patients, 2 scans; rater 1: 2 lesions, 0.05 mL; rater 2: 4 lesions, 0.05 mL; "
        "mean inter-rater Dice 0.941 over 2 scans"
    )
    assert _snapshot(root) == before


def test_inspect_of_an_incomplete_cohort_exits_1(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort", patients=(1,))
    (root / "training01" / "training01_01_mask1.nii.gz").unlink()
    result = invoke("inspect", root)
    assert result.exit_code == 1 and "lacks mask1" in result.output and "msx data check" in result.output


def test_prepare_cohort_refuses_bad_data_naming_the_first_problem(tmp_path):
    root = _write_cohort(tmp_path / "cohort")
    spec = ExperimentSpec(name="t", data=dataclasses.replace(DataSpec(), path=str(root)))
    assert prepare_cohort(spec, None, tmp_path / "storage", print).patients == (1, 2, 3, 4, 5)
    nan = np.zeros(SHAPE, dtype=np.float32)
    nan[0, 0, 0] = np.nan
    first = save_nifti(root / "training01" / "training01_01_flair_pp.nii.gz", nan)
    save_nifti(root / "training04" / "training04_01_mask1.nii.gz", np.full(SHAPE, 5, dtype=np.uint8))
    save_nifti(root / "training05" / "training05_01_t2_pp.nii.gz", np.zeros((6, 7, 6), dtype=np.float32))
    with pytest.raises(CohortError) as error:
        prepare_cohort(spec, None, tmp_path / "storage", print)
    assert str(error.value) == (
        f"{first} contains 1 NaN or infinite voxels ... and 2 more problems; "
        f"run `msx data check {root} --modalities flair,mprage,t2 --rater 1 --folds paper`"
    )


def _manifest_rows(root: Path, patients) -> list[tuple[int, int, dict[str, Path]]]:
    """(patient, time point, files) of the scans ``_write_cohort`` wrote, paths relative to ``root``."""
    names = ("flair", "mprage", "t2")
    return [
        (p, 1, {**{n: Path(f"training{p:02d}/training{p:02d}_01_{n}_pp.nii.gz") for n in names},
                **{f"mask{r}": Path(f"training{p:02d}/training{p:02d}_01_mask{r}.nii.gz") for r in (1, 2)}})
        for p in patients
    ]


def _write_csv_manifest(root: Path, patients=(1, 2, 3, 4, 5)) -> Path:
    manifest = root / "manifest.csv"
    columns = ["flair", "mprage", "t2", "mask1", "mask2"]
    lines = ["patient,timepoint," + ",".join(columns)]
    lines += [f"{p},{t}," + ",".join(str(files[c]) for c in columns) for p, t, files in _manifest_rows(root, patients)]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_check_and_inspect_accept_a_manifest(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort")
    manifest = _write_csv_manifest(root)
    # A YAML manifest of three patients: the paper plan cannot be filled, the loso plan can.
    yaml_manifest = root / "three.yaml"
    yaml_manifest.write_text(
        "scans:\n" + "".join(
            f"  - {{patient: {p}, timepoint: {t}, " + ", ".join(f"{k}: {v}" for k, v in files.items()) + "}\n"
            for p, t, files in _manifest_rows(root, (2, 3, 4))
        )
    )
    before = _snapshot(root)
    result = invoke("check", manifest)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        f"OK: 5 patients, 5 scans in {manifest} (flair, mprage, t2, rater 1; fold plan 'paper' fits), 0 warnings"
    ]
    assert invoke("check", yaml_manifest).exit_code == 1
    assert invoke("check", yaml_manifest, "--folds", "loso").exit_code == 0
    result = invoke("inspect", yaml_manifest)
    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.output.strip().splitlines()[1:4]] == [
        ["2", "1"], ["3", "1"], ["4", "1"]
    ]
    assert result.output.strip().splitlines()[-1].startswith("total: 3 patients, 3 scans; rater 1: 3 lesions")
    assert _snapshot(root) == before


def test_check_of_a_bad_manifest_lists_every_bad_row_and_exits_1(tmp_path, invoke):
    root = _write_cohort(tmp_path / "cohort", patients=(1, 2, 3))
    manifest = _write_csv_manifest(root, patients=(1, 2, 3))
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2].replace("2,1,", "two,1,", 1)
    lines[3] = lines[3].replace("training03_01_t2_pp", "missing_t2", 1)
    manifest.write_text("\n".join(lines) + "\n")
    result = invoke("check", manifest, "--folds", "loso")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors[:2] == [
        f"error: {manifest}: line 3: patient: 'two' is not a positive integer (fold plans refer to patients by number)",
        f"error: {manifest}: line 4: t2: {root}/training03/missing_t2.nii.gz does not exist",
    ]
    # The one good row leaves one patient, too few for loso.
    assert errors[2] == (
        f"error: {manifest}: fold plan 'loso' needs at least 3 patients (one each to train, validate and test); "
        "the cohort has [1]"
    )
    result = invoke("inspect", manifest)
    assert (
        result.exit_code == 1 and "line 3: patient: 'two'" in result.output and "(and 1 more problem" in result.output
    )
    manifest.write_text("patient,timepoint,flair,mprage,t2,mask1,age\n")
    result = invoke("check", manifest)
    assert result.exit_code == 1 and f"error: {manifest}: line 1 (header): age: unknown column" in result.output
    notes = root / "notes.txt"
    notes.write_text("")
    result = invoke("check", notes)
    assert result.exit_code == 1 and "is neither a folder nor a manifest (.csv, .yaml, .yml)" in result.output


def test_prepare_cohort_opens_a_manifest_with_its_folds(tmp_path):
    root = _write_cohort(tmp_path / "cohort", patients=(2, 4, 6, 8))
    manifest = _write_csv_manifest(root, patients=(2, 4, 6, 8))
    explicit = ({"train": [2, 4], "validation": [6], "test": [8]},)
    for folds in ("loso", explicit):
        spec = spec_from_dict({"name": "t", "data": {"path": str(manifest), "folds": folds}})
        cohort = prepare_cohort(spec, None, tmp_path / "storage", print)
        assert cohort.root == manifest and cohort.patients == (2, 4, 6, 8)
    spec = spec_from_dict({"name": "t", "data": {"folds": "paper"}})
    with pytest.raises(ValueError, match=r"fold 1 train uses patients \[1, 3\] that the cohort lacks"):
        prepare_cohort(spec, manifest, tmp_path / "storage", print)
