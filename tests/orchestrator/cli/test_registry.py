"""The champion policy and `msx registry list/show/promote` (and `msx predict` by alias) on a SQLite store
and on a real `mlflow server`; the data fingerprint on real files."""

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from msx.models.data.folds import Fold
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.fold import MODEL_DIR
from msx.orchestrator.cli import main
from msx.orchestrator.results import TrialOutcome, select_best, summarise_configurations
from msx.orchestrator.spec import spec_from_dict
from msx.orchestrator.tracking.provenance import Provenance, code_version, cohort_fingerprint
from msx.orchestrator.tracking.registry import register_selection
from msx.orchestrator.tracking.store import ensure_experiment
from msx.orchestrator.trial import TrialConfig
from tests.helpers import REPOSITORY, free_port, save_tiny_checkpoint, tiny_spec

from ..servers import start_mlflow_server, stop_server

MODEL = "msx-policy"
DATA_A, DATA_B = "a" * 64, "b" * 64
SPEC = spec_from_dict(tiny_spec("registry-commands", inference={"ddim_steps": 2}))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1 (SQLite behind it, artifacts proxied), stopped whatever happens."""
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("http", marks=pytest.mark.integration)])
def store(request, tmp_path_factory):
    """(tracking URI, work folder) of a fresh store of each kind."""
    folder = tmp_path_factory.mktemp(request.param)
    uri = f"sqlite:///{folder / 'mlflow.db'}" if request.param == "sqlite" else request.getfixturevalue("mlflow_server")
    return uri, folder


@pytest.fixture(scope="module")
def checkpoint_trial(tmp_path_factory):
    """A trial folder holding a tiny untrained checkpoint under model/, as the fold loop writes it."""
    trial = tmp_path_factory.mktemp("trial")
    save_tiny_checkpoint(trial / MODEL_DIR, {"fold": 1})
    return trial


def register(store, trial: Path, validation_dsc: float, fingerprint: str):
    """A one-fold selection scoring `validation_dsc`, registered as a new version of MODEL."""
    tracking_uri, folder = store
    outcome = TrialOutcome(
        TrialConfig("unet", 1, "unet-c1"), {"val/mean/dsc": validation_dsc, "test/mean/dsc": 0.4}, str(trial)
    )
    selection = select_best(summarise_configurations([outcome], ("mean",), fold_count=1), ("mean",), "dsc")
    experiment_id = ensure_experiment(tracking_uri, SPEC.name, folder / "artifacts")
    parent = MlflowClient(tracking_uri).create_run(experiment_id, run_name="study")
    work = folder / "work" / parent.info.run_id
    return register_selection(
        selection, SPEC, MODEL, parent.info.run_id, tracking_uri, work, Provenance(fingerprint, "msx test")
    )


@pytest.fixture(scope="module")
def registrations(store, checkpoint_trial):
    """Four versions: the first, a better one, a worse one on the same data, a better one on other data."""
    return [
        register(store, checkpoint_trial, score, fingerprint)
        for score, fingerprint in ((0.5, DATA_A), (0.6, DATA_A), (0.55, DATA_A), (0.9, DATA_B))
    ]


def msx(store, *arguments: str):
    return CliRunner().invoke(main, [*arguments, "--tracking-uri", store[0]])


@pytest.mark.timeout(600)
def test_champion_moves_only_for_a_better_score_on_the_same_data(store, registrations):
    first, better, worse, other_data = registrations
    assert [r.version for r in registrations] == [1, 2, 3, 4]
    assert (first.decision.promoted, first.decision.reason) == (True, "there was no champion")
    assert better.decision.promoted and better.summary == f"models:/{MODEL}@champion (version 2)"
    assert better.decision.reason == "validation DSC 0.6000 beats version 1's 0.5000 on the same data"
    assert not worse.decision.promoted
    assert worse.summary == (
        f"models:/{MODEL}/3 (champion stays version 2: validation DSC 0.5500 does not beat its 0.6000 on the same data)"
    )
    assert not other_data.decision.promoted and other_data.decision.previous_champion == 2
    assert other_data.summary.startswith(f"models:/{MODEL}/4 (champion stays version 2: it was selected on other data")
    assert "aaaaaaaaaaaa" in other_data.decision.reason and "bbbbbbbbbbbb" in other_data.decision.reason

    client = MlflowClient(store[0])
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 2
    decisions = {n: client.get_model_version(MODEL, str(n)).tags["champion_decision"] for n in (1, 2, 3, 4)}
    assert decisions[1] == "became champion: there was no champion"
    assert decisions[2].startswith("became champion: validation DSC 0.6000 beats")
    assert decisions[3].startswith("not champion, version 2 stays: validation DSC 0.5500 does not beat")
    assert decisions[4].startswith("not champion, version 2 stays: it was selected on other data")


def test_list_and_show(store, registrations):
    listed = msx(store, "registry", "list")
    assert listed.exit_code == 0, listed.output
    header, row = listed.output.strip().splitlines()
    assert header.split() == ["model", "latest", "aliases", "champion", "validation"]
    assert row.split() == [MODEL, "4", "champion=2", "dsc", "0.6000"]

    shown = msx(store, "registry", "show", f"models:/{MODEL}@champion")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"model    {MODEL} version 2" and lines[1] == "aliases  champion"
    assert lines[2].startswith("source   run ") and "experiment" in lines[2]
    tags = dict(line.split(None, 1) for line in lines[4:])
    assert tags["data_fingerprint"] == DATA_A and tags["code_version"] == "msx test"
    assert tags["strategy"] == "mean" and tags["validation_dsc"] == "0.6000" and tags["test_dsc"] == "0.4000 ± 0.0000"

    latest = msx(store, "registry", "show", MODEL)
    assert latest.output.splitlines()[0] == f"model    {MODEL} version 4" and "aliases  -" in latest.output
    assert "not champion, version 2 stays" in msx(store, "registry", "show", f"{MODEL}/4").output


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("registry", "show", "nope@champion"), "no registered model named 'nope'"),
        (("registry", "show", f"{MODEL}/9"), f"{MODEL} has no version 9 (its versions are 1 to 4)"),
        (("registry", "show", f"{MODEL}@gone"), f"{MODEL} has no alias 'gone' (its aliases: champion=2)"),
        (("registry", "promote", MODEL, "9"), f"{MODEL} has no version 9"),
        (("registry", "promote", "nope", "1"), "no registered model named 'nope'"),
    ],
)
def test_unknown_model_version_or_alias_is_one_line(store, registrations, arguments, message):
    result = msx(store, *arguments)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output


def test_predict_with_the_champion(store, registrations, tmp_path):
    cohort = tmp_path / "cohort"
    write_synthetic_cohort(cohort, patients=1, shape=(24, 28, 24))
    for path in cohort.rglob("training01_*"):
        if not path.name.startswith("training01_01"):
            path.unlink()
    result = msx(
        store, "predict", "--model", f"models:/{MODEL}@champion", "--input", str(cohort), "--out", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (tmp_path / "out" / "training01_01_mask.nii.gz").is_file()


# Last: it moves the aliases that the tests above read.
def test_promote_refuses_other_data_without_force(store, registrations):
    client = MlflowClient(store[0])
    refused = msx(store, "registry", "promote", MODEL, "4")
    assert refused.exit_code == 1
    assert (
        f"{MODEL} version 4 was selected on data bbbbbbbbbbbb, champion version 2 on data aaaaaaaaaaaa"
        in refused.output
    )
    assert "--force" in refused.output
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 2

    forced = msx(store, "registry", "promote", MODEL, "4", "--force")
    assert forced.exit_code == 0, forced.output
    assert forced.output.strip() == f"models:/{MODEL}@champion -> version 4 (was version 2)"
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 4
    assert "by msx registry promote --force, replacing version 2" in (
        client.get_model_version(MODEL, "4").tags["promoted.champion"]
    )

    # Any other alias moves without the data check; the same data needs no --force either.
    staged = msx(store, "registry", "promote", MODEL, "1", "--alias", "staging")
    assert staged.exit_code == 0 and staged.output.strip() == f"models:/{MODEL}@staging -> version 1 (was unset)"
    assert msx(store, "registry", "promote", MODEL, "3").exit_code == 1  # data A against champion 4's data B
    assert msx(store, "registry", "promote", MODEL, "2", "--force").exit_code == 0
    same_data = msx(store, "registry", "promote", MODEL, "3")
    assert (
        same_data.exit_code == 0
        and same_data.output.strip() == f"models:/{MODEL}@champion -> version 3 (was version 2)"
    )
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 4  # nothing deleted


@pytest.fixture
def cohort_folder(tmp_path):
    root = tmp_path / "cohort"
    write_synthetic_cohort(root, patients=2, shape=(16, 16, 16))
    return root


FOLDS = (Fold(index=1, train=(1,), validation=(2,), test=(2,)),)


def fingerprint(root: Path, rater: int = 1, folds=FOLDS) -> str:
    return cohort_fingerprint(open_cohort(root, ("flair", "mprage", "t2"), rater), folds)


def flip_last_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))


def test_fingerprint_follows_the_chosen_files_bytes_only(cohort_folder, tmp_path):
    before = fingerprint(cohort_folder)
    assert re.fullmatch(r"[0-9a-f]{64}", before) and fingerprint(cohort_folder) == before

    # Files the study does not read: the other rater's mask, an unused modality, a note.
    flip_last_byte(next(cohort_folder.rglob("training01_01_mask2.nii*")))
    flip_last_byte(next(cohort_folder.rglob("training01_01_pd_pp.nii*")))
    (cohort_folder / "notes.txt").write_text("scanner upgrade after time point 3\n")
    assert fingerprint(cohort_folder) == before
    # The same files elsewhere.
    shutil.copytree(cohort_folder, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == before

    flip_last_byte(next(cohort_folder.rglob("training02_01_mask1.nii*")))
    assert fingerprint(cohort_folder) != before
    assert fingerprint(tmp_path / "copy", rater=2) != before
    assert fingerprint(tmp_path / "copy", folds=(Fold(index=1, train=(2,), validation=(1,), test=(1,)),)) != before


def test_code_version_names_the_package_and_its_commit():
    version = code_version()
    assert re.fullmatch(r"msx \S+(, git [0-9a-f]{40}( \+ uncommitted changes)?)?", version), version
    if (REPOSITORY / ".git").exists():
        assert ", git " in version


@pytest.mark.integration
def test_the_launch_check_passes_for_a_live_server_and_local_stores(mlflow_server, tmp_path):
    from msx.orchestrator.tracking.store import check_tracking_server

    check_tracking_server(mlflow_server)
    check_tracking_server(mlflow_server + "/")
    check_tracking_server(f"sqlite:///{tmp_path / 'mlflow.db'}")  # local: nothing to reach
    with pytest.raises(ConnectionError, match="unreachable"):
        check_tracking_server(f"http://127.0.0.1:{free_port()}")
