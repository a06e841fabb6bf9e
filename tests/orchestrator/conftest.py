import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray (2 CPUs) bound to 127.0.0.1, shared by one module's tests.

    Module scope: a Ray left running would be a second instance beside the one `msx launch` starts.
    """
    import ray

    # Workers unpickle functions defined in test modules by module name: let them import those modules.
    here = str(Path(__file__).parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
