"""The Ray cluster launcher configs in cluster/: valid for Ray's own launcher, and safe by construction.

Offline and fast: the configs are checked against the JSON schema shipped inside the installed ray package
and put through the same preparation `ray up` applies before it contacts any cloud.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPOSITORY = Path(__file__).resolve().parents[2]
CLUSTER = REPOSITORY / "cluster"
SETUP_NODE = CLUSTER / "setup_node.sh"
CONFIGS = ["a100.yaml", "local.yaml"]
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

COMMAND_LISTS = [
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
]


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def commands(config: dict, *lists: str) -> list[str]:
    return [command for key in (lists or COMMAND_LISTS) for command in config.get(key) or []]


def ray_start_commands(config: dict) -> list[str]:
    return [c for c in commands(config, "head_start_ray_commands", "worker_start_ray_commands") if "ray start" in c]


def dashboard_problems(config: dict) -> list[str]:
    """Every `ray start --head` must bind the dashboard to 127.0.0.1."""
    problems = []
    for command in commands(config):
        if re.search(r"ray start\b.*--head\b", command):
            hosts = re.findall(r"--dashboard-host[= ](\S+)", command)
            if hosts != ["127.0.0.1"]:
                problems.append(command)
    return problems


def first_index(items: list[str], pattern: str) -> int:
    for index, item in enumerate(items):
        if re.search(pattern, item):
            return index
    raise AssertionError(f"no command matches {pattern!r}")


@pytest.fixture(params=CONFIGS)
def name(request) -> str:
    return request.param


def test_raw_config_matches_rays_schema(name):
    jsonschema.validate(load(name), SCHEMA)


def test_prepared_config_passes_rays_validation(name):
    # What `ray up` does before any provider call: fill in the provider's defaults, merge the setup
    # commands per node type, then validate (schema plus Ray's own cross-field checks).
    prepared = prepare_config(load(name))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_bites_on_a_broken_copy(name):
    broken = copy.deepcopy(load(name))
    broken["dashboard_host"] = "127.0.0.1"  # not a cluster-config field
    with pytest.raises(jsonschema.ValidationError, match="dashboard_host"):
        jsonschema.validate(broken, SCHEMA)
    with pytest.raises(jsonschema.ValidationError, match="dashboard_host"):
        validate_config(prepare_config(broken))

    mistyped = copy.deepcopy(load(name))
    mistyped["setup_commands"] = "pip install -e ~/msx"  # a string, not a list of commands
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(mistyped, SCHEMA)


def test_no_wildcard_address_anywhere(name):
    assert "0.0.0.0" not in (CLUSTER / name).read_text()
    assert "0.0.0.0" not in (CLUSTER / "README.md").read_text()


def test_head_binds_dashboard_to_loopback(name):
    config = load(name)
    heads = [c for c in commands(config, "head_start_ray_commands") if "ray start" in c]
    assert len(heads) == 1 and "--head" in heads[0]
    assert dashboard_problems(config) == []
    # and the check itself notices a public dashboard or a missing flag
    for bad in ("--dashboard-host=0.0.0.0", ""):
        mutated = copy.deepcopy(config)
        mutated["head_start_ray_commands"] = [
            c.replace("--dashboard-host=127.0.0.1", bad) for c in mutated["head_start_ray_commands"]
        ]
        assert dashboard_problems(mutated), bad
    # `ray dashboard CLUSTER.yaml` is the documented way in
    assert f"ray dashboard cluster/{name}" in (CLUSTER / name).read_text()


def setup_node_calls(config: dict) -> list[list[str]]:
    """The arguments of each cluster/setup_node.sh call in the setup commands, in order."""
    return [
        shlex.split(command)[2:]
        for command in commands(
            config, "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
        )
        if "cluster/setup_node.sh" in command
    ]


def test_usage_stats_off(name):
    config = load(name)
    starts = ray_start_commands(config)
    assert len(starts) == 2
    for command in starts:
        assert "RAY_USAGE_STATS_ENABLED=0" in command
        assert "--disable-usage-stats" in command
    assert "export RAY_USAGE_STATS_ENABLED=0" in SETUP_NODE.read_text()


def test_token_auth_on_every_node(name):
    config = load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in ray_start_commands(config):
        assert "RAY_AUTH_MODE=token" in command
    assert "export RAY_AUTH_MODE=token" in SETUP_NODE.read_text()


def test_every_node_is_set_up_by_the_shared_script_from_the_checkout(name):
    config = load(name)
    # setup_commands run on the head and on every worker
    (call,) = setup_node_calls(config)
    assert call[:2] == ["/mnt/shared", f"cluster/{name}"]
    assert setup_node_calls(config) == [
        shlex.split(c)[2:] for c in commands(config, "setup_commands") if "setup_node.sh" in c
    ]
    # the script installs msx from the synced checkout, from the wheelhouse only when there is one
    script = SETUP_NODE.read_text()
    assert '--no-index --find-links "$wheelhouse" -e ~/msx' in script
    # nothing in the config installs packages by itself (so nothing bypasses the wheelhouse), or msx from elsewhere
    for command in commands(config):
        assert not re.search(r"\bpip3? install\b", command), command
    assert not any("git+" in c for c in commands(config))


def test_file_mounts_carry_what_installing_msx_needs_and_no_more(name):
    """`ray up` hashes every file under the mounted paths: "." would read .venv and msx_runs at each start."""
    tomllib = pytest.importorskip("tomllib")
    mounts = load(name)["file_mounts"]
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    needed = {
        "pyproject.toml", pyproject["project"]["readme"], "cluster",
        *pyproject["tool"]["setuptools"]["package-dir"].values(),
    }
    checkout = {local.removeprefix("./"): remote for remote, local in mounts.items() if local.startswith("./")}
    assert set(checkout) == needed
    assert all(remote == f"~/msx/{local}" for local, remote in checkout.items())
    assert set(mounts) - set(checkout.values()) == {"~/.ray/auth_token"}


def test_shared_storage_is_exported():
    assert "export MSX_STORAGE=$shared/msx_runs" in SETUP_NODE.read_text()


def run_setup_node(home: Path, shared: Path) -> subprocess.CompletedProcess:
    """setup_node.sh as a node runs it, here, with `home` as the node's home folder."""
    return subprocess.run(
        ["bash", str(SETUP_NODE), str(shared), "cluster/local.yaml"],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=60,
    )


def test_setup_stops_with_a_message_without_the_shared_mount(tmp_path):
    result = run_setup_node(tmp_path, tmp_path / "not-mounted")
    assert result.returncode == 1
    assert (
        f"cluster/local.yaml, node {os.uname().nodename}: no writable shared folder at {tmp_path / 'not-mounted'}"
        in result.stderr
    )
    assert not (tmp_path / "msx-venv").exists()


def test_setup_stops_with_a_message_without_the_token(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    result = run_setup_node(tmp_path, shared)
    assert result.returncode == 1
    assert "no Ray authentication token at ~/.ray/auth_token" in result.stderr
    assert "'ray get-auth-token --generate'" in result.stderr
    assert not (tmp_path / "msx-venv").exists()


def test_a100_cluster_shape():
    config = load("a100.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m6i.")
    assert head["resources"].get("GPU", 0) == 0
    (worker_name,) = [n for n in types if n != config["head_node_type"]]
    worker = types[worker_name]
    assert worker["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert worker["resources"]["GPU"] == 8
    assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    # head and workers share an image, so Ray sees one Python version
    assert head["node_config"]["ImageId"] == worker["node_config"]["ImageId"]
    # boto3 (Ray's AWS autoscaler on the head) comes with msx, from the wheelhouse when there is one
    assert any(requirement.startswith("boto3") for requirement in setup_node_calls(config)[0][2:])


def test_local_provider_lists_the_users_machines():
    config = load("local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]
    assert "available_node_types" not in config  # the local provider refuses it (prepare_local)
    text = (CLUSTER / "local.yaml").read_text()
    assert text.count("PLACEHOLDER") >= 3
