"""`msx launch --cluster slurm.yaml`: a study as one SLURM batch job, Ray inside the allocation.

Ray's "Deploying on Slurm" pattern, written once so that no user writes it by hand:

- on the login node, `msx launch` checks the config and the spec, writes the spec, a submission record and the
  batch script under ``<storage>/<experiment>/slurm/`` (storage every node sees), submits the script with
  ``sbatch`` and follows the job's log; Ctrl-C detaches;
- the batch script runs the config's setup lines and hands over to ``msx slurm-job`` (:func:`run_job`), which,
  on the allocation's first node, starts Ray's head with no CPU or GPU of its own, one Ray worker per node of the
  allocation as a job step (``srun``; ``msx slurm-node``: the CPUs and GPUs SLURM gave that step and no more), token
  authentication on with a token made for the job, and the study's driver (`msx launch --address`);
- SIGTERM to the batch step (sbatch's ``--signal=B:TERM@grace`` before the time limit, ``scancel --batch
  --signal=TERM``, or a plain ``scancel --signal=TERM`` relayed by the worker steps) is passed to the driver, which
  ends the study interrupted with every finished result kept (study/interruption.py); with ``requeue: true`` the job
  then requeues itself and the next run resumes the same study (a plain `msx launch` takes over an unfinished
  study of the same spec and data), so MLflow keeps one study run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..spec import ExperimentSpec
from .jobs import SubmissionError, free_local_port, launch_arguments, read_config_yaml

# The key that makes a --cluster YAML a SLURM config (a Ray cluster launcher config has none).
SLURM_SECTION = "slurm"
# Under <storage>/<experiment>/: the submitted specs, records, batch scripts and job logs.
SLURM_FOLDER = "slurm"
# What cluster/slurm.yaml's template has where a user must put their cluster's value.
PLACEHOLDER = "PLACEHOLDER"
NODES_WAIT_S = 300.0
NODE_START_ATTEMPTS = 3
POLL_S = 2.0
# What `msx slurm-job` exits with when the study was interrupted by a signal (the driver's own status).
INTERRUPTED_STATUS = 128 + signal.SIGTERM
# squeue's states of a job that is over (a requeued job passes through REQUEUED and PENDING, which are not).
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}
_TIME_LIMIT = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


@dataclass(frozen=True)
class SlurmAllocation:
    """What the job asks SLURM for (cluster/slurm.yaml's ``slurm`` section)."""

    partition: str | None = None
    account: str | None = None
    nodes: int = 1
    cpus_per_node: int = 4
    gpus_per_node: int = 0
    memory_per_node: str | None = None  # sbatch --mem, e.g. "64G"; None: the partition's default
    time: str = "24:00:00"
    # Requeue the job when its study was interrupted (time limit, preemption, scancel --signal=TERM): the next run
    # resumes the study. sbatch's --requeue also lets SLURM requeue it after a node failure or preemption.
    requeue: bool = True
    # SIGTERM this many seconds before the time limit: enough for the trials to stop at their checkpoints.
    signal_grace_s: int = 300
    extra_sbatch: tuple[str, ...] = ()  # further #SBATCH options, e.g. "--qos=normal", "--constraint=a100"


@dataclass(frozen=True)
class SlurmClusterConfig:
    allocation: SlurmAllocation
    setup: tuple[str, ...]  # shell lines run in the batch script before msx (activate msx's environment)
    storage: Path  # results folder every node and the login node see (MSX_STORAGE on the nodes)


def is_slurm_config(path: Path) -> bool:
    """Whether a --cluster file is a SLURM config (it has a ``slurm`` section); unreadable files are not."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(loaded, dict) and SLURM_SECTION in loaded


def load_slurm_config(path: Path) -> SlurmClusterConfig:
    """The config, checked field by field; a SubmissionError names the file and the field."""
    loaded = read_config_yaml(path, "the SLURM config")

    def fail(field_name: str, problem: str) -> SubmissionError:
        return SubmissionError(f"{path}: {field_name}: {problem}")

    if not isinstance(loaded, dict):
        raise SubmissionError(f"{path}: a SLURM config is a mapping with sections slurm, setup and storage")
    unknown = sorted(set(loaded) - {SLURM_SECTION, "setup", "storage"})
    if unknown:
        raise fail(unknown[0], "unknown section; valid: setup, slurm, storage")
    section = loaded.get(SLURM_SECTION) or {}
    if not isinstance(section, dict):
        raise fail(SLURM_SECTION, "must be a mapping of sbatch settings")
    valid = {f.name: f for f in fields(SlurmAllocation)}
    for key in section:
        if key not in valid:
            raise fail(f"slurm.{key}", f"unknown field; valid: {', '.join(sorted(valid))}")
    values: dict[str, Any] = {}
    for name, value in section.items():
        values[name] = _checked_field(name, value, lambda problem, name=name: fail(f"slurm.{name}", problem))
    allocation = SlurmAllocation(**values)
    setup = loaded.get("setup") or []
    if isinstance(setup, str) or not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise fail("setup", "must be a list of shell lines")
    storage = loaded.get("storage")
    if not isinstance(storage, str) or not storage.strip():
        raise fail("storage", "give the results folder that every node and this login node see (an absolute path)")
    storage_path = Path(os.path.expandvars(storage)).expanduser()
    if not storage_path.is_absolute():
        raise fail("storage", f"{storage} is not an absolute path")
    config = SlurmClusterConfig(allocation, tuple(setup), storage_path)
    for name, value in (*((f"slurm.{k}", v) for k, v in asdict(allocation).items()), ("storage", storage)):
        if isinstance(value, str) and PLACEHOLDER in value:
            raise fail(name, f"still {value!r}: edit the template's {PLACEHOLDER} values for your cluster")
    return config


def _checked_field(name: str, value: Any, fail: Callable[[str], SubmissionError]) -> Any:
    if name in ("nodes", "cpus_per_node"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail("must be a positive integer")
    elif name in ("gpus_per_node", "signal_grace_s"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise fail("must be an integer >= 0")
    elif name == "requeue":
        if not isinstance(value, bool):
            raise fail("must be true or false")
    elif name == "time":
        if not isinstance(value, str) or not _TIME_LIMIT.match(value):
            raise fail(f"{value!r} is not a SLURM time limit (minutes, HH:MM:SS or D-HH:MM:SS)")
    elif name == "extra_sbatch":
        if not isinstance(value, list) or not all(isinstance(item, str) and item.startswith("--") for item in value):
            raise fail("must be a list of sbatch options, each starting with --")
        return tuple(value)
    elif value is not None and not isinstance(value, str):
        raise fail("must be text")
    return value


@dataclass(frozen=True)
class SlurmSubmission:
    """What `msx slurm-job` runs, written on the login node beside the batch script."""

    experiment: str
    storage: str
    launch_arguments: tuple[str, ...]  # `msx launch` options of the first run
    requeue: bool
    srun_options: tuple[str, ...] = ()  # each worker step's resources

    @property
    def resume_arguments(self) -> tuple[str, ...]:
        """A requeued run: the same launch without --fresh, which takes over the study the first run left
        unfinished (plan_launch: same spec and data)."""
        return tuple(argument for argument in self.launch_arguments if argument != "--fresh")

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> SlurmSubmission:
        recorded = json.loads(path.read_text())
        return cls(**{**recorded, **{k: tuple(recorded[k]) for k in ("launch_arguments", "srun_options")}})


@dataclass(frozen=True)
class SubmittedFiles:
    folder: Path
    spec: Path | None
    record: Path
    script: Path
    log_pattern: str  # sbatch's --output, %j the job id


def submission_files(storage: Path, experiment: str, submission_id: str) -> SubmittedFiles:
    folder = storage / experiment / SLURM_FOLDER
    return SubmittedFiles(
        folder, folder / f"{submission_id}.yaml", folder / f"{submission_id}.json", folder / f"{submission_id}.sbatch",
        str(folder / f"{experiment}-%j.log"),
    )


def job_log(files: SubmittedFiles, job_id: str) -> Path:
    return Path(files.log_pattern.replace("%j", job_id))


def batch_script(config: SlurmClusterConfig, job_name: str, files: SubmittedFiles) -> str:
    """The sbatch script: the allocation, the setup lines, then `msx slurm-job` as the batch step's process (exec:
    the signals SLURM sends the batch step reach it)."""
    allocation = config.allocation
    options = [
        f"--job-name={job_name}",
        f"--nodes={allocation.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={allocation.cpus_per_node}",
        f"--time={allocation.time}",
        f"--output={files.log_pattern}",
        "--open-mode=append",  # a requeued run goes on in the same log
        f"--signal=B:TERM@{allocation.signal_grace_s}",
        "--requeue" if allocation.requeue else "--no-requeue",
    ]
    if allocation.partition:
        options.append(f"--partition={allocation.partition}")
    if allocation.account:
        options.append(f"--account={allocation.account}")
    if allocation.gpus_per_node:
        options.append(f"--gres=gpu:{allocation.gpus_per_node}")
    if allocation.memory_per_node:
        options.append(f"--mem={allocation.memory_per_node}")
    options += allocation.extra_sbatch
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options), ""]
    lines += [f"# msx study {job_name}: written by `msx launch --cluster`; the study's record is {files.record}", ""]
    lines += ["# setup (the config's setup lines)", *config.setup, ""]
    lines += [
        f"export MSX_STORAGE={shlex.quote(str(config.storage))}",
        f"exec msx slurm-job {shlex.quote(str(files.record))}",
        "",
    ]
    return "\n".join(lines)


def worker_srun_options(allocation: SlurmAllocation) -> tuple[str, ...]:
    """A worker step: one task on one node with the node's CPUs and GPUs, beside the batch step (--overlap)."""
    options = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={allocation.cpus_per_node}", "--overlap",
               "--kill-on-bad-exit=0"]
    if allocation.gpus_per_node:
        options.append(f"--gres=gpu:{allocation.gpus_per_node}")
    return tuple(options)


def submit_slurm_launch(
    config_path: Path, spec: ExperimentSpec | None, chosen: dict[str, Any], echo: Callable[[str], None]
) -> int:
    """Check, write, sbatch and follow; the job's outcome as an exit status (0: the study registered its champion)."""
    config = load_slurm_config(config_path)
    storage = Path(chosen["storage"]) if "storage" in chosen else config.storage
    if not storage.is_absolute():
        raise SubmissionError(f"--storage {storage}: give an absolute path as the cluster's nodes see it")
    arguments = ["--storage", str(storage), *launch_arguments(chosen)]
    experiment = spec.name if spec is not None else chosen["resume_name"]
    sbatch = _slurm_command("sbatch")
    submission_id = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    files = submission_files(storage, experiment, submission_id)
    try:
        files.folder.mkdir(parents=True, exist_ok=True)
        if spec is not None:
            files.spec.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
            arguments += ["--space", str(files.spec)]
        SlurmSubmission(
            experiment, str(storage), tuple(arguments), config.allocation.requeue,
            worker_srun_options(config.allocation),
        ).write(files.record)
        files.script.write_text(batch_script(config, f"msx-{experiment}", files))
    except OSError as error:
        raise SubmissionError(f"{storage}: cannot write the submission there ({error.strerror})") from None
    submitted = subprocess.run([sbatch, "--parsable", str(files.script)], capture_output=True, text=True)
    if submitted.returncode != 0:
        message = " ".join(submitted.stderr.split()) or f"exit status {submitted.returncode}"
        raise SubmissionError(f"sbatch refused {files.script}: {message}")
    job_id = submitted.stdout.strip().split(";")[0]
    log = job_log(files, job_id)
    allocation = config.allocation
    gpus = f" x {allocation.gpus_per_node} GPUs" if allocation.gpus_per_node else ""
    echo(
        f"submitted SLURM job {job_id} ({allocation.nodes} node{'s' if allocation.nodes > 1 else ''}{gpus}, "
        f"{allocation.cpus_per_node} CPUs each, time limit {allocation.time}, "
        f"requeue {'on' if allocation.requeue else 'off'})"
    )
    echo(f"  batch script: {files.script}")
    echo(f"  log:          {log}   (tail -f it to follow the study)")
    echo(f"  storage:      {storage}")
    echo(f"  status:       msx status {experiment} --storage {storage}")
    echo(f"  stop:         scancel --batch --signal=TERM {job_id}   (the study stops resumable"
         + (", and the job requeues to resume it" if allocation.requeue else "") + f"); scancel {job_id} kills it")
    echo("its log follows; Ctrl-C detaches (the job keeps running)")
    try:
        state = follow_job(job_id, log, echo)
    except KeyboardInterrupt:
        echo(f"detached from SLURM job {job_id}: `tail -f {log}` follows it, `squeue -j {job_id}` shows it")
        return 130
    echo(f"SLURM job {job_id}: {state}")
    return 0 if state == "COMPLETED" else 1


def _slurm_command(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SubmissionError(f"{name} is not on PATH: run msx launch --cluster with a SLURM config on a login node")
    return found


def job_state(job_id: str) -> str | None:
    """The job's state as SLURM's controller holds it (`scontrol show job`), None once it has forgotten the job."""
    shown = subprocess.run([_slurm_command("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True)
    match = re.search(r"\bJobState=(\S+)", shown.stdout)
    return match[1] if shown.returncode == 0 and match else None


def follow_job(job_id: str, log: Path, echo: Callable[[str], None], poll_s: float = POLL_S) -> str:
    """Echo the job's log as it grows until the job is over (a requeued job is followed on); its last state."""
    position = 0
    last_state = "UNKNOWN"
    while True:
        state = job_state(job_id)
        position = _echo_new_lines(log, position, echo)
        if state is None:
            return last_state
        last_state = state
        if state in ENDED_STATES:
            time.sleep(poll_s)  # the last lines may reach the shared folder after the job ends
            _echo_new_lines(log, position, echo, final=True)
            return state
        time.sleep(poll_s)


def _echo_new_lines(log: Path, position: int, echo: Callable[[str], None], final: bool = False) -> int:
    try:
        with log.open("rb") as file:
            file.seek(position)
            chunk = file.read()
    except FileNotFoundError:
        return position
    complete = chunk if final else chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        echo(line)
    return position + len(complete)


# ---- inside the allocation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllocatedNode:
    name: str
    address: str  # the IP address SLURM reaches it at


def allocation_nodes() -> list[AllocatedNode]:
    """The job's nodes in SLURM's order (the batch step runs on the first), with their addresses."""
    scontrol = _slurm_command("scontrol")
    names = subprocess.run(
        [scontrol, "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    nodes = []
    for name in names:
        shown = subprocess.run(
            [scontrol, "show", "node", "-o", name], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"\bNodeAddr=(\S+)", shown)
        nodes.append(AllocatedNode(name, socket.gethostbyname(match[1] if match else name)))
    return nodes


def node_ports() -> list[str]:
    """The fixed-by-default ports of a Ray node's agents, free here: several Ray nodes may share a machine."""
    return [f"--dashboard-agent-listen-port={free_local_port()}", f"--metrics-export-port={free_local_port()}"]


def run_job(record: Path, echo: Callable[[str], None]) -> int:
    """The batch step: Ray's head here, a worker on every node, the study's driver; SIGTERM interrupts the study,
    and an interrupted study requeues the job when the config says so. The driver's exit status."""
    submission = SlurmSubmission.read(record)
    ray_cli = str(Path(sys.executable).parent / "ray")
    msx_cli = str(Path(sys.executable).parent / "msx")
    job_id = os.environ["SLURM_JOB_ID"]
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    token = secrets.token_hex(32)
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")},
        # A token made for this job: every Ray process of the allocation gets it through the environment, which
        # srun passes on to the worker steps.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
        "MSX_STORAGE": submission.storage,
    }
    # This process asks the state API which nodes joined: with the same token, read from its own environment.
    os.environ.update({k: environment[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    nodes = allocation_nodes()
    head = nodes[0]
    gcs = f"{head.address}:{free_local_port()}"
    dashboard = f"http://127.0.0.1:{free_local_port()}"
    environment["RAY_API_SERVER_ADDRESS"] = dashboard  # as local_ray.py: Ray Train's cleaner finds the state API
    run_note = f"run {restarts + 1} (requeued {restarts} time{'s' if restarts != 1 else ''})" if restarts else "run 1"
    echo(f"msx slurm-job: job {job_id}, {run_note}, nodes {', '.join(f'{n.name} ({n.address})' for n in nodes)}")
    stop_requests: list[int] = []

    def on_term(signum: int, frame) -> None:
        stop_requests.append(signum)
        if driver is not None and driver.poll() is None and len(stop_requests) == 1:
            echo(f"msx slurm-job: {signal.Signals(signum).name}: interrupting the study (its trials stop at their "
                 "checkpoints)")
            driver.send_signal(signal.SIGTERM)

    driver: subprocess.Popen | None = None
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    head_process = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--disable-usage-stats", f"--node-ip-address={head.address}",
         f"--port={gcs.rpartition(':')[2]}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rpartition(':')[2]}",
         f"--ray-client-server-port={free_local_port()}", *node_ports()],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    workers: list[subprocess.Popen] = []
    status = 1
    try:
        _wait_for_dashboard(dashboard, head_process)
        port = dashboard.rpartition(":")[2]
        echo(f"msx slurm-job: Ray dashboard on {head.name}'s 127.0.0.1:{port}: `ssh -L 8265:127.0.0.1:{port} "
             f"{head.name}` from the login node, then http://127.0.0.1:8265 (token: the job's RAY_AUTH_TOKEN)")
        srun = _slurm_command("srun")
        started_on: set[str] = set()
        for node in nodes:
            if node.address in started_on:
                # Ray nodes sharing a machine start one after the other: started together, their raylets compete
                # for its CPUs and may miss Ray's start-up deadline.
                _wait_for_ray_nodes(dashboard, 1 + len(workers), workers)
            started_on.add(node.address)
            workers.append(subprocess.Popen(
                [srun, *submission.srun_options, f"--nodelist={node.name}", msx_cli, "slurm-node", "--address", gcs,
                 "--node-ip", node.address],
                env=environment, stdin=subprocess.DEVNULL,
            ))
        _wait_for_ray_nodes(dashboard, 1 + len(nodes), workers)
        if stop_requests:
            echo("msx slurm-job: stopped before the study started")
            status = INTERRUPTED_STATUS
        else:
            arguments = submission.resume_arguments if restarts else submission.launch_arguments
            echo(f"msx slurm-job: Ray is up ({len(nodes)} worker node{'s' if len(nodes) > 1 else ''}); "
                 f"msx launch {shlex.join(arguments)}")
            driver = subprocess.Popen([msx_cli, "launch", "--address", gcs, *arguments], env=environment)
            status = driver.wait()
    finally:
        _stop_workers(workers)
        _stop_group(head_process)
    interrupted = status == INTERRUPTED_STATUS or bool(stop_requests)
    if interrupted and submission.requeue:
        echo(f"msx slurm-job: the study was interrupted; requeueing job {job_id} to resume it")
        subprocess.run([_slurm_command("scontrol"), "requeue", job_id], check=False)
    return status


def _wait_for_dashboard(dashboard: str, head: subprocess.Popen) -> None:
    from .jobs import dashboard_answers

    deadline = time.monotonic() + NODES_WAIT_S
    while not dashboard_answers(dashboard):
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Ray's head did not start on this node (ray start exited {head.poll()})")
        time.sleep(1)


def _wait_for_ray_nodes(dashboard: str, expected: int, workers: Sequence[subprocess.Popen]) -> None:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from .jobs import token_header

    client = StateApiClient(address=dashboard, headers={**token_header(), "Content-Type": "application/json"})
    alive_only = ListApiOptions(filters=[("state", "=", "ALIVE")])
    deadline = time.monotonic() + NODES_WAIT_S
    while True:
        alive = len(client.list(StateResource.NODES, options=alive_only, raise_on_missing_output=False))
        if alive >= expected:
            return
        ended = [worker.args for worker in workers if worker.poll() is not None]
        if ended or time.monotonic() > deadline:
            raise RuntimeError(
                f"{alive - 1} of {expected - 1} Ray worker nodes joined"
                + (f"; a worker step ended: {shlex.join(map(str, ended[0]))}" if ended else f" in {NODES_WAIT_S:.0f} s")
            )
        time.sleep(1)


def _stop_workers(workers: Sequence[subprocess.Popen]) -> None:
    """Each worker step stops its Ray node on SIGUSR2 (`run_node`); srun passes the signal on to the step."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 60
    for worker in workers:
        try:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _stop_group(process: subprocess.Popen) -> None:
    """`ray start --block` stops its node's processes on SIGTERM; what is left of its session gets SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_node(gcs: str, node_ip: str, echo: Callable[[str], None]) -> int:
    """A worker step: a Ray node with the CPUs and GPUs SLURM gave this step. SIGUSR2 (the batch step's, through
    srun) stops it; SIGTERM (a plain `scancel --signal=TERM`, which reaches the steps and not the batch step) is
    passed on to the batch step, which interrupts the study in order, while this node keeps running for it."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE") or 1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = len([device for device in visible.split(",") if device.strip()]) if visible else 0
    job_id = os.environ.get("SLURM_JOB_ID")
    relayed: list[int] = []
    stopping: list[int] = []

    def on_term(signum: int, frame) -> None:
        if job_id and not relayed:
            relayed.append(signum)
            subprocess.run([_slurm_command("scancel"), "--batch", "--signal=TERM", job_id], check=False)

    def on_stop(signum: int, frame) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR2, on_stop)
    echo(f"msx slurm-node: Ray worker on {socket.gethostname()} ({node_ip}): {cpus} CPUs, {gpus} GPUs")
    for attempt in range(1, NODE_START_ATTEMPTS + 1):
        with tempfile.TemporaryFile("w+") as output:
            # A process group of its own: a signal to the step's processes reaches this wrapper, not Ray's node.
            node = subprocess.Popen(
                [ray_cli, "start", f"--address={gcs}", "--block", "--disable-usage-stats",
                 f"--node-ip-address={node_ip}", f"--num-cpus={cpus}", f"--num-gpus={gpus}", *node_ports()],
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
            while node.poll() is None and not stopping:
                time.sleep(0.5)
            _stop_group(node)
            if stopping:
                return 0
            output.seek(0)
            tail = " ".join(output.read().split()[-60:])
        # A port taken between its choice and its use (several nodes may share a machine) ends `ray start`: again,
        # with other ports.
        echo(f"msx slurm-node: ray start on {node_ip} ended (exit {node.returncode}, try {attempt} of "
             f"{NODE_START_ATTEMPTS}): {tail}")
    return 1
