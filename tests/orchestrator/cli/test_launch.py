"""`msx launch --resume/--fresh/--address/--cluster` as a user types them: every refusal is one clear line,
before Ray or a cluster starts. Real files; the runs themselves are in tests/cluster/test_multinode.py."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msx.models.data.synth import write_synthetic_cohort
from msx.orchestrator.cluster.jobs import (
    CLUSTER_STORAGE,
    SubmissionError,
    check_cluster_config,
    fixed_node_count,
    launch_entrypoint,
)
from msx.orchestrator.spec import load_spec, spec_from_dict
from msx.orchestrator.study.state import FINISHED, INTERRUPTED, StudyState, write_state
from tests.helpers import REPOSITORY, free_port

from .test_cli import assert_one_line_error, msx


def record(storage: Path, spec: dict, data_root: str, **changes) -> StudyState:
    state = StudyState(
        experiment=spec["name"], study=f"{spec['name']}-20261127-100000", spec=spec, data_root=data_root,
        data_fingerprint="0" * 64, tracking_uri=f"sqlite:///{storage / 'mlflow.db'}", experiment_id="1",
        parent_run_id="abc", started=1.0, driver_host=socket.gethostname(), driver_pid=0,
    )
    state = dataclasses.replace(state, **changes)
    write_state(storage, state)
    return state


def test_resume_takes_no_space(tmp_path):
    result = msx("launch", "--resume", "smoke", "--space", "paper", "--storage", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "--resume continues a study with its own spec and data" in result.stderr


def test_resume_of_an_unknown_study(tmp_path):
    result = msx("launch", "--resume", "nope", "--storage", str(tmp_path / "runs"), cwd=tmp_path)
    assert_one_line_error(result, "no study or experiment named 'nope'")


def test_resume_of_a_finished_study(tmp_path):
    storage = tmp_path / "runs"
    record(storage, load_spec("smoke").to_dict(), "/data", status=FINISHED)
    result = msx("launch", "--resume", "smoke", "--storage", str(storage), cwd=tmp_path)
    assert_one_line_error(result, "study smoke-20261127-100000 already ended (finished)", "nothing to resume")


def test_plain_launch_will_not_take_over_an_unfinished_study_of_another_spec(tmp_path):
    storage = tmp_path / "runs"
    other = load_spec("smoke").with_overrides({"training.epochs": 3}).to_dict()
    record(storage, other, "/data")
    result = msx("launch", "--storage", str(storage), cwd=tmp_path)
    assert_one_line_error(result, "unfinished study smoke-20261127-100000 with another spec or data", "--fresh")


@pytest.mark.parametrize("status", ["running", INTERRUPTED])
def test_resume_refuses_data_that_changed(tmp_path, status):
    # Either way the study is taken over (its driver is gone, or Ctrl-C stopped it), so the data is checked.
    storage, cohort = tmp_path / "runs", tmp_path / "cohort"
    write_synthetic_cohort(cohort, patients=3, shape=(32, 36, 32), seed=0)
    spec = load_spec("smoke").with_overrides({"data.folds": "loso"}).to_dict()
    record(storage, spec, str(cohort), status=status)
    result = msx("launch", "--resume", "smoke", "--storage", str(storage), cwd=tmp_path)
    assert_one_line_error(result, f"{cohort}: the data changed since study smoke-20261127-100000 started")


def test_job_submission_to_an_address_where_nothing_answers(tmp_path):
    port = free_port()
    result = msx("launch", "--address", f"http://127.0.0.1:{port}", "--storage", str(tmp_path), cwd=tmp_path)
    assert_one_line_error(result, f"http://127.0.0.1:{port}: no Ray dashboard answers there")


def test_job_submission_wants_the_clusters_absolute_paths(tmp_path):
    result = msx("launch", "--address", "http://127.0.0.1:1", "--data", "cohort", cwd=tmp_path)
    assert_one_line_error(result, "--data cohort: give an absolute path as the cluster's nodes see it")


def test_broken_cluster_config_is_refused_before_ray_up(tmp_path):
    broken = yaml.safe_load((REPOSITORY / "cluster" / "local.yaml").read_text())
    broken["dashboard_host"] = "127.0.0.1"  # not a cluster-config field
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = msx("launch", "--cluster", str(path), cwd=tmp_path)
    assert_one_line_error(result, f"{path}: not a valid Ray cluster config", "dashboard_host")
    path.write_text("cluster_name: [unclosed\n")
    assert_one_line_error(msx("launch", "--cluster", str(path), cwd=tmp_path), f"{path}: not valid YAML")


def test_cluster_launch_without_a_token_stops_before_ray_up(tmp_path, monkeypatch):
    """The token the config copies to the nodes must exist here: without it the error is ours and comes first."""
    for name in [k for k in os.environ if k.startswith("RAY_AUTH_TOKEN")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = msx("launch", "--cluster", "cluster/local.yaml", cwd=REPOSITORY)
    assert_one_line_error(
        result, "cluster/local.yaml: file_mounts copies the Ray authentication token ~/.ray/auth_token to the nodes",
        "`ray get-auth-token --generate`",
    )
    assert "bringing up" not in result.stdout


def test_cluster_launch_from_elsewhere_than_the_checkout_stops_before_ray_up(tmp_path, monkeypatch):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = msx("launch", "--cluster", str(REPOSITORY / "cluster" / "local.yaml"), cwd=tmp_path)
    assert_one_line_error(result, "file_mounts copies ./pyproject.toml to ~/msx/pyproject.toml", "the repository root")


@pytest.mark.parametrize("name", ["a100.yaml", "local.yaml"])
def test_bundled_cluster_configs_pass_the_check(name):
    assert check_cluster_config(REPOSITORY / "cluster" / name)["cluster_name"]


def test_cluster_launch_waits_for_the_nodes_each_config_keeps():
    # local.yaml: the head and every worker_ip (two placeholders); a100.yaml: autoscaled up from the head alone
    assert fixed_node_count(check_cluster_config(REPOSITORY / "cluster" / "local.yaml")) == 3
    assert fixed_node_count(check_cluster_config(REPOSITORY / "cluster" / "a100.yaml")) == 1


def test_job_entrypoint_carries_the_spec_and_the_users_choices(tmp_path):
    spec = load_spec("smoke")
    command = launch_entrypoint(spec, {"data": "/mnt/shared/data/ISBI 2015", "fresh": True}, "msx-smoke-1")
    written, _, launch = command.rpartition(" && ")
    assert launch.startswith(
        f"msx launch --storage {CLUSTER_STORAGE} --address auto --data '/mnt/shared/data/ISBI 2015' --fresh"
    )
    assert launch.endswith(f"--space {CLUSTER_STORAGE}/smoke/submitted/msx-smoke-1.yaml")
    # The shell writes the spec exactly: run the part that writes it, with the storage variable pointed here.
    subprocess.run(written, shell=True, check=True, env={"MSX_STORAGE": str(tmp_path), "HOME": str(tmp_path)})
    shipped = yaml.safe_load((tmp_path / "smoke" / "submitted" / "msx-smoke-1.yaml").read_text())
    assert spec_from_dict(shipped) == spec
    resumed = launch_entrypoint(None, {"resume_name": "smoke", "storage": "/mnt/runs"})
    assert resumed == "msx launch --storage /mnt/runs --address auto --resume smoke"
    with pytest.raises(SubmissionError, match="--storage runs: give an absolute path"):
        launch_entrypoint(spec, {"storage": "runs"})


@pytest.mark.integration
@pytest.mark.parametrize(
    "environment, expected",
    [
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/srv/ray/token"}, "(the file /srv/ray/token)"),
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0123456789abcdef" * 4},
            "(the RAY_AUTH_TOKEN variable of the shell that ran msx)"
        ),
        ({"RAY_AUTH_MODE": "disabled"}, "None"),
    ],
)
def test_the_dashboard_token_is_named_never_printed(environment, expected):
    """Ray reads its authentication mode once per process: each case in a process of its own (hence integration:
    a fresh interpreter importing msx and Ray costs about 5 s of CPU per case)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    said = subprocess.run(
        [
            sys.executable, "-c",
            "from msx.orchestrator.cluster.jobs import token_instructions; print(token_instructions())"
        ],
        env={**clean, **environment}, capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()
    assert said.endswith(expected)
    if expected != "None":
        assert said.startswith("the dashboard asks for Ray's token: paste the output of `ray get-auth-token`")
    assert "0123456789abcdef" not in said
