"""Cohorts described by a manifest file, and :func:`open_cohort`, the one way msx opens any cohort.

A manifest lists one scan per row: CSV with a header row, or YAML (a list of mappings, or a mapping
whose ``scans`` key holds that list). Fields: ``patient`` and ``timepoint`` (positive integers), one
path per modality (``flair``, ``mprage``, ``t2``, ``pd``) and per rater mask (``mask1``, ``mask2``;
``mask`` is another name for ``mask1``). Only the study's modalities and its rater's mask are
required; other fields may be absent or empty. Relative paths are relative to the manifest's folder.
The result is the same :class:`~msx.models.data.cohort.Cohort` that ISBI discovery gives, with the
manifest as its root. Nothing the manifest names is ever written.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cohort import (
    DEFAULT_MODALITIES,
    MODALITIES,
    RATERS,
    Cohort,
    CohortError,
    Scan,
    check_choices,
    find_isbi_cohort,
)

CSV_SUFFIXES = (".csv",)
YAML_SUFFIXES = (".yaml", ".yml")
MANIFEST_SUFFIXES = CSV_SUFFIXES + YAML_SUFFIXES

_IDENTITY = ("patient", "timepoint")
_MASK_FIELDS = {f"mask{rater}": rater for rater in RATERS}
_ALIASES = {"mask": "mask1"}
_FIELDS = (*_IDENTITY, *MODALITIES, *_MASK_FIELDS)
_VALID_FIELDS = f"{', '.join(_FIELDS)} (mask is another name for mask1)"
_DIGITS = re.compile(r"[0-9]+")
# Why each identity field must be a positive integer, for the error messages.
_NUMBER_REASON = {
    "patient": "fold plans refer to patients by number",
    "timepoint": "time points are numbered 1, 2, ... per patient",
}


@dataclass(frozen=True)
class ManifestContents:
    """The scans of a manifest's usable rows, and one line per row that is not (naming file, row and field)."""

    scans: tuple[Scan, ...]
    problems: tuple[str, ...]


def open_cohort(path: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, rater: int | None = 1) -> Cohort:
    """A folder (ISBI files found by name) or a manifest file (.csv, .yaml, .yml) as a checked cohort.

    ``rater`` None: masks are optional (new scans to segment). Raises CohortError naming the problem.
    """
    path = Path(path)
    if path.is_dir():
        return find_isbi_cohort(path, modalities, rater)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest(path, modalities, rater)
    problem = "does not exist" if not path.exists() else "is neither a folder nor a manifest"
    raise CohortError(
        f"cohort {path} {problem}: give a folder of ISBI-named files or a manifest ({', '.join(MANIFEST_SUFFIXES)})"
    )


def read_manifest(path: str | Path, modalities: Sequence[str] = DEFAULT_MODALITIES, rater: int | None = 1) -> Cohort:
    """The cohort a manifest describes; the first problem found raises CohortError (see :func:`parse_manifest`)."""
    path = Path(path)
    chosen = check_choices(modalities, rater)
    contents = parse_manifest(path, chosen, rater)
    if contents.problems:
        more = len(contents.problems) - 1
        others = f" (and {more} more problem{'s' if more != 1 else ''} in the manifest)" if more else ""
        raise CohortError(contents.problems[0] + others)
    return Cohort(root=path, modalities=chosen, rater=rater, scans=contents.scans)


def parse_manifest(path: str | Path, modalities: Sequence[str], rater: int | None) -> ManifestContents:
    """Every row of a manifest checked: the scans of good rows, a problem line for each bad one.

    A file that cannot be used at all (unreadable, unparseable, empty, unknown or missing columns)
    raises CohortError. Row problems: a patient or time point that is not a positive integer, a
    required path that is missing or empty, a file that does not exist, a repeated (patient, time point).
    """
    path = Path(path)
    chosen = check_choices(modalities, rater)
    required = (*_IDENTITY, *chosen, *([f"mask{rater}"] if rater is not None else []))
    if not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a file"
        raise CohortError(f"manifest {path} {problem}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets often start CSV with a BOM
    except UnicodeDecodeError as error:
        raise CohortError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise CohortError(f"{path}: cannot read manifest: {error.strerror}") from None
    if path.suffix.lower() in CSV_SUFFIXES:
        rows, problems = _csv_rows(path, text, required)
    else:
        rows, problems = _yaml_rows(path, text), []

    scans: dict[tuple[int, int], Scan] = {}
    first_row: dict[tuple[int, int], str] = {}
    for where, fields in rows:
        try:
            scan = _scan_of_row(path, where, fields, required)
        except CohortError as problem:
            problems.append(str(problem))
            continue
        key = (scan.patient, scan.timepoint)
        if key in scans:
            problems.append(
                f"{path}: {where}: patient, timepoint: patient {scan.patient} time point {scan.timepoint} "
                f"is already listed at {first_row[key]}"
            )
            continue
        scans[key] = scan
        first_row[key] = where
    if not scans and not problems:
        raise CohortError(f"{path}: empty manifest: it lists no scans")
    return ManifestContents(scans=tuple(scans[key] for key in sorted(scans)), problems=tuple(problems))


def _csv_rows(path: Path, text: str, required: Sequence[str]) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """(``line N``, fields) per non-blank data row, and a problem per row of the wrong length.

    Raises CohortError for a file that cannot be used: unparseable, no header, unknown or missing columns.
    """
    # newline="": line numbers count the file's lines, whatever its line endings (csv's own advice).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[str, dict[str, str]]] = []
    problems: list[str] = []
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise CohortError(
                f"{path}: empty manifest: expected a header row such as patient,timepoint,{','.join(required[2:])}"
            )
        columns = _canonical_names(header, path, "line 1 (header)", "column")
        for name in required:
            if name not in columns:
                raise CohortError(f"{path}: line 1 (header): {name}: missing column{_requirement(name)}")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"line {reader.line_num}"
            if len(row) == len(columns):
                rows.append((where, dict(zip(columns, row, strict=True))))
            else:
                problems.append(f"{path}: {where}: {len(row)} values but the header has {len(columns)} columns")
    except csv.Error as error:
        raise CohortError(f"{path}: line {reader.line_num}: unparseable CSV: {error}") from None
    return rows, problems


def _yaml_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """(``item N (line L)``, fields) per listed scan; raises CohortError for a file that is not a scan list."""
    loader = yaml.SafeLoader(text)
    try:
        document = loader.get_single_node()
        data = loader.construct_document(document) if document is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise CohortError(f"{path}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()

    items_node = document
    if isinstance(data, dict):
        unknown = sorted(map(str, set(data) - {"scans"}))
        if unknown:
            raise CohortError(f"{path}: {unknown[0]}: unknown top-level key; a manifest mapping holds only 'scans'")
        if "scans" not in data:
            raise CohortError(f"{path}: scans: missing key (the list of scans)")
        items_node = next(value for key, value in document.value if key.value == "scans")
        data = data["scans"]
    if data is None or data == []:
        raise CohortError(f"{path}: empty manifest: it lists no scans")
    if not isinstance(data, list):
        raise CohortError(
            f"{path}: expected a list of scans (or a mapping with key 'scans' holding one), got {type(data).__name__}"
        )
    return [
        (f"item {index} (line {node.start_mark.line + 1})", item)
        for index, (node, item) in enumerate(zip(items_node.value, data, strict=True), start=1)
    ]


def _scan_of_row(path: Path, where: str, fields: Any, required: Sequence[str]) -> Scan:
    """The scan one row describes; CohortError names the file, the row and the field at fault."""
    if not isinstance(fields, dict):
        raise CohortError(
            f"{path}: {where}: expected a mapping of fields ({_VALID_FIELDS}), got {type(fields).__name__}"
        )
    values = dict(zip(_canonical_names(list(fields), path, where, "field"), fields.values(), strict=True))
    given = {name: value for name, value in values.items() if not _is_empty(value)}
    for name in required:
        if name not in given:
            raise CohortError(f"{path}: {where}: {name}: missing or empty{_requirement(name)}")

    patient, timepoint = (_positive_int(path, where, name, given[name]) for name in _IDENTITY)
    files = {name: _existing_file(path, where, name, value) for name, value in given.items() if name not in _IDENTITY}
    return Scan(
        patient=patient,
        timepoint=timepoint,
        images={name: files[name] for name in MODALITIES if name in files},
        masks={rater: files[name] for name, rater in _MASK_FIELDS.items() if name in files},
    )


def _canonical_names(names: Sequence[Any], path: Path, where: str, noun: str) -> list[str]:
    """Field names lower-cased, ``mask`` read as ``mask1``; unknown or repeated names raise CohortError."""
    canonical: list[str] = []
    for name in names:
        key = str(name).strip().lower()
        if key not in _FIELDS and key not in _ALIASES:
            raise CohortError(f"{path}: {where}: {name}: unknown {noun}; valid {noun}s: {_VALID_FIELDS}")
        key = _ALIASES.get(key, key)
        if key in canonical:
            raise CohortError(f"{path}: {where}: {name}: {key} is given twice")
        canonical.append(key)
    return canonical


def _requirement(name: str) -> str:
    if name in _MASK_FIELDS:
        return f" (the study's ground truth is rater {_MASK_FIELDS[name]}'s mask)"
    if name in MODALITIES:
        return f" (the study uses {name})"
    return f" ({_NUMBER_REASON[name]})"


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _positive_int(path: Path, where: str, name: str, value: Any) -> int:
    number = int(value) if isinstance(value, str) and _DIGITS.fullmatch(value.strip()) else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise CohortError(f"{path}: {where}: {name}: {value!r} is not a positive integer ({_NUMBER_REASON[name]})")
    return number


def _existing_file(path: Path, where: str, name: str, value: Any) -> Path:
    if not isinstance(value, str):
        raise CohortError(f"{path}: {where}: {name}: expected a file path, got {value!r}")
    file = Path(value.strip()).expanduser()
    file = file if file.is_absolute() else path.parent / file
    if not file.is_file():
        problem = "does not exist" if not file.exists() else "is not a file"
        raise CohortError(f"{path}: {where}: {name}: {file} {problem}")
    return file
