"""The test tiers (markers registered in pyproject.toml):

- unit: one module at a time on tiny data; no Ray, no server, no study. Every test not marked otherwise.
  `make test-fast` runs these only.
- integration: starts a local Ray (Tune, Train), an MLflow or `msx ui` server, several driver processes, or msx in a
  fresh interpreter of its own (the installed script, `python -m`, a per-process setting such as Ray's token mode).
- slow: minutes of compute: a whole study end to end (`msx launch`, a multi-node cluster), the largest
  network's checks.

`make test` (CI) runs all three.
"""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Fixtures that start a Ray or a server: a test that uses one cannot be a unit test.
INTEGRATION_FIXTURES = {"local_ray", "mlflow_server", "metrics_url", "cluster", "ui_with_a_champion"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = {mark.name for mark in item.iter_markers()} & {"integration", "slow"}
        if tiers:
            continue
        started = INTEGRATION_FIXTURES & set(item.fixturenames)
        if started:
            raise pytest.UsageError(
                f"{item.nodeid} starts {', '.join(sorted(started))} but is not marked integration or slow "
                "(unit tests run in `make test-fast`, which starts no Ray and no server)"
            )
        item.add_marker(pytest.mark.unit)
