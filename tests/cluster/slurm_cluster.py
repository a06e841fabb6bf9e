"""A real SLURM cluster on this machine, for tests: munged, slurmctld and one slurmd per node, all from one folder.

    reason = missing_requirement()          # skip the test with it when not None
    with start_slurm_cluster(tmp_path, nodes=2) as cluster:
        job_id = cluster.sbatch("--nodes=2", "--wrap", "srun hostname")
        cluster.wait_for_job_state(job_id, {"COMPLETED"})
        subprocess.run([...], env=cluster.process_environment())   # e.g. the project's CLI, which calls sbatch

Everything the cluster reads or writes is in the folder it is given: its munge key, munged's socket, PID and seed
files, slurm.conf (and an empty plugstack.conf, so that /etc/slurm's is not read), the controller's StateSaveLocation,
each node's SlurmdSpoolDir, the daemons' PID and log files. Nothing of a system-wide SLURM or munge setup
(/etc/slurm, /etc/munge, /run/munge, /var/spool/slurm*, systemd units) is read, started or changed. The cluster's
commands (sbatch, squeue, scontrol, scancel, sinfo; srun inside its jobs, which inherit the variable from sbatch)
reach it only through SLURM_CONF, and find munged's socket in that slurm.conf (AuthInfo=socket=...): `environment`
holds the variable to add, `process_environment()` a whole environment without any SLURM_* of the caller's own.

The daemons listen on 127.0.0.1 only, on free ports chosen at start: CommunicationParameters=NoCtldInAddrAny,
NoInAddrAny binds them to what this machine's hostname resolves to, which missing_requirement() requires to be
127.0.0.1 (Debian's /etc/hosts default); SlurmctldHost=<hostname>(127.0.0.1), since slurmctld insists on running
on the host its SlurmctldHost names.

Several nodes on one host: Debian's SLURM 22.05 is built with --enable-multiple-slurmd (`scontrol show config`:
MULTIPLE_SLURMD = Yes), so several slurmd run here, each as `slurmd -D -N <node>` with its own Port= (every
NodeAddr is 127.0.0.1), spool, PID and log file (%n in slurm.conf), all sharing one munged: srun sends one job-step
credential to every node of a step, so that munged decodes it once per node and reports it as replayed, which a
multiple-slurmd build accepts ("We had a replayed credential, but this is expected" at SlurmdDebug=debug2). A build
without that option refuses the replay (SLURM's source: "Credential replayed"), and would need a munged per node,
so start_slurm_cluster checks MULTIPLE_SLURMD before it starts a second node and says so.

Jobs run as root. Each node offers `cpus_per_node` CPUs (default 2, what this 2-core machine has), with
SlurmdParameters=config_overrides so that a node is never drained for having fewer: two nodes oversubscribe the
machine's cores twice over, which is fine for tests. select/cons_tres with CR_CPU: memory is not a scheduled resource.

Signals and requeue, as observed with this harness (SLURM 22.05.8):
- `scancel --signal=TERM ID` signals the job's steps but not the batch script: a job with no srun step sees nothing.
  `--batch` (-b) signals the batch shell only, not its children; `--full` (-f) the shell and all its children. Bash
  runs a TERM trap only once a foreground child has ended, so a script that must react at once runs its work in the
  background and `wait`s for it. After the signal slurmstepd prints "*** JOB ID ON node1 CANCELLED AT ... ***" to the
  job's output although the job was only signalled; a script that traps TERM and exits 143 ends FAILED, ExitCode 143:0.
- `scontrol requeue ID` works on a running job (it is sent SIGTERM, SIGKILL KillWait later) and on an ended one
  (FAILED, COMPLETED, CANCELLED) that is requeueable (sbatch --requeue, or the default with JobRequeue=1; one sent
  with --no-requeue is refused: "Requested operation is presently disabled for job ID"). The job is
  PENDING with Reason=BeginTime until the job credential's lifetime has passed: begin time = now + AuthInfo's
  cred_expire + 1 s (SLURM's default is 120 s; 5 here, its minimum), so it starts again about 6-10 s later, under the
  same job ID, with SLURM_RESTART_COUNT=1 (2 after a second requeue; unset in the first run) and Restarts=1 in
  `scontrol show job`. Its output file is truncated on the new start unless sbatch had --open-mode=append.
- The scheduler runs every second (SchedulerParameters=sched_interval=1): its default 60 s would keep a requeued job
  pending for up to a minute after its begin time.
- Ended jobs stay visible to `scontrol show job` for MinJobAge=300 s; there is no accounting storage, so no sacct.

Needs root on Linux and Debian's slurmctld, slurmd, slurm-client and munge (`make slurm` installs them as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "squeue", "scontrol",
            "scancel", "sinfo")
DEBIAN_PACKAGES = "slurmctld, slurmd, slurm-client, munge"
# A requeued job may start again this long (plus a second) after its requeue; 5 is SLURM's minimum.
CREDENTIAL_LIFETIME_S = 5
# Unix sockets (munged's; slurmd's one per step, `<spool>/<node>_<job>.<step>`) cannot have paths over 107 bytes, so
# a longer root is reached through a short symbolic link instead.
LONGEST_ROOT = 60
DAEMON_START_S = 30
DAEMON_STOP_S = 15
COMMAND_S = 30
JOBS_END_S = 20
# Where slurmctld, slurmd and munged are on Debian, in case a non-login PATH lacks them.
SBIN = "/usr/sbin:/usr/local/sbin:/sbin"


class SlurmClusterError(RuntimeError):
    pass


def missing_requirement() -> str | None:
    """Why a SLURM cluster cannot start here (for a test's skip), or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux: munged and slurmd run as root from the test's folder, and so do the jobs"
    missing = [binary for binary in BINARIES if _which(binary) is None]
    if missing:
        return f"needs {', '.join(missing)} (Debian: {DEBIAN_PACKAGES}; `make slurm` installs them as root)"
    hostname = socket.gethostname()
    try:
        address = socket.gethostbyname(hostname)
    except OSError as error:
        return f"needs this machine's hostname {hostname!r} to resolve: {error}"
    if address != LOOPBACK:
        return f"needs the hostname {hostname!r} to resolve to {LOOPBACK}, where the daemons listen, not to {address}"
    return None


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path=SBIN)


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


def _log_tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _environment_without_slurm() -> dict[str, str]:
    # A test run from inside a SLURM job (or with SBATCH_* defaults) must not lend its job's settings to this cluster.
    prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")
    return {name: value for name, value in os.environ.items() if not name.startswith(prefixes)}


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen
    log: Path  # what the daemon logs to
    output: Path  # its stdout and stderr

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        tails = [f"the end of {self.log}:\n{_log_tail(self.log, lines)}"]
        if self.output != self.log:
            tails.append(f"the end of {self.output}:\n{_log_tail(self.output, lines)}")
        return "\n".join(tails)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(DAEMON_STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait(DAEMON_STOP_S)


@dataclass
class SlurmCluster:
    """A running cluster; `stop()` (or leaving the `with` block) ends it and whatever its jobs left running."""

    root: Path
    node_names: list[str]
    cpus_per_node: int
    controller_port: int
    node_ports: dict[str, int]
    cluster_name: str
    # The path slurm.conf names root by: root itself, or a short link to it (LONGEST_ROOT).
    config_root: Path
    daemons: list[Daemon] = field(default_factory=list)
    short_link: Path | None = None

    @property
    def conf_path(self) -> Path:
        return self.config_root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.config_root / "munge" / "munge.sock"

    @property
    def environment(self) -> dict[str, str]:
        """Variables to add to a command's environment so that its SLURM commands reach this cluster."""
        return {"SLURM_CONF": str(self.conf_path)}

    def process_environment(self, **extra: str) -> dict[str, str]:
        """This process's environment without its SLURM_*/SBATCH_*/... variables, plus `environment` and `extra`."""
        return {**_environment_without_slurm(), **extra, **self.environment}

    @property
    def pids(self) -> list[int]:
        """The daemons' PIDs: munged, slurmctld, one slurmd per node."""
        return [daemon.process.pid for daemon in self.daemons]

    # Commands.

    def run(self, *command: str, timeout: float = COMMAND_S, check: bool = False,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM command (sinfo, squeue, scontrol, scancel, ...) against this cluster, its output as text."""
        return subprocess.run(list(command), env=self.process_environment(), cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def sbatch(self, *arguments: str, cwd: Path | None = None) -> int:
        """Submit a batch job (`sbatch --parsable ARGUMENTS`) and return its ID."""
        result = self.run("sbatch", "--parsable", *arguments, cwd=cwd)
        if result.returncode != 0:
            raise SlurmClusterError(f"sbatch {' '.join(arguments)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict: JobState, ExitCode, Restarts, Reason, NodeList, ... ({} if unknown)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id))
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        info: dict[str, str] = {}
        # Only the last fields (Command=, WorkDir=, StdOut=, ...) may hold spaces; the first of a key wins.
        for item in result.stdout.splitlines()[0].split():
            key, _, value = item.partition("=")
            info.setdefault(key, value)
        return info

    def job_state(self, job_id: int | str) -> str:
        """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, ... ('' if unknown; ended jobs stay 300 s)."""
        return self.job_info(job_id).get("JobState", "")

    def wait_for_job_state(self, job_id: int | str, states: set[str], timeout: float = 60) -> str:
        """Wait until the job is in one of `states` and return that state; SlurmClusterError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} not {' or '.join(sorted(states))} after {timeout:.0f} s but "
                                        f"{state or 'unknown'}: {self.job_info(job_id)}\n{self.logs_tail()}")
            self._check_daemons_alive()
            time.sleep(0.5)

    def node_states(self) -> dict[str, str]:
        """Node name to sinfo's state (idle, allocated, mixed, down*, ...)."""
        result = self.run("sinfo", "--noheader", "--Node", "--format=%N %T")
        return dict(line.split(maxsplit=1) for line in result.stdout.splitlines() if line.strip())

    def wait_for_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_daemons_alive()
            states = self.node_states()
            if states == {node: "idle" for node in self.node_names}:
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs_tail()}")
            time.sleep(0.5)

    def logs_tail(self, lines: int = 10) -> str:
        return "\n".join(f"{daemon.name}: {daemon.tail(lines)}" for daemon in self.daemons)

    # Stopping.

    def stop(self) -> None:
        """Cancel every job, end the daemons by PID (nodes, controller, munged) and kill what jobs left running.
        Safe to call twice."""
        try:
            self._cancel_all_jobs()
        finally:
            # Nodes before the controller, which they would otherwise keep retrying; munged last, which both use.
            order = {"slurmd": 0, "slurmctld": 1, "munged": 2}
            for daemon in sorted(self.daemons, key=lambda daemon: order[daemon.name.split("-")[0]]):
                daemon.stop()
            self._kill_job_processes()
            if self.short_link is not None:
                shutil.rmtree(self.short_link.parent, ignore_errors=True)
                self.short_link = None

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _cancel_all_jobs(self) -> None:
        if not all(daemon.alive() for daemon in self.daemons if daemon.name in ("munged", "slurmctld")):
            return
        try:
            job_ids = self.run("squeue", "--noheader", "--format=%i", timeout=10).stdout.split()
            if not job_ids:
                return
            self.run("scancel", *job_ids, timeout=10)
            deadline = time.monotonic() + JOBS_END_S
            # squeue lists pending, running and completing jobs: empty once every job has released its nodes.
            while self.run("squeue", "--noheader", "--format=%i", timeout=10).stdout.split():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass  # what the controller could not end, _kill_job_processes does

    def _kill_job_processes(self) -> None:
        """Kill what this cluster's jobs left behind: processes that hold a file of the cluster's folder open
        (slurmstepd: its node's log and step socket; a job: its output file) or whose environment names the
        cluster (a job's processes: SLURM_CLUSTER_NAME, and SLURM_CONF from sbatch's environment)."""
        spared = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
        folders = tuple(f"{folder}{os.sep}" for folder in {str(self.root), str(self.config_root)})
        leftovers = []
        for process in psutil.process_iter():
            if process.pid in spared:
                continue
            try:
                environment = process.environ()
                ours = (environment.get("SLURM_CLUSTER_NAME") == self.cluster_name
                        or environment.get("SLURM_CONF") == str(self.conf_path)
                        or any(file.path.startswith(folders) for file in process.open_files()))
            except (psutil.Error, OSError):
                continue  # ended meanwhile, or a zombie
            if ours:
                leftovers.append(process)
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=DAEMON_STOP_S)

    def _check_daemons_alive(self) -> None:
        for daemon in self.daemons:
            if not daemon.alive():
                raise SlurmClusterError(f"{daemon.name} exited with {daemon.process.returncode}; {daemon.tail()}")


def start_slurm_cluster(root: Path, nodes: int = 2, cpus_per_node: int = 2, memory_mb: int = 2048) -> SlurmCluster:
    """Start munged, slurmctld and `nodes` slurmd (node1, node2, ...; partition `debug`) from the existing folder
    `root` and wait until every node is idle. On a failure, stops what it started and raises SlurmClusterError
    with the end of the log that explains it."""
    reason = missing_requirement()
    if reason:
        raise SlurmClusterError(f"cannot start a SLURM cluster: it {reason}")
    root = Path(root).resolve()
    if any(character in str(root) for character in " ,#\"'="):
        raise SlurmClusterError(f"{root}: slurm.conf cannot name a path with spaces, commas, '#', quotes or '='")
    config_root, short_link = root, None
    if len(str(root)) > LONGEST_ROOT:
        short_link = Path(tempfile.mkdtemp(prefix="slurm-")) / "r"
        short_link.symlink_to(root)
        config_root = short_link
    controller_port = _free_port(set())
    node_names = [f"node{index + 1}" for index in range(nodes)]
    node_ports: dict[str, int] = {}
    for node in node_names:
        node_ports[node] = _free_port({controller_port, *node_ports.values()})
    cluster = SlurmCluster(root=root, node_names=node_names, cpus_per_node=cpus_per_node,
                           controller_port=controller_port, node_ports=node_ports,
                           cluster_name=f"test{controller_port}", config_root=config_root, short_link=short_link)
    try:
        _write_config(cluster, memory_mb)
        _start_munged(cluster)
        _start_daemon(cluster, "slurmctld", ["slurmctld", "-D", "-f", str(cluster.conf_path)], root / "slurmctld.log",
                      ready=lambda: cluster.run("scontrol", "ping", timeout=10).returncode == 0)
        if nodes > 1:
            _check_multiple_slurmd(cluster)
        for node in node_names:
            _start_daemon(cluster, f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(cluster.conf_path)],
                          root / f"slurmd-{node}.log")
        cluster.wait_for_nodes_idle(DAEMON_START_S)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _write_config(cluster: SlurmCluster, memory_mb: int) -> None:
    for folder in ("state", "munge", *(f"spool-{node}" for node in cluster.node_names)):
        (cluster.root / folder).mkdir(mode=0o700, exist_ok=True)
    (cluster.root / "plugstack.conf").write_text("")
    base = cluster.config_root
    # KillWait: the grace between SIGTERM and SIGKILL when a job is cancelled or requeued. SlurmdTimeout: how long
    # until a silent node is DOWN (and its jobs requeued), short, yet long enough for two busy cores.
    settings = f"""\
ClusterName={cluster.cluster_name}
SlurmctldHost={socket.gethostname()}({LOOPBACK})
SlurmctldPort={cluster.controller_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={cluster.munge_socket},cred_expire={CREDENTIAL_LIFETIME_S}
StateSaveLocation={base}/state
SlurmctldPidFile={base}/slurmctld.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmctldDebug=info
SlurmdSpoolDir={base}/spool-%n
SlurmdPidFile={base}/slurmd-%n.pid
SlurmdLogFile={base}/slurmd-%n.log
SlurmdDebug=info
SlurmdParameters=config_overrides
PlugStackConfig={base}/plugstack.conf
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=2
"""
    nodes = "".join(f"NodeName={node} NodeAddr={LOOPBACK} Port={cluster.node_ports[node]} CPUs={cluster.cpus_per_node} "
                    f"RealMemory={memory_mb} State=UNKNOWN\n" for node in cluster.node_names)
    partition = f"PartitionName=debug Nodes={','.join(cluster.node_names)} Default=YES MaxTime=INFINITE State=UP\n"
    (cluster.root / "slurm.conf").write_text(settings + nodes + partition)


def _start_munged(cluster: SlurmCluster) -> None:
    folder = cluster.root / "munge"
    key = folder / "munge.key"
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True,
                   timeout=COMMAND_S)
    key.chmod(0o400)
    # munged runs as root, the key's owner. --force: it refuses a socket in folders that are not open to all users
    # (pytest's temporary folders are 0700), and in the foreground it logs to stderr only: munged.out.
    _start_daemon(cluster, "munged",
                  ["munged", "--foreground", "--force", "--num-threads=4", f"--socket={cluster.munge_socket}",
                   f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}"],
                  folder / "munged.out", ready=cluster.munge_socket.exists)


def _check_multiple_slurmd(cluster: SlurmCluster) -> None:
    config = cluster.run("scontrol", "show", "config", check=True).stdout
    if not any(line.split() == ["MULTIPLE_SLURMD", "=", "Yes"] for line in config.splitlines()):
        raise SlurmClusterError("this SLURM is built without --enable-multiple-slurmd, so one host runs one node "
                                "only: start_slurm_cluster(..., nodes=1)")


def _start_daemon(cluster: SlurmCluster, name: str, command: list[str], log: Path,
                  ready: Callable[[], bool] | None = None) -> None:
    """Start a daemon in the foreground as a child of this process; with `ready`, wait until that says it serves.
    `log` is the file the daemon logs to; its stdout and stderr go to the same name ending in .out."""
    output_path = log.with_suffix(".out")
    with open(output_path, "ab") as output:
        # A session of its own, so that a Ctrl-C meant for the test does not reach the daemons before stop() does.
        process = subprocess.Popen([_which(command[0]) or command[0], *command[1:]], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT,
                                   env=cluster.process_environment(), start_new_session=True)
    daemon = Daemon(name=name, process=process, log=log, output=output_path)
    cluster.daemons.append(daemon)
    deadline = time.monotonic() + DAEMON_START_S
    while ready is not None and not ready():
        if not daemon.alive():
            raise SlurmClusterError(f"{name} exited with {process.returncode} while starting; {daemon.tail()}")
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"{name} not ready after {DAEMON_START_S} s; {daemon.tail()}")
        time.sleep(0.2)
