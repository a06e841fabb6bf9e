"""The local Ray `msx launch` starts: bound to 127.0.0.1, and its workers find its state API even when
/tmp/ray/ray_current_cluster names a cluster that is gone (a `ray start --head` never stopped cleanly).

Ray Train's placement-group cleaner runs in a worker and queries the state API; when it cannot, every trial
Tune stops leaks its workers' CPUs and a study deadlocks (seen in CI after a killed multi-node test cluster).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
from ray._common.utils import get_ray_address_file

from msx.orchestrator.cluster.jobs import free_local_port
from msx.orchestrator.study.driver import start_ray


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


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_workers_reach_the_state_api_of_the_ray_msx_started(stale_current_cluster, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    printed: list[str] = []
    try:
        dashboard = start_ray(None, printed.append)
        assert dashboard.startswith("http://127.0.0.1:")
        assert printed == [f"Ray dashboard: {dashboard}"]
        assert ray.get(actors_seen_by_a_worker.remote(), timeout=120) >= 0
        assert "RAY_API_SERVER_ADDRESS" not in os.environ  # set for the node processes only
    finally:
        ray.shutdown()
