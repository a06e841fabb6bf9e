from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msx.models.data.cache import PreparedScan, cache_key, cached_training_scan, prepare_training_scan
from msx.models.data.cohort import CohortError, Scan, find_isbi_cohort, load_scan
from msx.models.data.transforms import preprocessing_transforms
from tests.helpers import write_isbi_scan

SHAPE = (14, 12, 10)
PATCH = (8, 8, 8)
MODALITIES = ("flair", "t2")


def _write_scan(folder: Path, seed: int = 0) -> Scan:
    """One ISBI-named scan: a positive 'brain' box of random intensities and a small lesion in it."""
    rng = np.random.default_rng(seed)
    images = {}
    for modality in ("flair", "mprage", "t2"):
        images[modality] = np.zeros(SHAPE, np.float32)
        images[modality][2:12, 1:10, 2:9] = rng.uniform(10, 100, (10, 9, 7))
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:7, 4:6, 4:6] = 1
    write_isbi_scan(folder, 1, 1, images, {1: mask, 2: mask})
    return find_isbi_cohort(folder, MODALITIES).scans[0]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    files = (path for path in root.rglob("*") if path.is_file())
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns) for path in files}


@pytest.fixture
def scan(tmp_path) -> Scan:
    return _write_scan(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "storage" / "experiment" / "scan_cache"


def _entry(cache_dir: Path) -> Path:
    (entry,) = [path for path in cache_dir.iterdir() if not path.name.startswith(".")]
    return entry


def _assert_same(a: PreparedScan, b: PreparedScan) -> None:
    for name in ("image", "label"):
        assert getattr(a, name).dtype == getattr(b, name).dtype
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_prepared_scan_is_the_training_preprocessing(scan):
    loaded = load_scan(scan, MODALITIES, 1)
    expected = preprocessing_transforms(PATCH)({"image": loaded.image, "label": loaded.mask[np.newaxis]})
    prepared = prepare_training_scan(scan, MODALITIES, 1, PATCH)
    assert prepared.image.dtype == np.float32 and prepared.label.dtype == np.uint8
    np.testing.assert_array_equal(prepared.image, expected["image"].numpy())
    np.testing.assert_array_equal(prepared.label, expected["label"].numpy())


def test_a_miss_writes_one_entry_and_a_hit_reads_it_back(scan, cache_dir):
    first = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    _assert_same(first, prepare_training_scan(scan, MODALITIES, 1, PATCH))
    entry = _entry(cache_dir)
    assert sorted(path.name for path in cache_dir.iterdir()) == [entry.name]  # no partial folder left behind
    assert sorted(path.name for path in entry.iterdir()) == ["entry.json", "image.npy", "label.npy"]

    second = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    _assert_same(second, first)

    # A hit reads the entry rather than preparing again: a (valid) edit of the entry comes back.
    np.save(entry / "image.npy", np.full_like(first.image, 7.0))
    assert (cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir).image == 7.0).all()


def test_the_key_changes_when_a_source_file_changes(scan):
    key = cache_key(scan, MODALITIES, 1, PATCH)
    assert cache_key(scan, MODALITIES, 1, PATCH) == key

    flair = scan.images["flair"]
    status = flair.stat()
    os.utime(flair, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000))
    touched = cache_key(scan, MODALITIES, 1, PATCH)
    assert touched != key

    # Same modification time, other size: still another key.
    mask = scan.masks[1]
    mask_status = mask.stat()
    mask.write_bytes(mask.read_bytes() + b"\0")
    os.utime(mask, ns=(mask_status.st_atime_ns, mask_status.st_mtime_ns))
    assert cache_key(scan, MODALITIES, 1, PATCH) not in (key, touched)


def test_a_changed_source_file_is_prepared_again(scan, cache_dir):
    before = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    volume = np.zeros(SHAPE, np.float32)
    volume[3:11, 2:9, 2:8] = 5.0 + np.arange(8 * 7 * 6, dtype=np.float32).reshape(8, 7, 6)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), scan.images["flair"])

    after = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)

    _assert_same(after, prepare_training_scan(scan, MODALITIES, 1, PATCH))
    assert not np.array_equal(after.image[0], before.image[0])


@pytest.mark.parametrize(
    "changed",
    [
        {"modalities": ("t2", "flair")},
        {"modalities": ("flair",)},
        {"rater": 2},
        {"patch_size": (8, 8, 16)},
    ],
)
def test_the_key_changes_with_the_parameters(scan, changed):
    parameters = {"modalities": MODALITIES, "rater": 1, "patch_size": PATCH}
    assert cache_key(scan, **{**parameters, **changed}) != cache_key(scan, **parameters)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _as_float64(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float64))


def _reshaped(path: Path) -> None:
    np.save(path, np.load(path)[:, :-1])


def _object_array(path: Path) -> None:
    np.save(path, np.array([{"not": "an image"}], dtype=object), allow_pickle=True)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x93NUMPY garbage")


@pytest.mark.parametrize(
    ("file", "corrupt"),
    [
        ("image.npy", _truncate),
        ("image.npy", _as_float64),
        ("label.npy", _reshaped),
        ("image.npy", _object_array),
        ("label.npy", _garbage),
        ("image.npy", Path.unlink),
        ("entry.json", _truncate),
        ("entry.json", Path.unlink),
    ],
    ids=["truncated", "wrong-dtype", "wrong-shape", "object-dtype", "garbage", "missing", "bad-json", "no-json"],
)
def test_a_corrupt_entry_is_discarded_and_rebuilt(scan, cache_dir, file, corrupt, caplog):
    expected = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    corrupt(_entry(cache_dir) / file)

    rebuilt = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)

    _assert_same(rebuilt, expected)
    assert "discarding cache entry" in caplog.text
    assert sorted(path.name for path in cache_dir.iterdir()) == [_entry(cache_dir).name]
    _assert_same(cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir), expected)  # and it is whole again


class _MakesAFolderWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_no_pickle_is_ever_loaded(scan, cache_dir, tmp_path):
    expected = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    marker = tmp_path / "unpickled"
    entry = _entry(cache_dir)
    for name in ("image.npy", "label.npy"):
        # An entry tampered with so that unpickling it would run code (here: make a folder).
        np.save(entry / name, np.array([_MakesAFolderWhenUnpickled(marker)], dtype=object), allow_pickle=True)
    description = json.loads((entry / "entry.json").read_text())
    description["arrays"] = {name: {"shape": [1], "dtype": "|O"} for name in ("image", "label")}
    (entry / "entry.json").write_text(json.dumps(description))

    _assert_same(cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir), expected)
    assert not marker.exists()


def test_nothing_is_written_outside_the_cache_folder(scan, cache_dir, tmp_path):
    (tmp_path / "storage").mkdir()
    before = _files(tmp_path)
    cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    after = _files(tmp_path)
    written = {path for path in after if after[path] != before.get(path)}
    assert written and all(Path(tmp_path / path).is_relative_to(cache_dir) for path in written)
    assert set(before) <= set(after)


def test_a_partial_folder_left_by_a_killed_writer_is_never_read(scan, cache_dir):
    key = cache_key(scan, MODALITIES, 1, PATCH)
    partial = cache_dir / ".partial-killed"
    partial.mkdir(parents=True)
    np.save(partial / "image.npy", np.zeros((2, 3), np.float32))

    prepared = cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)

    _assert_same(prepared, prepare_training_scan(scan, MODALITIES, 1, PATCH))
    assert _entry(cache_dir).name == f"{scan.scan_id}-{key}"


def test_a_missing_source_file_is_named(scan, cache_dir):
    scan.images["flair"].unlink()
    with pytest.raises(CohortError, match=r"cannot read .*training01_01_flair_pp\.nii\.gz"):
        cached_training_scan(scan, MODALITIES, 1, PATCH, cache_dir)
    assert not cache_dir.exists()
