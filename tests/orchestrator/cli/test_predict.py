"""`msx predict` on a tiny untrained checkpoint and a tiny synthetic cohort."""

import click
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from msx.models.data.synth import write_synthetic_cohort
from msx.models.fold import MODEL_DIR
from msx.orchestrator.cli.predict import predict
from msx.orchestrator.predict.segment import PredictError, find_input_scans, output_paths
from msx.orchestrator.spec import spec_from_dict
from tests.helpers import save_tiny_checkpoint, tiny_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli() -> click.Group:
    group = click.Group("msx")
    group.add_command(predict)
    return group


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    spec = spec_from_dict(tiny_spec("predict-test", inference={"ddim_steps": 2}))
    checkpoint = save_tiny_checkpoint(root / "checkpoint", {"spec": spec.to_dict(), "fold": 1})
    cohort = root / "cohort"
    write_synthetic_cohort(cohort, patients=1, shape=(40, 48, 40))
    # Keep two scans (fast): time point 1 with its masks, time point 2 with images only (new data).
    for path in cohort.rglob("training01_*"):
        if path.name.startswith(("training01_03", "training01_04")) or path.name.startswith("training01_02_mask"):
            path.unlink()
    out = root / "out"
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(checkpoint), "--input", str(cohort), "--out", str(out), "--strategy", "mean"]
    )
    return checkpoint, cohort, out, result


@pytest.mark.timeout(300)
def test_predict_writes_masks_on_input_grid_and_overlays(setup):
    _, cohort, out, result = setup
    assert result.exit_code == 0, result.output + repr(result.exception)
    flairs = sorted(cohort.rglob("*_flair_pp.nii.gz"))
    assert [p.name[:13] for p in flairs] == ["training01_01", "training01_02"]
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    assert "DSC vs rater 1" in lines[0] and "DSC" not in lines[1]  # scan 2 has no mask
    assert sorted(p.name for p in out.iterdir()) == [
        "training01_01_mask.nii.gz", "training01_01_overlay.png",
        "training01_02_mask.nii.gz", "training01_02_overlay.png",
    ]
    for flair_path in flairs:
        scan_id = flair_path.name[:13]
        flair = nib.load(flair_path)
        mask = nib.load(out / f"{scan_id}_mask.nii.gz")
        assert mask.shape == flair.shape
        assert np.allclose(mask.affine, flair.affine)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert (out / f"{scan_id}_overlay.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.timeout(300)
def test_predict_maps_lie_on_the_input_grid_beside_the_same_mask(setup, tmp_path):
    checkpoint, cohort, no_maps_out, _ = setup
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli(),
        [
            "predict", "--model", str(checkpoint), "--input", str(cohort), "--out", str(out), "--strategy", "mean",
            "--maps"
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    for flair_path in sorted(cohort.rglob("*_flair_pp.nii.gz")):
        scan_id = flair_path.name[:13]
        flair = nib.load(flair_path)
        mask = np.asarray(nib.load(out / f"{scan_id}_mask.nii.gz").dataobj).astype(bool)
        # The same seeded sampling pass: asking for the maps does not change the mask.
        np.testing.assert_array_equal(mask, np.asarray(nib.load(no_maps_out / f"{scan_id}_mask.nii.gz").dataobj) > 0)
        names = ("probability", *(f"uncertainty_{measure}" for measure in ("total", "data", "knowledge", "steps")))
        maps = {name: nib.load(out / f"{scan_id}_{name}.nii.gz") for name in names}
        for name, image in maps.items():
            assert image.shape == flair.shape, name
            assert np.allclose(image.affine, flair.affine) and np.allclose(
                image.header.get_sform(), flair.header.get_sform()
            )
            assert image.get_data_dtype() == np.float32, name
        volumes = {name: np.asarray(image.dataobj) for name, image in maps.items()}
        for name, volume in volumes.items():
            assert (volume >= 0).all() and (volume <= 1).all(), name
        probability, uncertainty = volumes["probability"], volumes["uncertainty_steps"]
        knowledge = np.clip(volumes["uncertainty_total"] - volumes["uncertainty_data"], 0, None)
        np.testing.assert_allclose(volumes["uncertainty_knowledge"], knowledge, atol=1e-6)
        # Zero outside the foreground box that inference crops to (the bounding box of voxels > 0).
        foreground = np.zeros(flair.shape, bool)
        for modality in ("flair", "mprage", "t2"):
            foreground |= np.asarray(nib.load(next(cohort.rglob(f"{scan_id}_{modality}_pp.nii.gz"))).dataobj) > 0
        box = np.zeros(flair.shape, bool)
        box[tuple(slice(int(np.min(ix)), int(np.max(ix)) + 1) for ix in np.nonzero(foreground))] = True
        assert (probability[~box] == 0).all() and (uncertainty[~box] == 0).all()
        assert (probability[box] > 0).any()
        decided = probability != 0.5  # strategy "mean": its mask is probability > 0.5 (lesion_probability)
        np.testing.assert_array_equal(mask[decided], probability[decided] > 0.5)


def test_unknown_strategy_is_one_line_listing_valid_names(setup, tmp_path):
    checkpoint, cohort, _, _ = setup
    result = CliRunner().invoke(
        cli(),
        ["predict", "--model", str(checkpoint), "--input", str(cohort), "--out", str(tmp_path), "--strategy", "nope"]
    )
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert "'nope'" in message and "valid names" in message
    for name in ("last", "mean", "mean-var", "staple", "uncertainty", "majority"):
        assert name in message


def test_missing_input_folder_is_named(setup, tmp_path):
    checkpoint, _, _, _ = setup
    missing = tmp_path / "no-such-folder"
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(checkpoint), "--input", str(missing), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert str(missing) in result.output and "does not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_spec_is_rejected(setup, tmp_path):
    _, cohort, _, _ = setup
    bare = save_tiny_checkpoint(tmp_path / "bare", {"fold": 1})
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(bare), "--input", str(cohort), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "no experiment spec" in result.output


def test_wrong_modality_count_is_rejected(setup, tmp_path):
    checkpoint, cohort, _, _ = setup
    result = CliRunner().invoke(
        cli(),
        [
            "predict", "--model", str(checkpoint), "--input", str(cohort), "--out", str(tmp_path / "o"), "--modalities",
            "flair,t2"
        ],
    )
    assert result.exit_code == 1
    assert "3 input channels" in result.output


@pytest.mark.timeout(240)
def test_predict_with_registered_model(setup, tmp_path):
    from mlflow.tracking import MlflowClient

    from msx.orchestrator.results import TrialOutcome, select_best, summarise_configurations
    from msx.orchestrator.tracking.provenance import Provenance
    from msx.orchestrator.tracking.registry import register_selection
    from msx.orchestrator.tracking.store import ensure_experiment
    from msx.orchestrator.trial import TrialConfig

    _, cohort, _, _ = setup
    spec = spec_from_dict(tiny_spec("predict-registry", inference={"ddim_steps": 2}))
    # One fold whose trial folder holds the tiny checkpoint under model/, as the fold loop writes it.
    trial = tmp_path / "trial"
    save_tiny_checkpoint(trial / MODEL_DIR, {"fold": 1})
    outcome = TrialOutcome(TrialConfig("unet", 1, "unet-c1"), {"val/mean/dsc": 0.5, "test/mean/dsc": 0.5}, str(trial))
    selection = select_best(summarise_configurations([outcome], ("mean",), fold_count=1), ("mean",), "dsc")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(tracking_uri, spec.name, tmp_path / "artifacts")
    parent = MlflowClient(tracking_uri).create_run(experiment_id, run_name="study")
    provenance = Provenance(data_fingerprint="f" * 64, code_version="msx test")
    uri = register_selection(
        selection, spec, "msx-predict", parent.info.run_id, tracking_uri, tmp_path / "work", provenance
    ).model_uri

    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli(), ["predict", "--model", uri, "--input", str(cohort), "--out", str(out), "--tracking-uri", tracking_uri,
                "--strategy", "last", "--maps"],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert len(result.output.strip().splitlines()) == 2 and "strategy last" in result.output
    flair = nib.load(next(cohort.rglob("training01_01_flair_pp.nii.gz")))
    for name in (
        "mask", "probability", "uncertainty_total", "uncertainty_data", "uncertainty_knowledge", "uncertainty_steps"
    ):
        written = nib.load(out / f"training01_01_{name}.nii.gz")
        assert written.shape == flair.shape and np.allclose(written.affine, flair.affine), name
    probability = np.asarray(nib.load(out / "training01_01_probability.nii.gz").dataobj)
    assert probability.dtype == np.float32 and probability.min() >= 0 and probability.max() <= 1


def test_input_may_be_a_manifest_without_masks(tmp_path):
    write_synthetic_cohort(tmp_path, patients=1, shape=(16, 16, 16))
    flair, mprage, t2 = (
        sorted(tmp_path.rglob(f"training01_0[12]_{name}_pp.nii.gz")) for name in ("flair", "mprage", "t2")
    )
    manifest = tmp_path / "new.yaml"
    manifest.write_text(
        "".join(
            f"- {{patient: 7, timepoint: {t + 1}, flair: {flair[t]}, mprage: {mprage[t]}, t2: {t2[t]}}}\n"
            for t in (0, 1)
        )
    )
    scans = find_input_scans(manifest, ("flair", "mprage", "t2"))
    assert [(scan.scan_id, scan.masks) for scan in scans] == [("training07_01", {}), ("training07_02", {})]
    assert scans[1].images == {"flair": flair[1], "mprage": mprage[1], "t2": t2[1]}
    manifest.write_text(f"- {{patient: 7, timepoint: 1, flair: {flair[0]}, mprage: {mprage[0]}}}\n")
    with pytest.raises(PredictError, match=r"new\.yaml: item 1 \(line 1\): t2: missing or empty"):
        find_input_scans(manifest, ("flair", "mprage", "t2"))


def _scan_files(cohort, scan_id="training01_01", modalities=("flair", "mprage", "t2")) -> list[str]:
    args = []
    for name in modalities:
        args += [f"--{name}", str(next(cohort.rglob(f"{scan_id}_{name}_pp.nii.gz")))]
    return args


@pytest.mark.timeout(300)
def test_one_scan_given_by_its_files_gets_the_folder_forms_mask(setup, tmp_path):
    checkpoint, cohort, folder_out, _ = setup
    out = tmp_path / "new" / "p7_mask.nii.gz"
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(checkpoint), *_scan_files(cohort), "--out", str(out), "--strategy", "mean"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output.strip().endswith(f"-> {out}") and "DSC" not in result.output  # no mask given
    assert sorted(p.name for p in out.parent.iterdir()) == ["p7_mask.nii.gz", "p7_overlay.png"]
    flair = nib.load(next(cohort.rglob("training01_01_flair_pp.nii.gz")))
    written = nib.load(out)
    assert written.shape == flair.shape and np.allclose(written.affine, flair.affine)
    # The same seeded sampling of the same voxels as the folder form gave.
    np.testing.assert_array_equal(
        np.asarray(written.dataobj), np.asarray(nib.load(folder_out / "training01_01_mask.nii.gz").dataobj)
    )


def test_one_scan_on_two_grids_is_refused_before_the_model_loads(setup, tmp_path):
    _, cohort, _, _ = setup
    t2 = nib.load(next(cohort.rglob("training01_01_t2_pp.nii.gz")))
    cropped = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(t2.dataobj)[:-1], t2.affine), cropped)
    files = _scan_files(cohort, modalities=("flair", "mprage")) + ["--t2", str(cropped)]
    # A model that does not exist: the scan's problem is found first.
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(tmp_path / "no-model"), *files, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert f"{cropped} has shape (39, 48, 40)" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_one_scan_with_nan_voxels_is_refused(setup, tmp_path):
    _, cohort, _, _ = setup
    flair = nib.load(next(cohort.rglob("training01_01_flair_pp.nii.gz")))
    voxels = np.asarray(flair.dataobj, dtype=np.float32).copy()
    voxels[3, 3, 3] = np.nan
    broken = tmp_path / "flair.nii.gz"
    nib.save(nib.Nifti1Image(voxels, flair.affine), broken)
    files = ["--flair", str(broken)] + _scan_files(cohort, modalities=("mprage", "t2"))
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(tmp_path / "no-model"), *files, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert f"{broken} contains NaN or infinite voxels" in result.output


def test_one_scan_must_give_exactly_the_models_modalities(setup, tmp_path):
    checkpoint, cohort, _, _ = setup
    pd = nib.load(next(cohort.rglob("training01_01_pd_pp.nii.gz")))
    assert pd.shape == (40, 48, 40)
    two = _scan_files(cohort, modalities=("flair", "mprage"))
    result = CliRunner().invoke(cli(), ["predict", "--model", str(checkpoint), *two, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "the model reads flair, mprage, t2; this scan lacks --t2" in result.output
    four = _scan_files(cohort, modalities=("flair", "mprage", "t2", "pd"))
    result = CliRunner().invoke(cli(), ["predict", "--model", str(checkpoint), *four, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "this scan does not take --pd" in result.output
    assert not (tmp_path / "o").exists()


def test_input_and_files_are_either_or(setup, tmp_path):
    checkpoint, cohort, _, _ = setup
    for args in (["--input", str(cohort), *_scan_files(cohort)], []):
        result = CliRunner().invoke(cli(), ["predict", "--model", str(checkpoint), *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "give either --input" in result.output


def test_a_mask_file_as_output_takes_one_scan_only(setup, tmp_path):
    checkpoint, cohort, _, _ = setup
    out = tmp_path / "mask.nii.gz"
    result = CliRunner().invoke(
        cli(), ["predict", "--model", str(checkpoint), "--input", str(cohort), "--out", str(out)]
    )
    assert result.exit_code == 1 and "names one mask file but the input holds 2 scans" in result.output
    assert not out.exists()


def test_output_paths_in_a_folder_or_beside_a_mask_file(tmp_path):
    in_folder = output_paths(tmp_path, "training01_01")
    assert in_folder.mask == tmp_path / "training01_01_mask.nii.gz"
    assert in_folder.overlay == tmp_path / "training01_01_overlay.png"
    beside = output_paths(tmp_path / "p7_mask.nii", "ignored")
    assert beside.mask == tmp_path / "p7_mask.nii"
    assert beside.probability == tmp_path / "p7_probability.nii.gz"
    assert beside.uncertainty("knowledge") == tmp_path / "p7_uncertainty_knowledge.nii.gz"
    assert in_folder.uncertainty("total") == tmp_path / "training01_01_uncertainty_total.nii.gz"
    assert output_paths(tmp_path / "seg.nii.gz", "x").overlay == tmp_path / "seg_overlay.png"
