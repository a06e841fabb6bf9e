from __future__ import annotations

import re
from pathlib import Path
from string import Template

import numpy as np
import pytest

from msx.models.data.cohort import MODALITIES, CohortError, find_isbi_cohort, load_scan
from msx.models.data.manifest import open_cohort, parse_manifest, read_manifest
from tests.models.data.test_cohort import _image_values, _mask_values, _snapshot, _write_scan

COLUMNS = "patient,timepoint,flair,mprage,t2,mask1"


def _own_named_scan(folder: Path, patient: int, timepoint: int, raters=(1, 2)) -> dict[str, Path]:
    """A scan written by test_cohort's helper, renamed as a user's own data might be (not ISBI names)."""
    files = _write_scan(folder, patient, timepoint, raters=raters)
    return {name: path.rename(folder / f"sub-{patient}_ses-{timepoint}_{name}.nii.gz") for name, path in files.items()}


def _row(patient, timepoint, columns: str = COLUMNS) -> str:
    """A CSV row naming the own-named files of ``_own_named_scan`` relative to the manifest's folder."""
    names = columns.split(",")[2:]
    return ",".join([str(patient), str(timepoint), *(f"sub-{patient}_ses-{timepoint}_{n}.nii.gz" for n in names)])


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two patients' own-named scans (patient 1 at time points 1 and 2, patient 2 at 1) in one folder."""
    for patient, timepoint in [(1, 1), (1, 2), (2, 1)]:
        _own_named_scan(tmp_path, patient, timepoint)
    return tmp_path


def _error(path: Path, text: str, modalities=("flair", "mprage", "t2"), rater=1) -> str:
    path.write_text(text)
    with pytest.raises(CohortError) as error:
        read_manifest(path, modalities, rater)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_csv_manifest_with_relative_paths_loads_like_a_cohort(folder):
    manifest = folder / "manifest.csv"
    # Rows out of order, a blank line, the pd column left empty, spaces around values.
    manifest.write_text(
        f"{COLUMNS},pd,mask2\n"
        f"{_row(2, 1)}, ,sub-2_ses-1_mask2.nii.gz\n\n"
        f"{_row(1, 2)},,\n"
        " 1 , 01 ,sub-1_ses-1_flair.nii.gz,sub-1_ses-1_mprage.nii.gz,"
        "sub-1_ses-1_t2.nii.gz,sub-1_ses-1_mask1.nii.gz,,\n"
    )
    before = _snapshot(folder)

    cohort = open_cohort(manifest)

    assert cohort.root == manifest and cohort.rater == 1 and cohort.modalities == ("flair", "mprage", "t2")
    assert [(s.patient, s.timepoint) for s in cohort.scans] == [(1, 1), (1, 2), (2, 1)]
    assert cohort.patients == (1, 2)
    first = cohort.scans[0]
    assert dict(first.images) == {name: folder / f"sub-1_ses-1_{name}.nii.gz" for name in ("flair", "mprage", "t2")}
    assert dict(first.masks) == {1: folder / "sub-1_ses-1_mask1.nii.gz"}
    assert dict(cohort.scans[2].masks) == {
        1: folder / "sub-2_ses-1_mask1.nii.gz", 2: folder / "sub-2_ses-1_mask2.nii.gz"
    }
    loaded = load_scan(cohort.scans[1], ("t2", "flair"), 1)
    np.testing.assert_array_equal(loaded.image[0], _image_values(1, 2, "t2"))
    np.testing.assert_array_equal(loaded.image[1], _image_values(1, 2, "flair"))
    np.testing.assert_array_equal(loaded.mask, _mask_values(1, 2, rater=1))
    assert _snapshot(folder) == before


def test_yaml_manifest_list_with_absolute_paths_and_the_mask_alias(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("manifests") / "cohort.yml"
    items = [
        f"- patient: {p}\n  timepoint: {t}\n  flair: {folder}/sub-{p}_ses-{t}_flair.nii.gz\n"
        f"  pd: {folder}/sub-{p}_ses-{t}_pd.nii.gz\n  mask: {folder}/sub-{p}_ses-{t}_mask1.nii.gz\n  mask2: null\n"
        for p, t in [(1, 1), (2, 1)]
    ]
    elsewhere.write_text("".join(items))

    cohort = open_cohort(elsewhere, modalities=("pd", "flair"), rater=1)

    assert cohort.root == elsewhere
    assert [s.scan_id for s in cohort.scans] == ["training01_01", "training02_01"]
    scan = cohort.scans[1]
    assert dict(scan.images) == {"flair": folder / "sub-2_ses-1_flair.nii.gz", "pd": folder / "sub-2_ses-1_pd.nii.gz"}
    loaded = load_scan(scan, cohort.modalities, cohort.rater)
    np.testing.assert_array_equal(loaded.image[0], _image_values(2, 1, "pd"))
    np.testing.assert_array_equal(loaded.mask, _mask_values(2, 1, rater=1))


def test_yaml_manifest_mapping_with_scans_key_and_rater_2(folder):
    manifest = folder / "manifest.yaml"
    manifest.write_text(
        "scans:\n"
        "  - {patient: 1, timepoint: 2, flair: sub-1_ses-2_flair.nii.gz, mask2: sub-1_ses-2_mask2.nii.gz}\n"
        "  - {patient: '2', timepoint: 1, flair: sub-2_ses-1_flair.nii.gz, mask2: sub-2_ses-1_mask2.nii.gz}\n"
    )
    cohort = read_manifest(manifest, ("flair",), rater=2)
    assert [(s.patient, s.timepoint) for s in cohort.scans] == [(1, 2), (2, 1)]
    np.testing.assert_array_equal(load_scan(cohort.scans[0], ("flair",), 2).mask, _mask_values(1, 2, rater=2))


def test_a_manifest_of_an_isbi_folder_gives_the_scans_discovery_gives(tmp_path):
    for patient, timepoint in [(1, 1), (3, 2)]:
        _write_scan(tmp_path / "isbi", patient, timepoint)
    discovered = find_isbi_cohort(tmp_path / "isbi", MODALITIES, 2)
    lines = ["patient,timepoint,flair,mprage,t2,pd,mask1,mask2"]
    for scan in discovered.scans:
        paths = [scan.images[name] for name in MODALITIES] + [scan.masks[1], scan.masks[2]]
        lines.append(",".join([str(scan.patient), str(scan.timepoint), *map(str, paths)]))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")

    from_manifest = open_cohort(manifest, MODALITIES, 2)

    assert from_manifest.scans == discovered.scans
    assert (from_manifest.modalities, from_manifest.rater) == (discovered.modalities, discovered.rater)


def test_masks_are_optional_without_a_rater(tmp_path):
    _own_named_scan(tmp_path, 4, 1, raters=())
    manifest = tmp_path / "new_scans.csv"
    manifest.write_text(f"patient,timepoint,flair,mprage,t2\n{_row(4, 1, 'patient,timepoint,flair,mprage,t2')}\n")
    assert open_cohort(manifest, rater=None).scans[0].masks == {}
    with pytest.raises(CohortError, match="mask1: missing column"):
        open_cohort(manifest, rater=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"{COLUMNS},age\n{_row(1, 1)},40\n",
            "line 1 (header): age: unknown column; valid columns: patient, timepoint, flair, mprage, t2, pd, mask1, "
            "mask2 (mask is another name for mask1)",
        ),
        (
            "patient,timepoint,flair,mprage,mask1\n1,1,a,b,c\n",
            "line 1 (header): t2: missing column (the study uses t2)"
        ),
        (
            "patient,timepoint,flair,mprage,t2,mask2\n1,1,a,b,c,d\n",
            "line 1 (header): mask1: missing column (the study's ground truth is rater 1's mask)",
        ),
        (f"{COLUMNS},mask\n{_row(1, 1)},x\n", "line 1 (header): mask: mask1 is given twice"),
        (
            f"{COLUMNS}\n{_row(1, 1)}\nP2,1,a,b,c,d\n",
            "line 3: patient: 'P2' is not a positive integer (fold plans refer to patients by number)",
        ),
        (f"{COLUMNS}\n{_row(0, 1)}\n", "line 2: patient: '0' is not a positive integer (fold plans refer to patients"),
        (
            f"{COLUMNS}\n{_row(1, 1.5)}\n",
            "line 2: timepoint: '1.5' is not a positive integer (time points are numbered"
        ),
        (f"{COLUMNS}\n{_row(1, -1)}\n", "line 2: timepoint: '-1' is not a positive integer"),
        (f"{COLUMNS}\n{_row(1, 3)}\n", "line 2: flair: {folder}/sub-1_ses-3_flair.nii.gz does not exist"),
        (f"{COLUMNS}\n1,1,..,a,b,c\n", "line 2: flair: {folder}/.. is not a file"),
        (
            f"{COLUMNS}\n{_row(1, 1)}\n{_row(1, 2)}\n{_row(1, 1)}\n",
            "line 4: patient, timepoint: patient 1 time point 1 is already listed at line 2",
        ),
        (f"{COLUMNS}\n1,1,a,b, ,d\n", "line 2: t2: missing or empty (the study uses t2)"),
        (f"{COLUMNS}\n{_row(1, 1)}\n1,2,a\n", "line 3: 3 values but the header has 6 columns"),
        (f'{COLUMNS}\n1,1,"a"b,c,d,e\n', "line 2: unparseable CSV: "),
        ("", "empty manifest: expected a header row such as patient,timepoint,flair,mprage,t2,mask1"),
        (f"{COLUMNS}\n\n", "empty manifest: it lists no scans"),
    ],
)
def test_csv_errors_name_the_file_the_line_and_the_field(folder, text, expected):
    manifest = folder / "manifest.csv"
    assert _error(manifest, text).startswith(f"{manifest}: {expected.replace('{folder}', str(folder))}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- {patient: 1, timepoint: 1\n", "invalid YAML (line 2, column 1): expected ',' or '}'"),
        ("{scans: [], subjects: []}\n", "subjects: unknown top-level key; a manifest mapping holds only 'scans'"),
        ("{other: 1}\n", "other: unknown top-level key"),
        ("{}\n", "scans: missing key"),
        ("scans: []\n", "empty manifest"),
        ("", "empty manifest"),
        ("just text\n", "expected a list of scans (or a mapping with key 'scans' holding one), got str"),
        ("scans:\n  - 7\n", "item 1 (line 2): expected a mapping of fields (patient, timepoint"),
        (
            "- {patient: 1, timepoint: 1, flair: $f, mprage: $m, t2: $t, mask1: $k}\n"
            "- {patient: 2, timepoint: 1, flair: $f, mprage: $m, t2: $t, mask1: $k, sex: f}\n",
            "item 2 (line 2): sex: unknown field; valid fields: patient, timepoint",
        ),
        (
            "- {patient: x, timepoint: 1, flair: a, mprage: b, t2: c, mask1: d}\n",
            "item 1 (line 1): patient: 'x' is not a positive integer (fold plans refer to patients by number)"
        ),
        (
            "- {patient: 2.0, timepoint: 1, flair: a, mprage: b, t2: c, mask1: d}\n",
            "item 1 (line 1): patient: 2.0 is not a positive integer"
        ),
        (
            "- {patient: true, timepoint: 1, flair: a, mprage: b, t2: c, mask1: d}\n",
            "item 1 (line 1): patient: True is not a positive integer"
        ),
        (
            "- {patient: 1, timepoint: 0, flair: a, mprage: b, t2: c, mask1: d}\n",
            "item 1 (line 1): timepoint: 0 is not a positive integer"
        ),
        (
            "- patient: 1\n  timepoint: 1\n  flair: $f\n  mprage: $m\n  mask1: $k\n",
            "item 1 (line 1): t2: missing or empty (the study uses t2)",
        ),
        (
            "- {patient: 1, timepoint: 1, flair: $f, mprage: $m, t2: 12, mask1: $k}\n",
            "item 1 (line 1): t2: expected a file path, got 12"
        ),
        (
            "- {patient: 1, timepoint: 1, flair: $f, mprage: $m, t2: $t, mask1: $k}\n"
            "- {patient: 1, timepoint: 1, flair: $f, mprage: $m, t2: $t, mask1: gone.nii}\n",
            "item 2 (line 2): mask1: {folder}/gone.nii does not exist",
        ),
        (
            "scans:\n  - {patient: 1, timepoint: 1, flair: $f, mprage: $m, t2: $t, mask1: $k}\n\n"
            "  - {patient: 1, timepoint: 1, flair: $f, mprage: $m, t2: $t, mask1: $k}\n",
            "item 2 (line 4): patient, timepoint: patient 1 time point 1 is already listed at item 1 (line 2)",
        ),
    ],
)
def test_yaml_errors_name_the_file_the_item_and_the_field(folder, text, expected):
    names = {
        key: f"sub-1_ses-1_{name}.nii.gz" for key, name in zip("fmtk", ("flair", "mprage", "t2", "mask1"), strict=True)
    }
    manifest = folder / "manifest.yaml"
    message = _error(manifest, Template(text).substitute(names))
    assert message.startswith(f"{manifest}: {expected.replace('{folder}', str(folder))}")


def test_the_first_problem_is_raised_and_the_others_counted(folder):
    manifest = folder / "manifest.csv"
    message = _error(manifest, f"{COLUMNS}\n{_row(1, 1)}\n{_row(0, 1)}\n{_row(1, 1)}\n{_row(9, 9)}\n")
    assert message.startswith(f"{manifest}: line 3: patient: '0'")
    assert message.endswith("(and 2 more problems in the manifest)")
    # parse_manifest keeps going: the good row is a scan, each bad row a problem.
    contents = parse_manifest(manifest, ("flair", "mprage", "t2"), 1)
    assert [(s.patient, s.timepoint) for s in contents.scans] == [(1, 1)]
    assert [problem.split(": ")[1] for problem in contents.problems] == ["line 3", "line 4", "line 5"]


def test_manifest_that_is_missing_not_utf8_or_of_another_kind(tmp_path):
    with pytest.raises(CohortError, match=f"^manifest {re.escape(str(tmp_path))}/absent.csv does not exist$"):
        read_manifest(tmp_path / "absent.csv")
    binary = tmp_path / "manifest.csv"
    binary.write_bytes(b"patient,timepoint\n\xff\xfe\n")
    with pytest.raises(CohortError, match=f"^{re.escape(str(binary))}: not UTF-8 text"):
        read_manifest(binary)
    other = tmp_path / "cohort.json"
    other.write_text("[]")
    with pytest.raises(
        CohortError, match=r"cohort .*cohort\.json is neither a folder nor a manifest: .*\(\.csv, \.yaml, \.yml\)$"
    ):
        open_cohort(other)
    with pytest.raises(
        CohortError, match=r"cohort .*nowhere does not exist: give a folder of ISBI-named files or a manifest"
    ):
        open_cohort(tmp_path / "nowhere")


def test_open_cohort_of_a_folder_is_isbi_discovery(tmp_path):
    _write_scan(tmp_path, 2, 1)
    assert open_cohort(tmp_path, ("flair",), 2) == find_isbi_cohort(tmp_path, ("flair",), 2)
    with pytest.raises(ValueError, match="unknown rater 3"):
        open_cohort(tmp_path / "m.csv", ("flair",), 3)
