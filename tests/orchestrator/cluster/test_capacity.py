"""The cluster-capacity verdicts (orchestrator/cluster/capacity.py) on fake node lists: which request fits, what
a trial waits for, and what the refusal names and tells the user to change."""

import pytest

from msx.orchestrator.cluster import capacity
from msx.orchestrator.cluster.capacity import (
    GIB,
    ClusterTooSmallError,
    TrialRequest,
    concurrent_trials,
    hosting_verdict,
    trial_request,
    worker_resources,
    workers_fitting,
)
from msx.orchestrator.resources import ResourcesSpec

LAPTOP = {"CPU": 2.0, "memory": 8.0 * GIB}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0, "memory": 32.0 * GIB}


def test_a_worker_asks_for_its_cpus_and_only_the_gpu_and_memory_the_spec_names():
    assert worker_resources(ResourcesSpec(cpus_per_worker=2)) == {"CPU": 2}
    assert worker_resources(ResourcesSpec(use_gpu=True, gpus_per_worker=0.5, memory_per_worker_gb=2)) == {
        "CPU": 1.0, "GPU": 0.5, "memory": 2 * GIB,
    }


def test_a_request_describes_its_workers():
    assert trial_request(ResourcesSpec(workers_per_trial=2, use_gpu=True)).describe() == "2 workers x {1 CPU, 1 GPU}"
    assert TrialRequest(1, {"CPU": 1.0, "memory": 2 * GIB}).describe() == "1 worker x {1 CPU, 2.0 GiB memory}"


def test_a_node_holds_as_many_workers_as_its_scarcest_resource_allows():
    assert workers_fitting(GPU_NODE, {"CPU": 2.0, "GPU": 0.5}) == 2
    assert workers_fitting(LAPTOP, {"CPU": 1.0, "GPU": 1.0}) == 0
    # Fractions that add up exactly (0.1 x 10) fill the node.
    assert workers_fitting({"CPU": 1.0}, {"CPU": 0.1}) == 10


def test_nodes_that_hold_the_workers_now_give_no_verdict():
    assert hosting_verdict(ResourcesSpec(workers_per_trial=2), [LAPTOP], []) is None
    assert hosting_verdict(ResourcesSpec(workers_per_trial=3), [LAPTOP, LAPTOP], []) is None


def test_nodes_the_autoscaler_may_add_make_the_trials_wait_for_them():
    waiting = hosting_verdict(ResourcesSpec(use_gpu=True), [LAPTOP], [(GPU_NODE, 2)])
    assert waiting is not None
    assert "no node can host a trial's workers yet (1 worker x {1 CPU, 1 GPU})" in waiting
    assert "of {8 CPU, 1 GPU, 32.0 GiB memory}" in waiting
    assert "with no time limit (set resources.worker_start_timeout_s to bound it)" in waiting
    bounded = hosting_verdict(ResourcesSpec(use_gpu=True, worker_start_timeout_s=90), [], [(GPU_NODE, -1)])
    assert "up to resources.worker_start_timeout_s = 90 s per trial" in bounded


def test_too_few_addable_nodes_still_refuse():
    # Each GPU node holds one worker; at most two may be added, for three workers.
    with pytest.raises(ClusterTooSmallError, match="needs 3 workers x"):
        hosting_verdict(ResourcesSpec(workers_per_trial=3, use_gpu=True), [LAPTOP], [(GPU_NODE, 2)])


@pytest.mark.parametrize(
    ("resources", "nodes", "missing", "change"),
    [
        (ResourcesSpec(use_gpu=True), [LAPTOP], "no node has 1 GPU", "set resources.use_gpu: false in the spec"),
        (
            ResourcesSpec(use_gpu=True, gpus_per_worker=2), [GPU_NODE], "no node has 2 GPUs",
            "set resources.gpus_per_worker: 1 in the spec",
        ),
        (ResourcesSpec(cpus_per_worker=4), [LAPTOP], "no node has 4 CPUs", "set resources.cpus_per_worker: 2 or less"),
        (
            ResourcesSpec(memory_per_worker_gb=16), [LAPTOP], "no node has 16.0 GiB of memory for Ray",
            "set resources.memory_per_worker_gb: 8.0 or less",
        ),
        (
            ResourcesSpec(workers_per_trial=3), [LAPTOP], "the nodes hold 2 such workers at most",
            "set resources.workers_per_trial: 2 in the spec",
        ),
        (
            ResourcesSpec(workers_per_trial=2, cpus_per_worker=4), [LAPTOP], "no node has 4 CPUs",
            "and a smaller resources.workers_per_trial",
        ),
    ],
)
def test_a_cluster_too_small_is_refused_naming_what_is_missing_and_what_to_change(resources, nodes, missing, change):
    with pytest.raises(ClusterTooSmallError) as refusal:
        hosting_verdict(resources, nodes, [])
    message = str(refusal.value)
    assert message.startswith("the Ray cluster cannot host one trial: each trial needs ")
    assert missing in message
    assert change in message
    assert "or run on a cluster that has them (--cluster, --address)" in message


def test_the_refusal_describes_the_largest_node():
    with pytest.raises(ClusterTooSmallError, match=r"\(2 nodes, the largest with \{8 CPU, 1 GPU, 32.0 GiB memory\}\)"):
        hosting_verdict(ResourcesSpec(cpus_per_worker=16), [LAPTOP, GPU_NODE], [])


def test_trials_run_as_many_at_once_as_the_nodes_hold_unless_the_spec_caps_them(monkeypatch):
    monkeypatch.setattr(capacity, "alive_nodes", lambda: [LAPTOP, GPU_NODE])
    assert concurrent_trials(ResourcesSpec()) == 10
    assert concurrent_trials(ResourcesSpec(workers_per_trial=3)) == 3
    assert concurrent_trials(ResourcesSpec(max_concurrent_trials=2)) == 2
    # A cluster with no room now still runs one trial at a time (its workers wait).
    assert concurrent_trials(ResourcesSpec(use_gpu=True, workers_per_trial=2)) == 1
