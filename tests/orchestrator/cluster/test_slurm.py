"""cluster/slurm.py's pure parts: the SLURM config, the batch script, the submission record, the log follower.
The real thing, a study submitted to slurmctld and requeued, is tests/cluster/test_slurm.py."""

from pathlib import Path

import pytest
import yaml

from msx.orchestrator.cluster.jobs import SubmissionError
from msx.orchestrator.cluster.slurm import (
    SlurmSubmission,
    _echo_new_lines,
    batch_script,
    is_slurm_config,
    load_slurm_config,
    submission_files,
    submit_slurm_launch,
    worker_srun_options,
)

REPOSITORY = Path(__file__).resolve().parents[3]
TEMPLATE = REPOSITORY / "cluster" / "slurm.yaml"


def edited_template(tmp_path: Path, **changes) -> Path:
    """cluster/slurm.yaml with its PLACEHOLDERs filled in, as a user would, and `changes` (section.field: value)."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["slurm"]["partition"] = "gpu"
    config["storage"] = "/shared/msx_runs"
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_template_asks_for_its_placeholders_and_loads_once_they_are_filled(tmp_path):
    with pytest.raises(SubmissionError, match=r"slurm\.yaml: slurm\.partition: still 'PLACEHOLDER': edit the template"):
        load_slurm_config(TEMPLATE)
    config = load_slurm_config(edited_template(tmp_path))
    allocation = config.allocation
    assert (allocation.partition, allocation.nodes, allocation.cpus_per_node) == ("gpu", 2, 32)
    assert allocation.gpus_per_node == 4
    assert (allocation.time, allocation.requeue, allocation.signal_grace_s) == ("24:00:00", True, 300)
    assert config.storage == Path("/shared/msx_runs") and len(config.setup) == 2
    assert is_slurm_config(TEMPLATE) and not is_slurm_config(REPOSITORY / "cluster" / "a100.yaml")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slurm.nodes": 0}, r"slurm\.nodes: must be a positive integer"),
        ({"slurm.cpus_per_node": "many"}, r"slurm\.cpus_per_node: must be a positive integer"),
        ({"slurm.gpus_per_node": -1}, r"slurm\.gpus_per_node: must be an integer >= 0"),
        ({"slurm.time": "a day"}, r"slurm\.time: 'a day' is not a SLURM time limit"),
        ({"slurm.requeue": "yes please"}, r"slurm\.requeue: must be true or false"),
        ({"slurm.extra_sbatch": ["qos=normal"]}, r"slurm\.extra_sbatch: must be a list of sbatch options"),
        ({"slurm.gpu": 4}, r"slurm\.gpu: unknown field; valid: account, cpus_per_node, extra_sbatch, gpus_per_node"),
        ({"nodes": 4}, r"nodes: unknown section; valid: setup, slurm, storage"),
        ({"setup": "source venv/bin/activate"}, r"setup: must be a list of shell lines"),
        ({"storage": "msx_runs"}, r"storage: msx_runs is not an absolute path"),
    ],
)
def test_a_bad_field_is_named_with_what_is_wrong(tmp_path, changes, message):
    with pytest.raises(SubmissionError, match=message):
        load_slurm_config(edited_template(tmp_path, **changes))


def test_unreadable_or_invalid_yaml_is_named(tmp_path):
    with pytest.raises(SubmissionError, match=r"missing\.yaml: cannot read the SLURM config"):
        load_slurm_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("slurm: [unclosed\n")
    with pytest.raises(SubmissionError, match=r"broken\.yaml: not valid YAML"):
        load_slurm_config(broken)


def test_the_batch_script_asks_for_the_allocation_runs_the_setup_then_hands_over_to_msx(tmp_path):
    changes = {"slurm.extra_sbatch": ["--qos=long"], "slurm.account": "lab"}
    config = load_slurm_config(edited_template(tmp_path, **changes))
    files = submission_files(Path("/shared/msx_runs"), "paper", "paper-20261207-120000")
    script = batch_script(config, "msx-paper", files)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert sbatch == [
        "--job-name=msx-paper", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--time=24:00:00",
        "--output=/shared/msx_runs/paper/slurm/paper-%j.log", "--open-mode=append", "--signal=B:TERM@300",
        "--requeue", "--partition=gpu", "--account=lab", "--gres=gpu:4", "--qos=long",
    ]
    # The setup lines before msx, and msx as the batch step's process: SLURM's signals to the batch step reach it.
    setup_at = [lines.index(line) for line in config.setup]
    assert setup_at == sorted(setup_at) and max(setup_at) < lines.index("export MSX_STORAGE=/shared/msx_runs")
    assert lines[-1] == "exec msx slurm-job /shared/msx_runs/paper/slurm/paper-20261207-120000.json"
    no_requeue = load_slurm_config(edited_template(tmp_path, **{"slurm.requeue": False, "slurm.gpus_per_node": 0}))
    script = batch_script(no_requeue, "msx-paper", files)
    assert "#SBATCH --no-requeue" in script and "--gres" not in script


def test_a_worker_step_takes_one_node_with_its_cpus_and_gpus_beside_the_batch_step(tmp_path):
    allocation = load_slurm_config(edited_template(tmp_path)).allocation
    assert worker_srun_options(allocation) == (
        "--nodes=1", "--ntasks=1", "--cpus-per-task=32", "--overlap", "--kill-on-bad-exit=0", "--gres=gpu:4",
    )


def test_a_requeued_run_launches_the_same_study_without_fresh(tmp_path):
    submission = SlurmSubmission(
        "paper", "/shared/msx_runs", ("--storage", "/shared/msx_runs", "--fresh", "--space", "/s/paper.yaml"), True,
        ("--nodes=1",),
    )
    submission.write(tmp_path / "record.json")
    again = SlurmSubmission.read(tmp_path / "record.json")
    assert again == submission
    assert again.resume_arguments == ("--storage", "/shared/msx_runs", "--space", "/s/paper.yaml")


def test_submitting_needs_sbatch_and_absolute_cluster_paths(tmp_path, monkeypatch):
    config = edited_template(tmp_path, storage=str(tmp_path / "runs"))
    with pytest.raises(SubmissionError, match=r"--storage runs: give an absolute path as the cluster's nodes see it"):
        submit_slurm_launch(config, None, {"resume_name": "paper", "storage": "runs"}, print)
    with pytest.raises(SubmissionError, match=r"--data data: give an absolute path"):
        submit_slurm_launch(config, None, {"resume_name": "paper", "data": "data"}, print)
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    with pytest.raises(SubmissionError, match="sbatch is not on PATH: run msx launch --cluster with a SLURM config"):
        submit_slurm_launch(config, None, {"resume_name": "paper"}, print)
    assert not (tmp_path / "runs").exists()  # nothing written before the checks


def test_the_log_follower_echoes_whole_lines_as_they_come(tmp_path):
    log, echoed = tmp_path / "job.log", []
    assert _echo_new_lines(log, 0, echoed.append) == 0  # not there yet
    log.write_bytes(b"study 'tiny': 3 patients\ntrials 1/3 do")
    position = _echo_new_lines(log, 0, echoed.append)
    assert echoed == ["study 'tiny': 3 patients"]
    with log.open("ab") as file:
        file.write(b"ne, 2 running\nregistered model")
    position = _echo_new_lines(log, position, echoed.append)
    assert echoed[1:] == ["trials 1/3 done, 2 running"]
    _echo_new_lines(log, position, echoed.append, final=True)
    assert echoed[-1] == "registered model"
