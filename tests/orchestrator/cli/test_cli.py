"""The msx command line as a user runs it: bad input ends in one clear line, before Ray.

The commands run in this process (tests/helpers.run_msx); the installed script and `python -m` are run as
subprocesses once, below.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import free_port, run_msx, save_nifti


def msx(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_msx(*args, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Ray dashboard" not in result.stdout and "MLflow" not in result.stdout


# Integration: a fresh interpreter per command by design (the entry point and `python -m` as a shell runs them),
# each paying msx's imports (about 5 s of CPU).
@pytest.mark.integration
@pytest.mark.parametrize(
    "command", [[str(Path(sys.executable).parent / "msx")], [sys.executable, "-m", "msx.orchestrator.cli"]]
)
def test_msx_runs_as_the_installed_script_and_as_a_module(command, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: bad\ntraining: {epochs: 3\n")
    result = subprocess.run(
        [*command, "launch", "--space", str(space), "--storage", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert_one_line_error(result, str(space), "invalid YAML", "line")


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "no-such-cohort"
    result = msx("launch", "--data", str(missing), "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(result, str(missing))


def test_unknown_backbone(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: bad\nmodel: {backbones: [unet, vnet]}\n")
    result = msx("launch", "--space", str(space), "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(result, "model.backbones", "'vnet'", "segresnet", "unet")


def test_unknown_strategy(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: bad\ninference: {strategies: [mean, median]}\n")
    result = msx("launch", "--space", str(space), "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(result, "inference.strategies", "'median'", "uncertainty")


def test_malformed_yaml(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: bad\ntraining: {epochs: 3\n")
    result = msx("launch", "--space", str(space), "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(result, str(space), "invalid YAML", "line")
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def write_mask(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    save_nifti(path, array.astype(np.uint8), np.diag([*spacing, 1.0]))


def test_evaluate_prints_every_metric_as_json(tmp_path):
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[2:5, 2:5, 2:5] = 1  # lesion 1: 27 voxels
    gt[8:10, 8:10, 8:10] = 1  # lesion 2: 8 voxels, missed
    pred = np.zeros_like(gt)
    pred[2:5, 2:5, 2:4] = 1  # 18 voxels inside lesion 1
    pred[0, 11, 0] = 1  # a false positive lesion
    write_mask(tmp_path / "gt.nii.gz", gt)
    write_mask(tmp_path / "pred.nii.gz", pred)
    result = msx("evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert set(metrics) == {
        "pred", "gt", "connectivity", "dsc", "tpr", "ppv", "ltpr", "lfpr", "avd", "assd", "hd95", "ndsc", "lesion_f1",
        "isbi"
    }
    assert metrics["connectivity"] == 6
    assert metrics["isbi"] is None  # its volume correlation needs two scans or more
    assert metrics["dsc"] == pytest.approx(2 * 18 / (19 + 35))
    assert metrics["tpr"] == pytest.approx(18 / 35)
    assert metrics["ppv"] == pytest.approx(18 / 19)
    assert metrics["ltpr"] == pytest.approx(0.5)
    assert metrics["lfpr"] == pytest.approx(0.5)
    assert metrics["avd"] == pytest.approx(100 * 16 / 35)
    k = 0.999 * 35 / (0.001 * (12**3 - 35))
    assert metrics["ndsc"] == pytest.approx(2 * 18 / (k * 1 + 2 * 18 + 17))
    # Lesion 1 matched (IoU 18/27), lesion 2 missed, the lone voxel false: F1 = 1 / (1 + (1 + 1) / 2).
    assert metrics["lesion_f1"] == pytest.approx(0.5)


def test_evaluate_several_scans_scores_isbi_with_volume_correlation_in_mm3(tmp_path):
    # Scan i: a truth block of gt_rows x 3 x 3 voxels, a prediction block of pred_rows x 3 x 3 inside the
    # same corner, and one false positive voxel; voxel sizes differ, so volumes must be compared in mm^3.
    scans = [((0.5, 1.0, 2.5), 3, 2), ((1.0, 1.0, 1.0), 4, 4), ((1.0, 1.0, 3.0), 2, 3)]
    arguments, expected_parts, pred_volumes, gt_volumes = [], [], [], []
    for index, (spacing, gt_rows, pred_rows) in enumerate(scans):
        gt = np.zeros((10, 10, 10), np.uint8)
        gt[2 : 2 + gt_rows, 2:5, 2:5] = 1
        pred = np.zeros_like(gt)
        pred[2 : 2 + pred_rows, 2:5, 2:5] = 1
        pred[9, 9, 9] = 1
        write_mask(tmp_path / f"gt{index}.nii.gz", gt, spacing)
        write_mask(tmp_path / f"pred{index}.nii.gz", pred, spacing)
        arguments += ["--pred", f"pred{index}.nii.gz", "--gt", f"gt{index}.nii.gz"]
        overlap, pred_voxels, gt_voxels = 9 * min(gt_rows, pred_rows), 9 * pred_rows + 1, 9 * gt_rows
        dsc, ppv, ltpr, lfpr = 2 * overlap / (pred_voxels + gt_voxels), overlap / pred_voxels, 1.0, 0.5
        expected_parts.append(dsc / 8 + ppv / 8 + (1 - lfpr) / 4 + ltpr / 4)
        pred_volumes.append(pred_voxels * np.prod(spacing))
        gt_volumes.append(gt_voxels * np.prod(spacing))
    corr = np.corrcoef(pred_volumes, gt_volumes)[0, 1]

    result = msx("evaluate", *arguments, "--connectivity", "26", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(row["pred"], row["gt"], row["connectivity"]) for row in rows] == [
        (f"pred{i}.nii.gz", f"gt{i}.nii.gz", 26) for i in range(len(scans))
    ]
    assert [row["isbi"] for row in rows] == pytest.approx([part + corr / 4 for part in expected_parts])

    table = msx("evaluate", *arguments, cwd=tmp_path).stdout.splitlines()
    assert table[1].split() == [
        "prediction", "DSC", "TPR", "PPV", "LTPR", "LFPR", "AVD", "ASSD", "HD95", "NDSC", "LESION_F1", "ISBI"
    ]
    assert [line.split()[0] for line in table[2:]] == [*(f"pred{i}.nii.gz" for i in range(len(scans))), "mean"]
    assert table[-1].split()[-1] == f"{np.mean([row['isbi'] for row in rows]):.4f}"


def test_evaluate_needs_one_ground_truth_per_prediction(tmp_path):
    write_mask(tmp_path / "mask.nii.gz", np.zeros((8, 8, 8)))
    result = msx("evaluate", "--pred", "mask.nii.gz", "--pred", "mask.nii.gz", "--gt", "mask.nii.gz", cwd=tmp_path)
    assert result.returncode == 2
    assert "got 2 --pred and 1 --gt" in result.stderr


def test_evaluate_empty_prediction_gives_null_for_undefined(tmp_path):
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    write_mask(tmp_path / "gt.nii.gz", gt)
    write_mask(tmp_path / "pred.nii.gz", np.zeros_like(gt))
    result = msx("evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", "--json", cwd=tmp_path)
    metrics = json.loads(result.stdout)
    assert metrics["dsc"] == 0 and metrics["tpr"] == 0 and metrics["ppv"] is None


def test_evaluate_refuses_masks_on_different_grids(tmp_path):
    write_mask(tmp_path / "gt.nii.gz", np.zeros((8, 8, 8)))
    write_mask(tmp_path / "pred.nii.gz", np.zeros((8, 8, 9)))
    result = msx("evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", cwd=tmp_path)
    assert_one_line_error(result, "pred.nii.gz", "shape")


def test_evaluate_refuses_a_mask_holding_nan(tmp_path):
    gt = np.zeros((8, 8, 8), np.float32)
    gt[2:4, 2:4, 2:4] = 1
    write_mask(tmp_path / "gt.nii.gz", gt)
    # All NaN: NaN > 0 is False, so this prediction used to score as an empty mask (DSC 0).
    save_nifti(tmp_path / "pred.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    result = msx("evaluate", "--pred", "pred.nii.gz", "--gt", "gt.nii.gz", cwd=tmp_path)
    assert_one_line_error(result, "pred.nii.gz", "512 of 512 voxels are NaN or infinite")
    one_nan = gt.copy()
    one_nan[0, 0, 0] = np.nan
    save_nifti(tmp_path / "gt_nan.nii.gz", one_nan)
    result = msx("evaluate", "--pred", "gt.nii.gz", "--gt", "gt_nan.nii.gz", cwd=tmp_path)
    assert_one_line_error(result, "gt_nan.nii.gz", "1 of 512 voxels are NaN")


def uncertainty_scan(folder: Path, index: int, shape=(10, 10, 10)):
    """A scan's prediction, truth and uncertainty map on disk (the map higher on the prediction's errors), and
    the arrays."""
    rng = np.random.default_rng(index)
    gt = np.zeros(shape, np.uint8)
    gt[2:5, 2:5, 2:5] = 1
    pred = gt.copy()
    pred[2:5, 2:5, 4] = 0
    pred[8, 8, 8] = 1
    uncertainty = (rng.random(shape) + (pred != gt)).astype(np.float32)
    write_mask(folder / f"gt{index}.nii.gz", gt)
    write_mask(folder / f"pred{index}.nii.gz", pred)
    save_nifti(folder / f"u{index}.nii.gz", uncertainty, np.eye(4))
    return pred, gt, uncertainty


def uncertainty_arguments(scans: int) -> list[str]:
    """`msx evaluate`'s arguments for the first `scans` of uncertainty_scan's scans."""
    return [
        part for index in range(scans)
        for part in ("--pred", f"pred{index}.nii.gz", "--gt", f"gt{index}.nii.gz", "--uncertainty", f"u{index}.nii.gz")
    ]


def test_evaluate_scores_the_ndsc_r_aac_of_an_uncertainty_map_over_a_brain_mask(tmp_path):
    from msx.models.metrics import ndsc_r_aac

    scans = [uncertainty_scan(tmp_path, index) for index in range(2)]
    brain = np.zeros((10, 10, 10), np.uint8)
    brain[1:8, 1:8, 1:8] = 1  # leaves out the false positive at (8, 8, 8)
    write_mask(tmp_path / "brain.nii.gz", brain)
    arguments = uncertainty_arguments(2)

    one = json.loads(msx("evaluate", *arguments[:6], "--json", cwd=tmp_path).stdout)
    assert one["uncertainty"] == "u0.nii.gz" and "brain_mask" not in one
    assert one["ndsc_r_aac"] == pytest.approx(ndsc_r_aac(*scans[0]))

    result = msx("evaluate", *arguments, "--brain-mask", "brain.nii.gz", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["brain_mask"] for row in rows] == ["brain.nii.gz", "brain.nii.gz"]
    expected = [ndsc_r_aac(pred, gt, uncertainty, brain_mask=brain > 0) for pred, gt, uncertainty in scans]
    assert [row["ndsc_r_aac"] for row in rows] == pytest.approx(expected)
    assert expected[0] != pytest.approx(one["ndsc_r_aac"])  # the mask changed which voxels count

    table = msx(
        "evaluate", *arguments, "--brain-mask", "brain.nii.gz", "--brain-mask", "brain.nii.gz", cwd=tmp_path
    ).stdout.splitlines()
    assert table[1].split()[-3:] == ["LESION_F1", "NDSC_R_AAC", "ISBI"]


def test_evaluate_table_ends_with_each_metrics_mean_over_the_scans_where_it_is_defined(tmp_path):
    for index in range(2):
        uncertainty_scan(tmp_path, index)
    # Scan 1 predicts nothing: its PPV, ASSD and HD95 are undefined. Both truths hold 27 voxels, so the ISBI
    # score's volume correlation, and with it every scan's ISBI score, is undefined.
    write_mask(tmp_path / "pred1.nii.gz", np.zeros((10, 10, 10)))
    arguments = uncertainty_arguments(2)
    scans = json.loads(msx("evaluate", *arguments, "--json", cwd=tmp_path).stdout)
    assert isinstance(scans, list) and len(scans) == 2  # --json keeps printing the scans only

    result = msx("evaluate", *arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["pred0.nii.gz", "pred1.nii.gz", "mean"]
    means = dict(zip((name.lower() for name in header[1:]), rows[-1][1:], strict=True))
    assert {"ndsc", "lesion_f1", "ndsc_r_aac"} <= set(means)
    for name, cell in means.items():
        defined = [scan[name] for scan in scans if scan[name] is not None]
        assert cell == (f"{np.mean(defined):.4f}" if defined else "n/a"), name
    assert scans[1]["ppv"] is None and means["ppv"] == f"{scans[0]['ppv']:.4f}"
    assert means["isbi"] == "n/a"

    one = msx("evaluate", *arguments[:6], cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in one[2:]] == ["pred0.nii.gz"]  # one scan is its own mean


@pytest.mark.parametrize(
    "bad, fragments",
    [
        ("nan", ["u1.nii.gz", "1 of 1000 voxels are NaN"]),
        ("negative", ["u1.nii.gz", "1 of 1000 voxels are negative"]),
        ("shape", ["u1.nii.gz", "shape (10, 10, 11)"]),
        ("affine", ["u1.nii.gz", "affine"]),
        ("brain grid", ["brain.nii.gz", "affine"]),
    ],
)
def test_evaluate_refuses_a_bad_uncertainty_map_or_brain_mask_before_computing(bad, fragments, tmp_path, monkeypatch):
    import msx.models.evaluation as evaluation

    for index in range(2):
        uncertainty_scan(tmp_path, index)
    uncertainty = np.ones((10, 10, 11) if bad == "shape" else (10, 10, 10), np.float32)
    uncertainty[0, 0, 0] = {"nan": np.nan, "negative": -0.5}.get(bad, 1.0)
    save_nifti(tmp_path / "u1.nii.gz", uncertainty, np.diag([2.0, 1, 1, 1]) if bad == "affine" else np.eye(4))
    write_mask(
        tmp_path / "brain.nii.gz", np.ones((10, 10, 10)), (1.0, 1.0, 2.0) if bad == "brain grid" else (1.0, 1.0, 1.0)
    )
    # Scan 0 is good: its metrics must not be computed before scan 1's files are refused.
    monkeypatch.setattr(evaluation, "segmentation_metrics", lambda *a, **k: pytest.fail("computed before the check"))
    arguments = ["--pred", "pred0.nii.gz", "--gt", "gt0.nii.gz", "--uncertainty", "u0.nii.gz"]
    arguments += [
        "--pred", "pred1.nii.gz", "--gt", "gt1.nii.gz", "--uncertainty", "u1.nii.gz", "--brain-mask", "brain.nii.gz"
    ]
    result = msx("evaluate", *arguments, "--json", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert result.stdout == ""


def test_evaluate_needs_one_uncertainty_map_per_prediction_and_one_or_all_brain_masks(tmp_path):
    uncertainty_scan(tmp_path, 0)
    scan = ["--pred", "pred0.nii.gz", "--gt", "gt0.nii.gz"]
    result = msx("evaluate", *scan, *scan, "--uncertainty", "u0.nii.gz", cwd=tmp_path)
    assert result.returncode == 2 and "got 2 --pred and 1 --uncertainty" in result.stderr
    result = msx("evaluate", *scan, "--brain-mask", "gt0.nii.gz", cwd=tmp_path)
    assert result.returncode == 2 and "needs --uncertainty" in result.stderr
    maps = ["--uncertainty", "u0.nii.gz"] * 3
    result = msx(
        "evaluate", *scan, *scan, *scan, *maps, "--brain-mask", "gt0.nii.gz", "--brain-mask", "gt0.nii.gz", cwd=tmp_path
    )
    assert result.returncode == 2 and "got 3 --pred and 2 --brain-mask" in result.stderr


def test_unreachable_tracking_server_fails_before_ray(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    runs = tmp_path / "runs"
    result = msx("launch", "--tracking-uri", uri, "--storage", str(runs), cwd=tmp_path)
    assert_one_line_error(result, f"MLflow tracking server {uri} is unreachable", "Ray was not started")
    assert not (runs / "smoke").exists()  # no experiment folder: no trial ran
