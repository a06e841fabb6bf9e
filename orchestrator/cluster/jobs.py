"""`msx launch` on a remote Ray cluster: the same command, run there as a Ray job (Jobs API), its logs
streamed here.

The driver belongs on the cluster: a laptop that sleeps or loses its network must not kill a study of
days. The spec travels with the job, so a local YAML works on the cluster; data and storage paths are the
cluster's own.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..spec import ExperimentSpec

# Under the storage folder on the cluster: the specs of submitted studies, by submission id.
SUBMITTED_FOLDER = "submitted"
# On the cluster's nodes MSX_STORAGE names the shared results folder (cluster/*.yaml export it).
CLUSTER_STORAGE = '"${MSX_STORAGE:-$HOME/msx_runs}"'
DASHBOARD_WAIT_S = 180.0
# A worker's first start installs msx (and torch) on it; past this the study starts on the nodes present.
WORKERS_WAIT_S = 900.0
WORKERS_REPORT_S = 60.0


class SubmissionError(RuntimeError):
    pass


def launch_entrypoint(spec: ExperimentSpec | None, chosen: dict[str, Any], submission_id: str = "check") -> str:
    """The shell command the job runs on the cluster's head: `msx launch` with the options the user gave.

    The spec travels inside the command and is written under the study's storage first: a local YAML works
    on the cluster, and the storage folder keeps what was run. (A Ray `working_dir` would do the shipping,
    but the job's driver loses that folder once it connects to the cluster.)
    """
    # Unquoted on purpose: the job's shell expands the cluster's MSX_STORAGE.
    storage = shlex.quote(str(chosen["storage"])) if "storage" in chosen else CLUSTER_STORAGE
    arguments = ["--address", "auto", *launch_arguments(chosen)]
    launch = f"msx launch --storage {storage} {shlex.join(arguments)}"
    if spec is None:
        return launch
    folder = f"{storage}/{spec.name}/{SUBMITTED_FOLDER}"
    spec_file = f"{folder}/{submission_id}.yaml"
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    return f"mkdir -p {folder} && printf '%s' {shlex.quote(text)} > {spec_file} && {launch} --space {spec_file}"


def launch_arguments(chosen: dict[str, Any]) -> list[str]:
    """The `msx launch` options a cluster's driver gets from what the user chose here (not --storage, --space or
    --address, which the submission sets); paths must be the cluster's own, so absolute."""
    for option in ("data", "storage"):
        if option in chosen and not Path(chosen[option]).is_absolute():
            raise SubmissionError(f"--{option} {chosen[option]}: give an absolute path as the cluster's nodes see it")
    arguments = []
    if "data" in chosen:
        arguments += ["--data", str(chosen["data"])]
    if "tracking_uri" in chosen:
        arguments += ["--tracking-uri", chosen["tracking_uri"]]
    if "resume_name" in chosen:
        arguments += ["--resume", chosen["resume_name"]]
    if chosen.get("fresh"):
        arguments.append("--fresh")
    return arguments


def submit_launch(
    address: str, spec: ExperimentSpec | None, chosen: dict[str, Any], echo: Callable[[str], None],
) -> int:
    """Submit the study to the cluster whose dashboard is at `address`, stream its logs; the job's exit status."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address, headers=token_header())
    except AuthenticationError as error:
        raise token_refused(address, error) from None
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SubmissionError(f"{address}: no Ray dashboard answers there ({str(error).splitlines()[0]})") from None
    name = spec.name if spec is not None else chosen["resume_name"]
    submission_id = f"msx-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    entrypoint = launch_entrypoint(spec, chosen, submission_id)
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata={"msx.experiment": name})
    echo(f"submitted Ray job {job_id} to {address}: {entrypoint.rpartition('&& ')[2]}")
    echo("its logs follow; Ctrl-C detaches (the study keeps running on the cluster)")
    try:
        asyncio.run(_stream_logs(client, job_id, echo))
    except KeyboardInterrupt:
        echo(f"detached from job {job_id}: `ray job logs --address {address} --follow {job_id}` re-attaches, "
             f"`ray job stop --address {address} {job_id}` stops it")
        return 130
    info = client.get_job_info(job_id)
    while info.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(1)
        info = client.get_job_info(job_id)
    echo(
        f"Ray job {job_id}: {info.status.value}"
        + (f" ({info.message})" if info.status != JobStatus.SUCCEEDED and info.message else "")
    )
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def token_header() -> dict[str, str]:
    """The cluster's token, found where Ray looks for it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
    Ray's clients send it by themselves only when RAY_AUTH_MODE=token is set here, which a user's shell rarely is."""
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True)


def token_instructions() -> str | None:
    """How to give the dashboard its token (asked for once per browser), naming where the token is and never the
    token itself; None when this process runs Ray without token authentication."""
    import os

    from ray._private.authentication.authentication_token_setup import _get_default_token_path
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if not is_token_auth_enabled():
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "the RAY_AUTH_TOKEN variable of the shell that ran msx"
    else:
        where = f"the file {os.environ.get('RAY_AUTH_TOKEN_PATH') or _get_default_token_path()}"
    return f"the dashboard asks for Ray's token: paste the output of `ray get-auth-token` ({where})"


def token_refused(address: str, error: Exception) -> SubmissionError:
    return SubmissionError(
        f"{address}: the cluster refused this machine's Ray token ({str(error).splitlines()[0]}); it must be the "
        "~/.ray/auth_token the cluster was started with"
    )


async def _stream_logs(client, job_id: str, echo: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        echo(chunk.rstrip("\n"))


def read_config_yaml(path: Path, what: str) -> Any:
    """A --cluster file's YAML; a SubmissionError names the file and why it cannot be read."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as error:
        raise SubmissionError(f"{path}: cannot read {what} ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise SubmissionError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def check_cluster_config(path: Path) -> dict:
    """The launcher config, prepared (defaults filled in) and checked the way `ray up` does before contacting
    any cloud."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = read_config_yaml(path, "the cluster config")
    if not isinstance(config, dict):
        raise SubmissionError(f"{path}: a cluster config is a mapping, got {type(config).__name__}")
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except Exception as error:  # jsonschema's and Ray's own checks raise several types
        raise SubmissionError(f"{path}: not a valid Ray cluster config ({str(error).splitlines()[0]})") from None
    return prepared


def check_file_mounts(path: Path, config: dict) -> None:
    """What `ray up` copies to the nodes must exist here; its own error would come after the head is set up."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    for remote, local in (config.get("file_mounts") or {}).items():
        source = Path(local).expanduser()
        if source.exists():
            continue
        if source.resolve() == _get_default_token_path().resolve():
            raise SubmissionError(
                f"{path}: file_mounts copies the Ray authentication token {local} to the nodes, and there is none "
                "here: make one once with `ray get-auth-token --generate`"
            )
        raise SubmissionError(
            f"{path}: file_mounts copies {local} to {remote}, and {source.absolute()} does not exist "
            "(run msx from the directory the config's relative paths start from, the repository root)"
        )


def fixed_node_count(prepared: dict) -> int:
    """The nodes a cluster (its prepared config) keeps whatever its load: the head and the node types'
    min_workers (the local provider's: every worker_ip)."""
    return 1 + sum(node_type.get("min_workers", 0) for node_type in prepared["available_node_types"].values())


def bring_up_cluster(path: Path, echo: Callable[[str], None]) -> tuple[str, subprocess.Popen]:
    """`ray up` the cluster, tunnel its dashboard (bound to the head's 127.0.0.1) to a free local port, and
    wait for the nodes the config keeps.

    Returns the local dashboard URL and the tunnel process, which the caller ends.
    """
    config = check_cluster_config(path)
    check_file_mounts(path, config)
    ray_cli = str(Path(sys.executable).parent / "ray")
    echo(f"bringing up the cluster of {path} (ray up; the first start installs msx on every node)")
    # --no-restart: on a cluster that is up already, Ray keeps running, and so do the studies it runs.
    completed = subprocess.run([ray_cli, "up", "--yes", "--no-restart", "--disable-usage-stats", str(path)])
    if completed.returncode != 0:
        raise SubmissionError(f"`ray up {path}` failed (exit status {completed.returncode}); its output is above")
    port = free_local_port()
    # A session of its own: `ray dashboard` holds the tunnel in an ssh child, which must end with it.
    tunnel = subprocess.Popen(
        [ray_cli, "dashboard", "--port", str(port), str(path)], stdout=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + DASHBOARD_WAIT_S
    while not dashboard_answers(address):
        if tunnel.poll() is not None or time.monotonic() > deadline:
            close_tunnel(tunnel)
            raise SubmissionError(f"the dashboard tunnel of {path} did not open (`ray dashboard {path}` shows why)")
        time.sleep(2)
    echo(f"Ray dashboard of the cluster: {address} (tunnelled while msx runs; later: ray dashboard {path}); "
         f"the cluster stays up: `ray down {path}` ends it")
    try:
        wait_for_nodes(address, fixed_node_count(config), path, echo)
    except BaseException:
        close_tunnel(tunnel)
        raise
    return address, tunnel


def wait_for_nodes(address: str, expected: int, path: Path, echo: Callable[[str], None]) -> None:
    """Wait until `expected` nodes are alive. The head's autoscaler sets the workers up after `ray up`, and
    a study sizes its concurrency from the nodes present when it starts."""
    from ray.exceptions import AuthenticationError
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=address, headers={**token_header(), "Content-Type": "application/json"})
    alive_only = ListApiOptions(filters=[("state", "=", "ALIVE")])
    started = time.monotonic()
    reported = (None, 0.0)
    while True:
        try:
            alive = len(client.list(StateResource.NODES, options=alive_only, raise_on_missing_output=False))
        except AuthenticationError as error:
            raise token_refused(address, error) from None
        if alive >= expected:
            if reported[0] is not None:
                echo(f"all {expected} nodes of the cluster are up")
            return
        waited = time.monotonic() - started
        if waited > WORKERS_WAIT_S:
            echo(
                f"after {waited / 60:.0f} min {alive} of the cluster's {expected} nodes are up: "
                "the study starts on those"
            )
            return
        if alive != reported[0] or waited - reported[1] >= WORKERS_REPORT_S:
            echo(f"waiting for the cluster's workers: {alive} of {expected} nodes up (a worker's first start installs "
                 f"msx; its setup's output: ray exec {path} 'tail -n 50 /tmp/ray/session_latest/logs/monitor.out')")
            reported = (alive, waited)
        time.sleep(5)


def close_tunnel(tunnel: subprocess.Popen) -> None:
    """End `ray dashboard` and its ssh: alone, ssh would outlive it and keep the tunnel (and a shell on the
    head) open."""
    try:
        os.killpg(tunnel.pid, signal.SIGTERM)
        tunnel.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(tunnel.pid, signal.SIGKILL)
        tunnel.wait()


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dashboard_answers(address: str) -> bool:
    """Anything HTTP answering counts: the dashboard asks for the token before it says more."""
    try:
        urllib.request.urlopen(address, timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True
