"""The training worker's msx_* Ray metrics, scraped from a real local Ray's Prometheus endpoint while a real
TorchTrainer runs the msx worker loop on a tiny synthetic cohort."""

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import ray
import ray.train
from prometheus_client.parser import text_string_to_metric_families
from ray.train.torch import TorchTrainer

from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.orchestrator.spec import spec_from_dict
from msx.orchestrator.trial import TrialConfig
from msx.orchestrator.trials.trainable import run_worker_loop, worker_loop_config
from msx.orchestrator.trials.worker_metrics import PROMETHEUS_PREFIX
from tests.helpers import free_port, tiny_spec

EPOCHS = 2
BATCH = 3
RUN_NAME = "metrics-run"
TRIAL = TrialConfig("unet", 1, "unet-c1")
SPEC = tiny_spec(
    "metrics",
    data={"modalities": ["flair", "t2"], "folds": [{"train": [1], "validation": [2], "test": [3]}]},
    training={"epochs": EPOCHS, "batch_size": BATCH},
)


@pytest.fixture(scope="module")
def metrics_url():
    """A local Ray of its own (the shared `local_ray` exports no metrics) whose metrics agent serves Prometheus
    on a known port, pushed to every second instead of every 10 s so that the test need not wait."""
    port = free_port()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
        _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000},
    )
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


def msx_samples_of_run(url: str, run: str) -> dict[str, tuple[dict[str, str], float]]:
    """Name -> (labels, value) of every msx sample that the Train run `run` exports."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:  # the agent's exporter may not listen yet
        return {}
    return {
        sample.name: (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(PROMETHEUS_PREFIX + "msx_") and sample.labels.get("train_run") == run
    }


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_worker_exports_its_figures_to_prometheus(metrics_url, tmp_path):
    write_synthetic_cohort(tmp_path / "cohort", patients=3, shape=(32, 36, 32))
    # Every time point of the training patient is a training scan: one sample each per epoch.
    scans = len(open_cohort(tmp_path / "cohort", SPEC["data"]["modalities"], 1).scans_of((1,)))
    # The short last batch is dropped, as the reference does: what trains is BATCH x steps samples, not every scan.
    assert scans % BATCH, "a short last batch tells counted samples from the scans"
    steps = scans // BATCH
    samples = steps * BATCH
    trainer = TorchTrainer(
        run_worker_loop,
        train_loop_config=worker_loop_config(spec_from_dict(SPEC).to_dict(), TRIAL, str(tmp_path / "cohort")),
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=RUN_NAME, storage_path=str(tmp_path / "train")),
    )
    launched = time.time()
    # Ray drops a gauge some seconds after its worker exits: scrape while the trainer runs, keep the latest.
    seen: dict[str, tuple[dict[str, str], float]] = {}
    with ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(trainer.fit)
        while not fitting.done():
            seen.update(msx_samples_of_run(metrics_url, RUN_NAME))
            wait([fitting], timeout=1)
        fitting.result()  # a failed run fails here, with its own error
    # The last figures reach the endpoint within a report interval or two of being recorded; the step counter
    # is the last figure of an epoch, and counters outlive their worker.
    deadline = time.monotonic() + 30
    steps_taken = f"{PROMETHEUS_PREFIX}msx_train_steps_total"
    while seen.get(steps_taken, (None, 0))[1] != EPOCHS * steps and time.monotonic() < deadline:
        seen.update(msx_samples_of_run(metrics_url, RUN_NAME))
        time.sleep(1)

    values = {name.removeprefix(PROMETHEUS_PREFIX): value for name, (_, value) in seen.items()}
    assert values.get("msx_epoch") == EPOCHS, values
    assert values["msx_train_steps_total"] == EPOCHS * steps
    assert values["msx_train_steps_per_second"] > 0
    assert 0 < values["msx_train_seconds_total"] < time.time() - launched
    assert values["msx_train_samples_per_second"] == pytest.approx(
        samples / steps * values["msx_train_steps_per_second"]
    )
    assert 0 <= values["msx_validation_dice"] <= 1
    # The tiny spec validates every epoch: each epoch is reported, and the time blocked in the reports is counted
    # (the last report's count may not be exported before its worker exits).
    assert 1 <= values["msx_reports_total"] <= EPOCHS
    assert 0 < values["msx_report_seconds_total"] < time.time() - launched
    assert launched <= values["msx_training_start_time_seconds"] <= time.time()
    assert "msx_gpu_memory_peak_bytes" not in values  # a CPU run measures no GPU memory
    labels = seen[f"{PROMETHEUS_PREFIX}msx_epoch"][0]
    assert {key: labels[key] for key in ("backbone", "configuration", "fold", "rank")} == {
        "backbone": "unet", "configuration": "unet-c1", "fold": "1", "rank": "0",
    }
