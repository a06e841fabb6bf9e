"""Can the Ray cluster host a trial's training workers? Asked before any trial starts, and per trial.

Ray Train waits for its workers' placement group as long as it takes, retrying every minute: a study asking
for a GPU on a machine without one would print "starting" forever. So a study first checks the cluster's
nodes (and, on an autoscaling cluster, the node types its autoscaler may add) against one trial's request,
and refuses in one line naming what is missing and which spec fields change the request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from ..resources import ResourcesSpec

GIB = 1024**3


class ClusterTooSmallError(ValueError):
    """No node, present or that the autoscaler may add, can host a trial's workers."""


@dataclass(frozen=True)
class TrialRequest:
    workers: int
    per_worker: dict[str, float]  # Ray resource names: CPU, GPU, memory (bytes)

    def describe(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x {{{_resources_text(self.per_worker)}}}"


def worker_resources(resources: ResourcesSpec) -> dict[str, float]:
    """One training worker's Ray resources, as the trial's ScalingConfig asks for them."""
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    if resources.memory_per_worker_gb:
        per_worker["memory"] = resources.memory_per_worker_gb * GIB
    return per_worker


def trial_request(resources: ResourcesSpec) -> TrialRequest:
    return TrialRequest(resources.workers_per_trial, worker_resources(resources))


def workers_fitting(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers a node of these total resources holds."""
    return min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in per_worker.items() if amount > 0)


def alive_nodes() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def autoscaler_node_types() -> list[tuple[dict[str, float], int]]:
    """(resources, most nodes) of each node type the cluster's autoscaler may add; empty when it has none.

    Read from the autoscaler's cluster config in the GCS, as Ray Train's own resource check reads it; -1
    nodes means no limit.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # no autoscaler, or a Ray without this state: nothing can be added
        return []
    if config is None:
        return []
    return [
        (dict(group.resources), int(group.max_count)) for group in config.node_group_configs if group.max_count != 0
    ]


def check_cluster_hosts_a_trial(resources: ResourcesSpec, echo: Callable[[str], None]) -> None:
    """Return if the cluster can host one trial's workers now; say what the trials wait for if its autoscaler
    can add such nodes; else raise ClusterTooSmallError (one line: what is missing, what to change)."""
    waiting = hosting_verdict(resources, alive_nodes(), autoscaler_node_types())
    if waiting:
        echo(waiting)


def hosting_verdict(
    resources: ResourcesSpec, nodes: list[dict[str, float]], node_types: list[tuple[dict[str, float], int]]
) -> str | None:
    """None when `nodes` host one trial's workers; what the trials wait for when the autoscaler's `node_types`
    can; ClusterTooSmallError otherwise."""
    request = trial_request(resources)
    now = sum(workers_fitting(node, request.per_worker) for node in nodes)
    if now >= request.workers:
        return None
    addable = [(node, most) for node, most in node_types if workers_fitting(node, request.per_worker) > 0]
    later = now + sum(
        request.workers if most < 0 else most * workers_fitting(node, request.per_worker) for node, most in addable
    )
    if addable and later >= request.workers:
        kinds = "; ".join(f"{{{_resources_text(node)}}}" for node, _ in addable)
        timeout = resources.worker_start_timeout_s
        bound = (
            f"up to resources.worker_start_timeout_s = {timeout:g} s per trial" if timeout
            else "with no time limit (set resources.worker_start_timeout_s to bound it)"
        )
        return (
            f"no node can host a trial's workers yet ({request.describe()}); the cluster's autoscaler can add nodes "
            f"of {kinds}: the trials wait for them, {bound}"
        )
    raise ClusterTooSmallError(f"the Ray cluster cannot host one trial: {_shortfall(resources, request, nodes)}")


def _shortfall(resources: ResourcesSpec, request: TrialRequest, nodes: list[dict[str, float]]) -> str:
    largest = {name: max((node.get(name, 0.0) for node in nodes), default=0.0) for name in ("CPU", "GPU", "memory")}
    missing, changes = [], []
    gpus = request.per_worker.get("GPU", 0)
    if gpus and largest["GPU"] < gpus:
        missing.append(f"no node has {gpus:g} GPU" if largest["GPU"] == 0 else f"no node has {gpus:g} GPUs")
        changes.append(
            "resources.use_gpu: false" if largest["GPU"] == 0 else f"resources.gpus_per_worker: {largest['GPU']:g}"
        )
    if largest["CPU"] < request.per_worker["CPU"]:
        missing.append(f"no node has {request.per_worker['CPU']:g} CPUs")
        changes.append(f"resources.cpus_per_worker: {max(1, math.floor(largest['CPU'])):g} or less")
    if largest["memory"] < request.per_worker.get("memory", 0):
        missing.append(f"no node has {request.per_worker['memory'] / GIB:.1f} GiB of memory for Ray")
        changes.append(f"resources.memory_per_worker_gb: {largest['memory'] / GIB:.1f} or less")
    if not missing:
        fitting = sum(workers_fitting(node, request.per_worker) for node in nodes)
        missing.append(f"the nodes hold {fitting} such worker{'s' if fitting != 1 else ''} at most")
        changes.append(f"resources.workers_per_trial: {max(1, fitting)}")
    elif resources.workers_per_trial > 1:
        changes.append("a smaller resources.workers_per_trial")
    node_text = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, the largest with {{{_resources_text(largest)}}}"
    return (
        f"each trial needs {request.describe()} and {', '.join(missing)} ({node_text}); "
        f"set {' and '.join(changes)} in the spec, or run on a cluster that has them (--cluster, --address)"
    )


def concurrent_trials(resources: ResourcesSpec) -> int:
    """As many trials at once as the cluster's nodes hold workers for (at least one), unless the spec caps it."""
    if resources.max_concurrent_trials:
        return resources.max_concurrent_trials
    request = trial_request(resources)
    workers = sum(workers_fitting(node, request.per_worker) for node in alive_nodes())
    return max(1, workers // request.workers)


def _resources_text(resources: dict[str, Any]) -> str:
    parts = []
    for name in ("CPU", "GPU", "memory"):
        amount = resources.get(name, 0)
        if name == "memory":
            if amount:
                parts.append(f"{amount / GIB:.1f} GiB memory")
        elif name in resources:
            parts.append(f"{amount:g} {name}")
    return ", ".join(parts)
