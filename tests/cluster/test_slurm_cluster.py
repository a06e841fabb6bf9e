"""The SLURM test harness (slurm_cluster.py) on its own: a two-node cluster from the test's folder on 127.0.0.1 runs
an srun step across both nodes, delivers `scancel --signal=TERM --batch` to a batch script's trap, runs a requeued
job again with SLURM_RESTART_COUNT=1, and leaves nothing running once stopped.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge (`make slurm`); elsewhere skipped, saying why.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .slurm_cluster import SlurmCluster, missing_requirement, start_slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODES = 2
JOB_S = 30


@pytest.fixture(scope="module", autouse=True)
def requirements():
    reason = missing_requirement()
    if reason:
        pytest.skip(f"the SLURM cluster test {reason}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    cluster = start_slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=NODES)
    yield cluster
    cluster.stop()


def test_nodes_are_idle(slurm: SlurmCluster):
    listed = slurm.run("sinfo", "--noheader", "--Node", "--format=%N %P %T", check=True).stdout.split("\n")
    assert sorted(line.split() for line in listed if line) == [[f"node{index + 1}", "debug*", "idle"]
                                                               for index in range(NODES)]


def test_srun_step_spans_every_node(slurm: SlurmCluster, tmp_path: Path):
    output = tmp_path / "hostname.out"
    job_id = slurm.sbatch(f"--nodes={NODES}", f"--output={output}", "--wrap", "srun hostname; echo done", cwd=tmp_path)

    assert slurm.wait_for_job_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_S) == "COMPLETED"
    assert output.read_text().splitlines() == [socket.gethostname()] * NODES + ["done"]
    assert slurm.job_info(job_id)["NodeList"] == f"node[1-{NODES}]"


def test_term_reaches_the_batch_script_and_requeue_runs_it_again(slurm: SlurmCluster, tmp_path: Path):
    output = tmp_path / "requeued.out"
    # The work runs in the background: bash runs a trap only once its foreground child has ended.
    script = tmp_path / "job.sh"
    script.write_text("""#!/bin/bash
trap 'echo got TERM; exit 143' TERM
echo "restart count ${SLURM_RESTART_COUNT:-0}"
if [ -n "$SLURM_RESTART_COUNT" ]; then echo resumed; exit 0; fi
sleep 300 &
wait $!
""")
    job_id = slurm.sbatch("--requeue", "--open-mode=append", f"--output={output}", str(script), cwd=tmp_path)
    slurm.wait_for_job_state(job_id, {"RUNNING"}, JOB_S)
    _wait_for_line(output, "restart count 0")

    slurm.run("scancel", "--signal=TERM", "--batch", str(job_id), check=True)
    assert slurm.wait_for_job_state(job_id, {"FAILED", "COMPLETED", "CANCELLED"}, JOB_S) == "FAILED"
    assert "got TERM" in output.read_text()
    assert slurm.job_info(job_id)["ExitCode"] == "143:0"

    slurm.run("scontrol", "requeue", str(job_id), check=True)
    # Held for the credential's lifetime (5 s here) before it may start again.
    assert slurm.wait_for_job_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, JOB_S) == "COMPLETED"
    lines = output.read_text().splitlines()
    assert lines[-2:] == ["restart count 1", "resumed"]
    assert lines[0] == "restart count 0" and "got TERM" in lines
    assert slurm.job_info(job_id)["Restarts"] == "1"


def test_stop_ends_every_daemon_and_job(slurm: SlurmCluster, tmp_path: Path):
    job_id = slurm.sbatch("--wrap", "sleep 300", f"--output={tmp_path / 'sleep.out'}", cwd=tmp_path)
    slurm.wait_for_job_state(job_id, {"RUNNING"}, JOB_S)
    daemons = [psutil.Process(pid) for pid in slurm.pids]
    assert len(daemons) == NODES + 2
    # RUNNING comes before slurmstepd has started the script.
    deadline = time.monotonic() + JOB_S
    while not (job_processes := _job_processes(slurm, ["sleep", "300"])):
        assert time.monotonic() < deadline, f"job {job_id} RUNNING but no `sleep 300` after {JOB_S} s"
        time.sleep(0.2)

    slurm.stop()

    assert [process.pid for process in daemons + job_processes if _alive(process)] == []


def _wait_for_line(path: Path, line: str, timeout: float = JOB_S) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and line in path.read_text().splitlines()):
        assert time.monotonic() < deadline, f"no line {line!r} in {path} after {timeout} s"
        time.sleep(0.2)


def _job_processes(slurm: SlurmCluster, command: list[str]) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.info["cmdline"] == command and process.environ().get("SLURM_CLUSTER_NAME") == slurm.cluster_name:
                found.append(process)
        except psutil.Error:
            continue  # ended meanwhile
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
