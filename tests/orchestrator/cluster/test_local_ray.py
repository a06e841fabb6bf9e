"""The local Ray `msx launch` uses: one per machine, shared by the studies that run on it, its dashboard on
127.0.0.1, stopped by the last study to end; its workers find its state API even when
/tmp/ray/ray_current_cluster names a cluster that is gone (a `ray start --head` never stopped cleanly).

Ray Train's placement-group cleaner runs in a worker and queries the state API; when it cannot, every trial
Tune stops leaks its workers' CPUs and a study deadlocks (seen in CI after a killed multi-node test cluster).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray._common.utils import get_ray_address_file

from msx.orchestrator.cluster import local_ray
from msx.orchestrator.cluster.jobs import free_local_port
from msx.orchestrator.study.driver import start_ray, stop_ray

# Each test starts a local Ray.
pytestmark = pytest.mark.integration

# A second study's driver: joins the running local Ray, runs a task there, gives its lease back.
SECOND_DRIVER = """
import ray
from msx.orchestrator.study.driver import start_ray, stop_ray
print(start_ray(None, print))
print(ray.get(ray.remote(lambda: "task ran")._remote(num_cpus=0)))
stop_ray()
"""


@ray.remote(num_cpus=0)
def actors_seen_by_a_worker() -> int:
    from ray.util.state import list_actors

    return len(list_actors(timeout=20))


@pytest.fixture
def stale_current_cluster():
    record = Path(get_ray_address_file(None))
    previous = record.read_text() if record.is_file() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"127.0.0.1:{free_local_port()}")  # nothing listens there
    yield
    if previous is None:
        record.unlink(missing_ok=True)
    else:
        record.write_text(previous)


@pytest.fixture
def own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MSX_LOCAL_RAY_DIR", str(tmp_path / "local-ray"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    yield tmp_path
    local_ray.stop()


@pytest.mark.timeout(300)
def test_workers_reach_the_state_api_of_the_ray_msx_started(stale_current_cluster, own_folder):
    printed: list[str] = []
    try:
        dashboard = start_ray(None, printed.append)
        assert dashboard.startswith("http://127.0.0.1:")
        assert printed[0].startswith("Ray: starting a local Ray for the studies on this machine")
        assert printed[1] == f"Ray: dashboard {dashboard}"
        assert ray.get(actors_seen_by_a_worker.remote(), timeout=120) >= 0
    finally:
        stop_ray()
    assert local_ray.running_local_ray() is None


@pytest.mark.timeout(300)
def test_a_second_driver_joins_and_leaving_does_not_stop_the_ray_under_the_first(own_folder):
    try:
        dashboard = start_ray(None, lambda _: None)
        keeper = local_ray.running_local_ray()
        second = subprocess.run([sys.executable, "-c", SECOND_DRIVER], capture_output=True, text=True, timeout=240)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "Ray: joining this machine's local Ray (with 1 other study)" in second.stdout
        assert dashboard in second.stdout and "task ran" in second.stdout
        # The second study ended; the first one's Ray runs on.
        assert local_ray.running_local_ray() == keeper
        assert local_ray.live_leases() == [os.getpid()]
        assert ray.get(actors_seen_by_a_worker.remote(), timeout=120) >= 0
    finally:
        stop_ray()
    assert local_ray.running_local_ray() is None
    assert not local_ray._record_path().exists()
