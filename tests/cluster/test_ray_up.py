"""`msx launch --cluster` as a user runs it, on a cluster that `ray up` builds over SSH from cluster/local.yaml.

Two machines on this one: an SSH server on 127.0.0.1 (the head) and one on 127.0.0.2 (the worker), each PID 1
of PID and mount namespaces of its own in which this user's home folder is the machine's own folder. So a
node's `ray stop` sees that node's processes only, and each node has its own ~/msx, ~/msx-venv, ~/.ray, as on
separate machines. A folder plays the shared mount. The cluster config is cluster/local.yaml with what its
PLACEHOLDERs ask a user to fill in (addresses, SSH login and key; the SSH port, through `ssh_proxy_command`)
and the shared mount's path changed, and nothing else.

Then, as in cluster/README.md: a wheelhouse on the shared mount (cluster/wheelhouse.sh: the nodes install
from it and reach no package index), a Ray token (`ray get-auth-token --generate`), the cohort on the shared
mount, and `msx launch --cluster CONFIG --space tiny.yaml --data ...` from a copy of the checkout, with a
home folder of its own and no RAY_* variables: `ray up` (setup_node.sh on both nodes, the worker's run by the
head's autoscaler), the dashboard tunnel, the study as a Ray job, its logs here. Then `ray exec CONFIG 'msx
status'`, a second `ray up` after a change to the checkout, and `ray down`.

The SSH servers listen on 127.0.0.1 and 127.0.0.2 only, on a free port; their config, host key and authorized
keys are in the test's temporary folder and nothing of the system's SSH setup is read or changed. Needs
root (namespaces; sshd logging in as this user) and Debian's openssh-server, rsync and netcat-openbsd, which
`make test` installs where apt-get can run as root; elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from msx.orchestrator.tracking.registry import FINGERPRINT_TAG

from .test_multinode import FOLDS, TINY_SPEC

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPOSITORY = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")
USER_HOME = pwd.getpwuid(os.getuid()).pw_dir
HEAD, WORKER = "127.0.0.1", "127.0.0.2"
COMMANDS_S = 900  # the longest any one command here may take (the study: about 3 minutes)
WORKER_SETUP_S = 600
WORKER_TEARDOWN_S = 300


def missing_requirement() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux: each node's sshd runs in a PID namespace of its own"
    missing = [tool for tool in ("ssh", "ssh-keygen", "rsync", "nc", "unshare") if shutil.which(tool) is None]
    if not SSHD.is_file():
        missing.append(str(SSHD))
    if missing:
        return (
            f"needs {', '.join(missing)} "
            "(Debian: openssh-server, rsync, netcat-openbsd; `make test` installs them as root)"
        )
    return None


@pytest.fixture(scope="module", autouse=True)
def requirements():
    reason = missing_requirement()
    if reason:
        pytest.skip(f"the ray up cluster test {reason}")


def free_port_on_both() -> int:
    """A TCP port free on 127.0.0.1 and on 127.0.0.2."""
    while True:
        with socket.socket() as head:
            head.bind((HEAD, 0))
            port = head.getsockname()[1]
            with socket.socket() as worker:
                try:
                    worker.bind((WORKER, port))
                except OSError:
                    continue
        return port


def pid_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


@dataclass
class Machine:
    """One node: an sshd on `address`, PID 1 of a PID namespace of its own, in which this user's home is `home`."""

    address: str
    home: Path
    server: subprocess.Popen = field(repr=False)
    init_pid: int = 0

    def processes(self) -> list[psutil.Process]:
        """Everything running on this machine but its sshd (the listener and the sessions' own processes)."""
        namespace = pid_namespace(self.init_pid)
        found = []
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                if process.info["name"] != "sshd" and pid_namespace(process.pid) == namespace:
                    found.append(process)
            except (OSError, psutil.Error):
                continue  # ended meanwhile
        return found

    def ray_processes(self, name: str) -> list[psutil.Process]:
        return [p for p in self.processes() if p.info["name"] == name]

    def shut_down(self) -> None:
        """Everything in the namespace dies with its PID 1."""
        with suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGKILL)
        self.server.wait(timeout=30)


def start_machine(root: Path, address: str, port: int, host_key: Path, authorized_keys: Path) -> Machine:
    """An sshd on `address`:`port`, PID 1 of new PID and mount namespaces in which this user's home folder is
    a folder of this machine's own (bind-mounted there: nothing changes outside the namespaces)."""
    home = root / f"home-{address}"
    home.mkdir()
    config = root / f"sshd-{address}.conf"
    config.write_text("\n".join([
        f"ListenAddress {address}:{port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {getpass.getuser()}",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",            # the keys live under /tmp, which every user may write
        "AllowTcpForwarding local",  # the dashboard tunnel (ssh -L)
        "X11Forwarding no",
        "MaxStartups 100",           # Ray opens several connections at once
        "MaxSessions 100",
        "PidFile none",
        "",
    ]))
    subprocess.run([SSHD, "-t", "-f", config], check=True)
    log = root / f"sshd-{address}.log"
    with (root / f"unshare-{address}.log").open("w") as errors:
        server = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--kill-child", "--",
             "/bin/sh", "-c", 'mount --bind "$1" "$2" && exec "$3" -D -f "$4" -E "$5"',
             "sh", home, USER_HOME, SSHD, config, log],
            stderr=errors, start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while True:
        children = psutil.Process(server.pid).children()
        if children and socket_answers(address, port):
            return Machine(address, home, server, children[0].pid)
        if server.poll() is not None or time.monotonic() > deadline:
            logs = "".join(path.read_text() for path in (log, Path(errors.name)) if path.exists())
            raise AssertionError(f"sshd on {address}:{port} did not start: {logs}")
        time.sleep(0.2)


def socket_answers(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Site:
    """The machines, the user's side (a home with the Ray token, a checkout) and the cluster config."""

    root: Path
    head: Machine
    worker: Machine
    key: Path
    laptop_home: Path
    checkout: Path
    shared: Path
    config: Path
    cluster_name: str
    environment: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    launch_started: float = 0.0

    def run(
        self, *command, environment: dict[str, str] | None = None, check: bool = False,
    ) -> subprocess.CompletedProcess:
        """A command on the user's side, from the checkout: its output, and with `check` its success."""
        result = subprocess.run(
            [str(part) for part in command], cwd=self.checkout, env={**self.environment, **(environment or {})},
            capture_output=True, text=True, timeout=COMMANDS_S,
        )
        assert not check or result.returncode == 0, f"{command}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        return result


def cluster_config(shared: Path, cluster_name: str, key: Path, port: int) -> dict:
    """cluster/local.yaml with the PLACEHOLDERs filled in for these machines, and the shared mount moved."""
    text = (REPOSITORY / "cluster" / "local.yaml").read_text()
    assert "/mnt/shared" in text
    config = yaml.safe_load(text.replace("/mnt/shared", str(shared)))
    config["cluster_name"] = cluster_name
    config["provider"].update(head_ip=HEAD, worker_ips=[WORKER])
    config["auth"] = {
        "ssh_user": getpass.getuser(),
        "ssh_private_key": str(key),
        # Ray's config has no SSH port; the proxy command is how a non-standard port (or a bastion) is reached.
        "ssh_proxy_command": f"nc %h {port}",
    }
    return config


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_up")
    key, host_key = root / "id_ed25519", root / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "msx-test", "-f", path], check=True)
    authorized_keys = root / "authorized_keys"
    authorized_keys.write_text(Path(f"{key}.pub").read_text())
    # sshd's privilege separation folder, which the package's service would make.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port_on_both()
    configs_before = set(glob.glob(f"{tempfile.gettempdir()}/ray-config-*"))
    machines = []
    try:
        for address in (HEAD, WORKER):
            machines.append(start_machine(root, address, port, host_key, authorized_keys))
        # The head's autoscaler logs in to the workers without ssh_proxy_command (Ray drops it from the config
        # it gives the head), so on port 22 unless the head machine's SSH client is told otherwise.
        (machines[0].home / ".ssh").mkdir(mode=0o700)
        (machines[0].home / ".ssh" / "config").write_text(f"Host {WORKER}\n  Port {port}\n")
        # The user's side: a checkout holding what the config copies to the nodes, and a home of its own.
        checkout, laptop_home, shared = root / "checkout", root / "home-laptop", root / "shared"
        for folder in (checkout, laptop_home, shared):
            folder.mkdir()
        cluster_name = f"msx-test-{os.getpid()}"
        config = cluster_config(shared, cluster_name, key, port)
        for local in config["file_mounts"].values():
            if local.startswith("./"):
                source = REPOSITORY / local
                copy = shutil.copytree if source.is_dir() else shutil.copy2
                copy(
                    source, checkout / local,
                    **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}),
                )
        config_path = root / "cluster.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        environment = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("RAY_", "MLFLOW_", "MSX_"))
        }
        environment.update(
            HOME=str(laptop_home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
        )
        yield Site(
            root, machines[0], machines[1], key, laptop_home, checkout, shared, config_path, cluster_name, environment,
        )
    finally:
        for machine in machines:
            machine.shut_down()
        # What `ray up` keeps on this machine: the local provider's record of the cluster (which the head's
        # autoscaler shares here), its SSH control sockets, its cache of the prepared config.
        for suffix in ("lock", "state"):
            Path(f"{tempfile.gettempdir()}/ray/cluster-{cluster_name}.{suffix}").unlink(missing_ok=True)
        user_hash, cluster_hash = (
            hashlib.sha256(text.encode()).hexdigest()[:10] for text in (getpass.getuser(), cluster_name)
        )
        shutil.rmtree(f"{tempfile.gettempdir()}/ray_ssh_{user_hash}/{cluster_hash}", ignore_errors=True)
        for cache in set(glob.glob(f"{tempfile.gettempdir()}/ray-config-*")) - configs_before:
            Path(cache).unlink(missing_ok=True)


def note_worker_ray(site: Site) -> bool:
    """Whether Ray runs on the worker machine; the first time it does, and it first trains, when that was."""
    processes = site.worker.processes()
    for event, name in (("worker_ray", "raylet"), ("worker_training", "RayTrainWorker")):
        if f"launch_to_{event}_s" not in site.timings and any(
            name in " ".join(p.info["cmdline"] or []) for p in processes
        ):
            site.timings[f"launch_to_{event}_s"] = time.monotonic() - site.launch_started
    return "launch_to_worker_ray_s" in site.timings


@dataclass
class Launch:
    returncode: int
    lines: list[tuple[float, str]]  # (seconds since the launch started, line)

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> float:
        return next(at for at, line in self.lines if re.search(pattern, line))


def launch(site: Site, *arguments: str) -> Launch:
    """`msx launch ...` from the checkout, timing each line it prints; meanwhile, when the worker's Ray starts."""
    started = site.launch_started = time.monotonic()
    process = subprocess.Popen(
        [str(BIN / "msx"), "launch", *arguments], cwd=site.checkout, env=site.environment,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in process.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while process.poll() is None:
        note_worker_ray(site)
        if time.monotonic() - started > COMMANDS_S:
            process.kill()
        time.sleep(1)
    reader.join(timeout=30)
    return Launch(process.returncode, lines)


@pytest.fixture(scope="module")
def prepared(site) -> tuple[Path, Path]:
    """What cluster/README.md asks for before the first `ray up`, and the study's spec and cohort: (spec, data)."""
    started = time.monotonic()
    site.run(
        "bash", "cluster/wheelhouse.sh", site.shared / "wheelhouse", environment={"PYTHON": sys.executable}, check=True,
    )
    site.timings["wheelhouse_s"] = time.monotonic() - started
    assert not list((site.shared / "wheelhouse").glob("msx-*"))
    site.run(BIN / "ray", "get-auth-token", "--generate", check=True)
    assert (site.laptop_home / ".ray" / "auth_token").is_file()
    data = site.shared / "data" / "tiny"
    synthetic = TINY_SPEC["data"]["synthetic"]
    site.run(BIN / "msx", "synth", "--out", data, "--patients", synthetic["patients"],
             "--shape", ",".join(map(str, synthetic["shape"])), "--seed", synthetic["seed"], check=True)
    spec = site.root / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY_SPEC))
    return spec, data


@pytest.fixture(scope="module")
def study(site, prepared) -> Launch:
    """`msx launch --cluster`, as a user types it."""
    spec, data = prepared
    result = launch(site, "--cluster", str(site.config), "--space", str(spec), "--data", str(data))
    print(f"msx launch --cluster: exit status {result.returncode}; its console, first and last 15 lines:")
    print("\n".join(f"[{at:6.0f} s] {line}" for at, line in result.lines[:15]))
    print("...")
    print("\n".join(f"[{at:6.0f} s] {line}" for at, line in result.lines[-15:]))
    assert result.returncode == 0, result.output[-6000:]
    site.timings.update(
        launch_to_nodes_up_s=result.first(r"all 2 nodes of the cluster are up"),
        launch_to_job_submitted_s=result.first(r"submitted Ray job"),
        launch_to_first_trial_s=result.first(r"trials \d+/\d+ done, [1-9]\d* running"),
        launch_to_job_end_s=result.lines[-1][0],
    )
    return result


def test_launch_brings_the_cluster_up_and_runs_the_study_as_a_job(site, study):
    output = study.output
    assert f"bringing up the cluster of {site.config}" in output
    assert "Ray dashboard of the cluster: http://127.0.0.1:" in output
    # it waited for the worker, which the head's autoscaler set up meanwhile, and the study used it
    assert "waiting for the cluster's workers: 1 of 2 nodes up" in output
    assert study.first("all 2 nodes of the cluster are up") < study.first("submitted Ray job")
    assert "launch_to_worker_training_s" in site.timings, "no training worker ran on the worker machine"
    assert "submitted Ray job msx-tiny-" in output
    assert f"finished {FOLDS}/{FOLDS} trials" in output
    assert "registered model: models:/msx-tiny" in output
    assert "SUCCEEDED" in output
    # The head installed from the wheelhouse, not from a package index (ray up shows the head's setup).
    assert f"its requirements from {site.shared / 'wheelhouse'} only" in output


def test_msx_closed_its_dashboard_tunnel(site, study):
    def tunnels() -> list[str]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if str(site.key) in command and re.search(r"-L \d+:localhost:8265", command):
                found.append(command)
        return found

    deadline = time.monotonic() + 20
    while tunnels() and time.monotonic() < deadline:
        time.sleep(1)
    assert not tunnels()


@pytest.fixture(scope="module")
def worker_joined(site, study):
    """The head's autoscaler sets the worker up while the study runs; it may finish after the study."""
    deadline = time.monotonic() + WORKER_SETUP_S
    while not note_worker_ray(site) and time.monotonic() < deadline:
        time.sleep(2)
    return site.worker.ray_processes("raylet")


def test_the_worker_joined_the_cluster_under_its_own_address(site, worker_joined):
    assert worker_joined, f"no Ray on the worker machine after {WORKER_SETUP_S} s; the head's logs/monitor.out tell why"
    assert any(f"--node_ip_address={WORKER}" in " ".join(r.cmdline()) for r in worker_joined)
    # Set up on its own machine through the head's autoscaler: installed (with the wheelhouse there, setup_node.sh
    # installs with --no-index: nothing can have come from an index), and the token copied from the head.
    assert (site.worker.home / "msx-venv" / ".msx-requirements").is_file()
    assert (site.worker.home / ".ray" / "auth_token").read_text() == (
        site.laptop_home / ".ray" / "auth_token"
    ).read_text()


def test_study_ran_on_the_clusters_storage_and_registered_its_champion(site, study):
    storage = site.shared / "msx_runs"  # MSX_STORAGE on the nodes: no --storage was given
    assert list((storage / "tiny" / "submitted").glob("msx-tiny-*.yaml"))
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("msx-tiny", "champion")
    assert champion.tags[FINGERPRINT_TAG]


def test_status_on_the_head_reports_the_study_finished(site, study):
    status = site.run(BIN / "ray", "exec", site.config, "msx status tiny", check=True)
    assert "finished at" in status.stdout + status.stderr
    assert f"trials: {FOLDS}/{FOLDS} done, 0 running, 0 failed" in status.stdout + status.stderr


@pytest.fixture(scope="module")
def second_up(site, study, worker_joined):
    """`ray up` again after a change to the checkout (as after a `git pull`): setup runs again, installs nothing."""
    with (site.checkout / "README.md").open("a") as readme:
        readme.write("\n<!-- changed for the second ray up -->\n")
    started = time.monotonic()
    result = site.run(BIN / "ray", "up", "--yes", "--no-restart", "--disable-usage-stats", site.config)
    site.timings["second_ray_up_s"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_second_ray_up_is_quick_and_installs_nothing(site, second_up):
    assert "installed already" in second_up
    assert "Installing collected packages" not in second_up
    assert (site.head.home / "msx" / "README.md").read_text().endswith("<!-- changed for the second ray up -->\n")


@pytest.fixture(scope="module")
def down(site, second_up):
    started = time.monotonic()
    result = site.run(BIN / "ray", "down", "--yes", site.config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    site.timings["ray_down_s"] = time.monotonic() - started
    # A worker's raylet ends by itself once its head is gone (about a minute), then its watchdog stops the rest.
    deadline = time.monotonic() + WORKER_TEARDOWN_S
    while site.worker.processes() and time.monotonic() < deadline:
        time.sleep(1)
    site.timings["ray_down_to_worker_gone_s"] = time.monotonic() - started
    print("timings:", json.dumps({name: round(value, 1) for name, value in site.timings.items()}))
    return result


def test_ray_down_leaves_nothing_running(site, down):
    for machine in (site.head, site.worker):
        left = [" ".join(p.cmdline())[:200] for p in machine.processes()]
        assert not left, f"still running on {machine.address}: {left}"
