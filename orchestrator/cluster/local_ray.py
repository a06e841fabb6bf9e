"""The local Ray that every study launched on this machine shares.

Studies on one machine share one Ray: one study's end must not stop the Ray under another's trials, and the
machine's CPUs and GPUs are best shared out by one scheduler. So the first
`msx launch` without --address starts a Ray of its own (`ray start --head --block`, in a process session
of its own so that a Ctrl-C in the launching terminal reaches that terminal's driver only), its dashboard
bound to 127.0.0.1 and token authentication on (Ray puts its own ports on the machine's address, never on
the loopback one), and the next launches connect to it: its dashboard lists every
study's driver (Jobs). Each driver holds a lease, a file named after its pid, while its study runs; the
driver that gives back the last lease stops the Ray. A driver killed outright leaves a lease whose process
is gone: it is ignored, and the Ray stops when the next study on the machine ends (or with
`msx ray stop`). Starting, joining and stopping happen under one file lock, so that two launches never
both start a Ray, nor does one stop it while another joins.

The folder (`MSX_LOCAL_RAY_DIR`, default <tmp>/msx-<uid>) holds the lock, the record of the running Ray
(JSON: addresses and the keeper's pid) and the leases.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from .jobs import dashboard_answers, free_local_port

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


class LocalRayError(RuntimeError):
    pass


@dataclass(frozen=True)
class LocalRay:
    gcs_address: str
    dashboard_url: str
    keeper_pid: int  # the `ray start --block` process; its process group holds the Ray's processes
    log: str


def folder() -> Path:
    return Path(os.environ.get("MSX_LOCAL_RAY_DIR") or Path(tempfile.gettempdir()) / f"msx-{os.getuid()}")


def _record_path() -> Path:
    return folder() / "local-ray.json"


def _leases() -> Path:
    return folder() / "leases"


@contextmanager
def _locked() -> Iterator[None]:
    folder().mkdir(parents=True, exist_ok=True)
    with open(folder() / "local-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    """Whether the process runs (an exited child not yet collected by its parent does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/<pid>/stat: "pid (name) state ..."; Z is a zombie.
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def running_local_ray() -> LocalRay | None:
    """The Ray msx started on this machine, if its keeper still runs."""
    try:
        record = LocalRay(**json.loads(_record_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return record if _alive(record.keeper_pid) else None


def live_leases() -> list[int]:
    """Pids of the drivers that use the local Ray now; leases of processes that are gone are removed."""
    pids = []
    for lease in _leases().glob("*") if _leases().is_dir() else ():
        pid = int(lease.name) if lease.name.isdigit() else 0
        if pid and _alive(pid):
            pids.append(pid)
        else:
            lease.unlink(missing_ok=True)
    return sorted(pids)


def acquire(echo: Callable[[str], None]) -> LocalRay:
    """Take a lease on the machine's local Ray, starting it if none runs; returns it (not yet connected)."""
    with _locked():
        ray_here = running_local_ray()
        users = live_leases()
        if ray_here is None:
            ray_here = _start(echo)
        else:
            others = f" (with {len(users)} other stud{'y' if len(users) == 1 else 'ies'})" if users else ""
            echo(f"Ray: joining this machine's local Ray{others}; dashboard {ray_here.dashboard_url}")
        _leases().mkdir(parents=True, exist_ok=True)
        (_leases() / str(os.getpid())).touch()
    atexit.register(release)
    return ray_here


def use_token_authentication() -> None:
    """Token authentication for this process's connection to the local Ray (the token is ~/.ray/auth_token).

    Ray turns it on by itself only for `ray.init()` without an address; with one, the mode must be set, and
    Ray reads it once into its C++ configuration, which its own helper refreshes (there is no public one).
    """
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()


def release() -> None:
    """Give back this process's lease; the last study to end stops the local Ray."""
    lease = _leases() / str(os.getpid())
    if not lease.exists():
        return
    with _locked():
        lease.unlink(missing_ok=True)
        if not live_leases():
            stop()


def stop() -> bool:
    """Stop the local Ray msx started (the caller holds the lock, or knows no study uses it); False if none ran."""
    ray_here = running_local_ray()
    if ray_here is None:
        _record_path().unlink(missing_ok=True)
        return False
    # The keeper stops the node's processes on SIGTERM (`ray start --block`); whatever is left in its process
    # group, which it leads, gets SIGKILL.
    _signal_group(ray_here.keeper_pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(ray_here.keeper_pid) and time.monotonic() < deadline:
        _reap(ray_here.keeper_pid)
        time.sleep(0.5)
    _signal_group(ray_here.keeper_pid, signal.SIGKILL)
    _reap(ray_here.keeper_pid)
    _record_path().unlink(missing_ok=True)
    return True


def stop_if_unused() -> bool:
    """`msx ray stop`: stop the local Ray unless a study uses it."""
    with _locked():
        users = live_leases()
        if users:
            raise LocalRayError(
                f"the local Ray is in use by {len(users)} running stud{'y' if len(users) == 1 else 'ies'} "
                f"(driver pid {', '.join(map(str, users))}); it stops when the last of them ends"
            )
        return stop()


def _start(echo: Callable[[str], None]) -> LocalRay:
    ray_cli = str(Path(sys.executable).parent / "ray")
    gcs_port, dashboard_port, client_port, agent_port = (free_local_port() for _ in range(4))
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    environment = {
        **os.environ,
        # Token authentication on: anything that reaches these ports could otherwise run code here.
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train's placement-group cleaner, in a worker, finds the state API through this variable, else
        # through /tmp/ray/ray_current_cluster, which a Ray that was not stopped cleanly leaves pointing at a
        # dead cluster: every trial Tune stops would then leak its workers' CPUs. Workers inherit it from
        # the node's processes.
        "RAY_API_SERVER_ADDRESS": dashboard,
    }
    environment.pop("RAY_ADDRESS", None)
    # The token `ray start` and every driver read (~/.ray/auth_token), made once.
    subprocess.run(
        [ray_cli, "get-auth-token", "--generate"], env=environment,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
    )
    log = folder() / f"ray-{time.strftime('%Y%m%d-%H%M%S')}.log"
    command = [
        ray_cli, "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(gcs_port),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(agent_port),
    ]
    echo(f"Ray: starting a local Ray for the studies on this machine (log {log})")
    with open(log, "w") as output:
        keeper = subprocess.Popen(
            command, env=environment, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    record = LocalRay(f"127.0.0.1:{gcs_port}", dashboard, keeper.pid, str(log))
    deadline = time.monotonic() + START_TIMEOUT_S
    while not dashboard_answers(dashboard):
        if keeper.poll() is not None or time.monotonic() > deadline:
            _signal_group(keeper.pid, signal.SIGKILL)
            tail = " ".join(Path(log).read_text().split()[-40:])
            raise LocalRayError(f"the local Ray did not start (`{' '.join(command[:3])} ...`, log {log}): {tail}")
        time.sleep(1)
    partial = _record_path().with_suffix(".tmp")
    partial.write_text(json.dumps(asdict(record)))
    os.replace(partial, _record_path())
    echo(f"Ray: dashboard {dashboard}")
    return record


def _signal_group(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _reap(pid: int) -> None:
    """Collect the keeper's exit status when this process started it (otherwise it is not our child)."""
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
