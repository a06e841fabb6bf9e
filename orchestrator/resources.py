"""The spec's `resources` section: what one trial asks of the Ray cluster.

Apart from spec.py, whose other sections take their defaults from msx.models (and so import torch and MONAI):
a trial's process (trials/trainable.py) needs only this section, and the cluster's capacity checks
(cluster/capacity.py) likewise. spec.py validates it with the rest of the spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResourcesSpec:
    workers_per_trial: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    # Ray's memory reservation per worker (GiB); None reserves none.
    memory_per_worker_gb: float | None = None
    # How long a trial waits for its workers to start (an autoscaler adding nodes, other studies' trials
    # holding them) before it fails with that reason; None: as long as it takes.
    worker_start_timeout_s: float | None = None
