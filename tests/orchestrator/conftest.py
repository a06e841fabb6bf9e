import os

import pytest

from tests.helpers import REPOSITORY


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray (2 CPUs) bound to 127.0.0.1, shared by one module's tests.

    Module scope: a Ray left running would be a second instance beside the one `msx launch` starts.
    """
    import ray

    # Workers unpickle functions defined in test modules by module name: let them import those modules.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
