"""The Ray cluster launcher configs in cluster/: valid for Ray's own launcher, and safe by construction.

Offline and fast: the configs are checked against the JSON schema shipped inside the installed ray package
and put through the same preparation `ray up` applies before it contacts any cloud.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
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
TORCH_PIN = "torch==2.13.0"


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


def test_usage_stats_off(name):
    config = load(name)
    starts = ray_start_commands(config)
    assert len(starts) == 2
    for command in starts:
        assert "RAY_USAGE_STATS_ENABLED=0" in command
        assert "--disable-usage-stats" in command
    assert "export RAY_USAGE_STATS_ENABLED=0" in " ".join(commands(config, "setup_commands"))


def test_token_auth_on_every_node(name):
    config = load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in ray_start_commands(config):
        assert "RAY_AUTH_MODE=token" in command


def test_setup_installs_pinned_torch_before_msx_from_the_checkout(name):
    config = load(name)
    assert config["file_mounts"]["~/msx"] == "."
    # ray up runs setup_commands then head_setup_commands on the head, then worker_setup_commands on workers
    for node in ("head_setup_commands", "worker_setup_commands"):
        setup = commands(config, "initialization_commands", "setup_commands", node)
        torch = first_index(setup, r"pip install .*torch==2\.13\.0")
        msx = first_index(setup, r"pip install (-e|--editable) ~/msx\b")
        assert torch < msx
    # no other torch install that could pull an unpinned build
    for command in commands(config):
        if re.search(r"pip install\b.*\btorch\b", command):
            assert TORCH_PIN in command, command
    # nothing installs msx from anywhere but the synced checkout
    assert not any("git+" in c for c in commands(config))


def test_shared_storage_is_exported(name):
    setup = " ".join(commands(load(name), "setup_commands"))
    assert "export MSX_STORAGE=/mnt/shared/msx_runs" in setup
    assert "/mnt/shared" in setup


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
    assert "pip install \"boto3" in " ".join(config["head_setup_commands"])


def test_local_provider_lists_the_users_machines():
    config = load("local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]
    assert "available_node_types" not in config  # the local provider refuses it (prepare_local)
    text = (CLUSTER / "local.yaml").read_text()
    assert text.count("PLACEHOLDER") >= 3
