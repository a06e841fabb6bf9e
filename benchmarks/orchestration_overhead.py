"""Orchestration overhead: one trial through Tune, Ray Train and MLflow against the same training run in plain Python.

Ray arm (msx's real path, built as `orchestrator/study/driver.py` builds it): a local Ray, then `Tuner.fit` with
`ConfigurationSearch` and one trial of `run_trial` (`TRIAL_RESOURCES`, a TorchTrainer of one 1-CPU worker
running `train_loop_per_worker`, `TuneReportCallback`) and MLflow's `TrialRunsCallback` on a SQLite store.
Its first training step and its time in training epochs are read from the worker's metrics
(`msx_training_start_time_seconds`, `msx_train_seconds_total`) on the local Ray's Prometheus endpoint.

Plain-Python baseline (below, labelled): the fold loop that the Ray worker runs (`msx.models.fold.run_fold`),
called without Ray: the same spec, fold, seeds, data, epochs, validations, final evaluation and checkpoint files,
in this process, with as many torch threads as the Ray worker has CPUs (Ray limits a 1-CPU worker to 1 thread).
It runs first, before Ray starts, as a script without Ray would.

Overhead = (Ray arm - baseline) / Ray arm, in wall time; "to first step" is measured from `Tuner.fit` (a
running cluster) and from the baseline's start. Starting the local Ray is reported apart. Where the overhead
goes is printed from the Ray arm's own clocks: the start-up phases that the trial's first report carries
(`startup/<phase>_s`, trials/startup.py, counted from the trial's process start), the seconds the worker spent
blocked in `ray.train.report` (each report carries those of the reports before it, `report_wait_s`; the mean of
those stands for the last one's), the training epochs against
the baseline's, and the tear-down (from the trial's last result reaching the driver to `Tuner.fit` returning).
The study's live-epoch actor runs as in a study, and the cost of one of its fire-and-forget calls is measured
from a Ray task after the trial. `--runs N` repeats every arm N times and keeps the run of least overhead.

Ray Train's floor (below, labelled): a bare TorchTrainer trial, what any Tune trial that fits a TorchTrainer pays
before its worker can train: a Tune function trainable (no CPU: msx's `TRIAL_RESOURCES`) that fits a TorchTrainer
of one 1-CPU worker, Ray Train's defaults otherwise, whose loop imports torch and MONAI (what a training loop
needs) and reports the seconds since its trial's process was created, read in that process as msx's trial reads
them (`psutil.Process().create_time()`). Against it, msx's `startup/worker_loop_s` (trials/startup.py): the
seconds from msx's trial process's creation to its worker entering its loop; their difference is what msx adds
to the start-up. Each Ray arm runs on a fresh local Ray, as a study's first trial; the floor and msx are each the
best of `--runs`. `--startup-only` runs msx's trial for one epoch and no plain-Python baseline: the floor comparison
in a few minutes.

    python benchmarks/orchestration_overhead.py                      # smoke spec, U-Net, fold 1, 24 epochs
    python benchmarks/orchestration_overhead.py --runs 2 --json overhead.json
    python benchmarks/orchestration_overhead.py --startup-only --runs 2

Both arms use the smoke search space (`search_spaces/smoke.yaml`: width 0.125, 32^3 patches, batch 2,
synthetic 5-patient 48 x 56 x 48 cohort) with one backbone, the paper's fold 1, no searched parameters and
no scan cache (both arms load and preprocess the scans the same way).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import psutil
import ray
import ray.train
import torch
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from msx.models.data.folds import resolve_folds
from msx.models.data.manifest import open_cohort
from msx.models.data.synth import write_synthetic_cohort
from msx.models.fold import EpochReport, load_fold_data, run_fold
from msx.orchestrator.spec import ExperimentSpec, load_spec, spec_from_dict
from msx.orchestrator.study.configuration_search import ConfigurationScheduler, ConfigurationSearch
from msx.orchestrator.study.search import MODE, OPTIMISED_METRIC
from msx.orchestrator.tracking.callback import TrialRunsCallback
from msx.orchestrator.tracking.store import ensure_experiment, log_study_start, tracking_uri_scope
from msx.orchestrator.trial import BEST_VALIDATION_DICE, REPORT_WAIT, STARTUP_PREFIX, TrialConfig
from msx.orchestrator.trials.live_epochs import EpochNotifier, actor_name, start_live_epochs
from msx.orchestrator.trials.startup import PHASES
from msx.orchestrator.trials.trainable import TRIAL_RESOURCES, run_trial, start_ray_train_services
from msx.orchestrator.trials.worker_metrics import PROMETHEUS_PREFIX

from timing import print_table, write_json

BACKBONE = "unet"
PAPER_FOLD_1 = {"train": [1, 2, 3], "validation": [4], "test": [5]}
FIRST_STEP_METRIC = PROMETHEUS_PREFIX + "msx_training_start_time_seconds"
STEPS_PER_SECOND_METRIC = PROMETHEUS_PREFIX + "msx_train_steps_per_second"
STEPS_METRIC = PROMETHEUS_PREFIX + "msx_train_steps_total"
TRAINING_SECONDS_METRIC = PROMETHEUS_PREFIX + "msx_train_seconds_total"
LIVE_EPOCH_CALLS = 2000
# Ray's metrics agent serves a value up to its report interval (10 s by default) after the worker records it.
METRICS_DELAY_S = 30
# The start-up phases that Ray Train's floor (a bare TorchTrainer trial) has too (trials/startup.py names msx's).
FLOOR_PHASES = ("trainable", "worker_loop")


def benchmark_spec(epochs: int) -> ExperimentSpec:
    raw = load_spec("smoke").to_dict()
    raw["name"] = "overhead"
    raw["model"]["backbones"] = [BACKBONE]
    raw["data"]["folds"] = [PAPER_FOLD_1]
    raw["training"]["epochs"] = epochs
    # One trial: no searched values, and nothing for a scheduler to compare it with.
    raw["search"]["parameters"] = []
    raw["search"]["scheduler"] = {"name": "fifo"}
    return spec_from_dict(raw)


def training_only_epoch(epoch: int, spec: ExperimentSpec) -> bool:
    """An epoch that only trains (no validation) and is not the first (whose report also carries the start-up)."""
    return epoch > 1 and epoch % spec.training.validate_every != 0 and epoch != spec.training.epochs


class EpochClock:
    """The fold loop's observer in the baseline: when training began and how long each training epoch took, timed
    around the same block as the Ray worker's metrics (`WorkerMetrics.training_epoch`)."""

    def __init__(self) -> None:
        self.first_step_at: float | None = None
        self.epoch_seconds: dict[int, float] = {}
        self.steps_per_second = math.nan

    @contextmanager
    def training_epoch(self, epoch: int, steps: int, samples: int) -> Iterator[None]:
        if self.first_step_at is None:
            self.first_step_at = time.time()
        began = time.perf_counter()
        yield
        self.epoch_seconds[epoch] = time.perf_counter() - began
        self.steps_per_second = steps / self.epoch_seconds[epoch]

    def record_validation(self, dice: float) -> None:
        pass


def plain_python_trial(spec: ExperimentSpec, trial: TrialConfig, data_root: Path, folder: Path) -> dict[str, float]:
    """PLAIN-PYTHON BASELINE, not msx's path: the fold loop the Ray worker runs (`msx.models.fold.run_fold`), called
    as a notebook would, in this process, without Ray.

    The same spec, trial, data, seeds, epochs, validations, final evaluation and checkpoint files as the Ray arm,
    each checkpoint folder copied under `folder` as Ray Train persists it. What it leaves out is what Ray adds: the
    worker process, the process group, reports to Tune and MLflow, checkpoint registration, metrics.
    """
    started = time.time()
    trial_spec = trial.spec_of(spec)
    cohort = open_cohort(data_root, trial_spec.data.modalities, trial_spec.data.rater)
    fold = next(f for f in resolve_folds(trial_spec.data.folds, cohort.patients) if f.index == trial.fold)
    clock = EpochClock()

    def keep(report: EpochReport, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            shutil.copytree(checkpoint, folder / f"checkpoint_{report.epoch:06d}")

    result = run_fold(
        trial_spec.fold_config(trial.backbone),
        load_fold_data(cohort, fold, trial_spec.training.patch_size),
        torch.device("cpu"),
        report=keep,
        observer=clock,
        model_metadata={"spec": trial_spec.to_dict(), "fold": fold.index},
    )
    finished = time.time()
    training_only = [s for epoch, s in clock.epoch_seconds.items() if training_only_epoch(epoch, spec)]
    return {
        "wall_s": finished - started,
        "to_first_step_s": clock.first_step_at - started,
        "training_s": sum(clock.epoch_seconds.values()),
        "training_only_epoch_s": statistics.median(training_only) if training_only else math.nan,
        "last_epoch_steps_per_s": clock.steps_per_second,
        "val_dice": result.best_validation_dice,
        "test_dsc": result.metrics.get(f"test/{spec.training.validation_strategy}/dsc", math.nan),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape_msx_metrics(url: str) -> dict[str, float]:
    """The msx samples that the local Ray's metrics agent serves now (one trial runs: one series per name)."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:  # the exporter may not listen yet
        return {}
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(PROMETHEUS_PREFIX + "msx_")
    }


class ResultClock(tune.Callback):
    """When, in the driver, Tune started the trial and received its results."""

    def __init__(self) -> None:
        self.started_at = math.nan
        self.results_at: list[float] = []

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started_at = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.results_at.append(time.time())


@ray.remote(num_cpus=0)
def live_epoch_call_seconds(name: str, calls: int) -> float:
    """Seconds one fire-and-forget call to the study's live-epoch actor costs its caller (a Ray worker process)."""
    notify = EpochNotifier(name, "benchmark")
    began = time.perf_counter()
    for epoch in range(calls):
        notify(epoch)
    return (time.perf_counter() - began) / calls


def ray_trial(spec: ExperimentSpec, data_root: Path, folder: Path, metrics_url: str) -> dict[str, float]:
    """One trial through msx's real path, as `orchestrator/study/driver.py` runs it, MLflow record included."""
    cohort = open_cohort(data_root, spec.data.modalities, spec.data.rater)
    folds = resolve_folds(spec.data.folds, cohort.patients)
    # The fold loop drops an incomplete last batch unless it is the only one.
    total_steps = spec.training.epochs * max(1, len(cohort.scans_of(folds[0].train)) // spec.training.batch_size)
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    experiment_id = ensure_experiment(tracking_uri, spec.name, folder / "mlartifacts")
    launch_id = MlflowClient(tracking_uri).create_run(experiment_id, run_name="overhead").info.run_id
    log_study_start(launch_id, tracking_uri, spec.to_dict(), str(data_root))
    # As in study/driver.py: validation Dice comes with every `validate_every`-th report only.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    live_epochs = actor_name(folder.name)
    live_epochs_actor = start_live_epochs(live_epochs)
    start_ray_train_services()
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, spec=spec.to_dict(), data_root=str(data_root), storage_path=str(folder / "train"),
            live_epochs=live_epochs,
        ),
        TRIAL_RESOURCES,
    )
    clock = ResultClock()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=OPTIMISED_METRIC, mode=MODE, search_alg=ConfigurationSearch(spec, folds, concurrency=1),
            scheduler=ConfigurationScheduler(), num_samples=1,
        ),
        run_config=tune.RunConfig(
            name="overhead",
            storage_path=str(folder / "tune"),
            callbacks=[
                TrialRunsCallback(tracking_uri, spec.name, launch_id, spec.inference.strategies, len(folds)), clock
            ],
            verbose=0,
        ),
    )
    # The worker's gauges vanish some seconds after it exits: scrape while the trial runs, keep the latest.
    # Seldom: every scrape parses all of Ray's series, work that the trial's 2 CPUs would otherwise do.
    seen: dict[str, float] = {}
    with tracking_uri_scope(tracking_uri), ThreadPoolExecutor(1) as pool:
        launched = time.time()
        fitting = pool.submit(tuner.fit)
        while not fitting.done():
            seen.update(scrape_msx_metrics(metrics_url))
            wait([fitting], timeout=5)
        grid = fitting.result()
        finished = time.time()
    if grid.errors:
        raise RuntimeError(f"the trial failed: {grid.errors}")
    # Counters outlive the worker: wait for their final values.
    deadline = time.monotonic() + METRICS_DELAY_S
    while seen.get(STEPS_METRIC) != total_steps and time.monotonic() < deadline:
        time.sleep(1)
        seen.update(scrape_msx_metrics(metrics_url))
    missing = {FIRST_STEP_METRIC, STEPS_METRIC, TRAINING_SECONDS_METRIC} - set(seen)
    if missing or seen[STEPS_METRIC] != total_steps:
        raise RuntimeError(f"the worker's metrics did not reach {metrics_url}: missing {missing}, seen {seen}")
    call_s = ray.get(live_epoch_call_seconds.remote(live_epochs, LIVE_EPOCH_CALLS))
    ray.kill(live_epochs_actor)
    metrics = grid[0].metrics
    first_report = grid[0].metrics_dataframe.iloc[0]
    startup = {phase: float(first_report[f"{STARTUP_PREFIX}{phase}_s"]) for phase in PHASES}
    # The trial's process start, on the worker's clock (one machine): its first step less the phase's seconds.
    process_started = seen[FIRST_STEP_METRIC] - startup["first_step"]
    # Each report carries the seconds the worker was blocked in the ones before it; the last one's own is not known.
    results = grid[0].metrics_dataframe
    reports = len(results)
    per_report_s = float(results[REPORT_WAIT].iloc[-1]) / (reports - 1) if reports > 1 else math.nan
    return {
        "wall_s": finished - launched,
        "to_first_step_s": seen[FIRST_STEP_METRIC] - launched,
        "training_s": seen[TRAINING_SECONDS_METRIC],
        "last_epoch_steps_per_s": seen.get(STEPS_PER_SECOND_METRIC, math.nan),
        "val_dice": metrics[BEST_VALIDATION_DICE],
        "test_dsc": metrics.get(f"test/{spec.training.validation_strategy}/dsc", math.nan),
        "tune_start_s": clock.started_at - launched,
        "trial_process_s": process_started - launched,
        **{f"startup_{phase}_s": seconds for phase, seconds in startup.items()},
        "reports": reports,
        "report_s": per_report_s * reports,
        "per_report_s": per_report_s,
        "teardown_s": finished - clock.results_at[-1],
        "live_epoch_call_s": call_s,
    }


def bare_worker_loop(config: dict) -> None:
    """RAY TRAIN'S FLOOR, not msx's path: a worker loop that imports what training needs, then says when it got here."""
    import monai  # noqa: F401
    import torch  # noqa: F401

    ray.train.report({
        "trial_started_at": config["trial_started_at"],
        f"{STARTUP_PREFIX}trainable_s": config["trainable_s"],
        f"{STARTUP_PREFIX}worker_loop_s": time.time() - config["trial_started_at"],
    })


def bare_torchtrainer_trial(config: dict) -> None:
    """RAY TRAIN'S FLOOR, not msx's path: a Tune function trainable that fits a TorchTrainer of one 1-CPU worker, with
    Ray Train's defaults, and does nothing else. Its process's creation is read here, as msx's run_trial reads it."""
    started_at = psutil.Process().create_time()
    TorchTrainer(
        bare_worker_loop,
        train_loop_config={"trial_started_at": started_at, "trainable_s": time.time() - started_at},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=f"floor-{tune.get_context().get_trial_id()}", storage_path=config["storage_path"],
            callbacks=[TuneReportCallback()],
        ),
    ).fit()


def floor_trial(folder: Path) -> dict[str, float]:
    """Ray Train's floor: one bare TorchTrainer trial through `Tuner.fit`; when its phases began, as msx's are timed."""
    clock = ResultClock()
    tuner = tune.Tuner(
        tune.with_resources(bare_torchtrainer_trial, TRIAL_RESOURCES),
        param_space={"storage_path": str(folder / "train")},
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name="floor", storage_path=str(folder / "tune"), callbacks=[clock], verbose=0),
    )
    launched = time.time()
    grid = tuner.fit()
    finished = time.time()
    if grid.errors:
        raise RuntimeError(f"the floor's trial failed: {grid.errors}")
    metrics = grid[0].metrics
    return {
        "wall_s": finished - launched,
        "tune_start_s": clock.started_at - launched,
        "trial_process_s": metrics["trial_started_at"] - launched,
        **{f"startup_{phase}_s": metrics[f"{STARTUP_PREFIX}{phase}_s"] for phase in FLOOR_PHASES},
    }


def overhead_breakdown(plain: dict[str, float], ray_arm: dict[str, float]) -> list[tuple[str, float]]:
    """The Ray arm's extra seconds over the baseline, by where they went; the rest is what no clock here covers
    (validations and final evaluation in the worker, checkpoint copies, noise between the arms)."""
    startup = ray_arm["to_first_step_s"] - plain["to_first_step_s"]
    parts = [
        ("start-up: from Tuner.fit to the first step, less the baseline's", startup),
        ("reports: worker blocked in ray.train.report (estimated for the last)", ray_arm["report_s"]),
        ("training epochs: Ray worker less baseline", ray_arm["training_s"] - plain["training_s"]),
        ("tear-down: last result in the driver to Tuner.fit's return", ray_arm["teardown_s"]),
    ]
    overhead = ray_arm["wall_s"] - plain["wall_s"]
    return parts + [("the rest", overhead - sum(seconds for _, seconds in parts)), ("overhead", overhead)]


def startup_phases(arm: dict[str, float], phases: tuple[str, ...] = PHASES) -> list[tuple[str, float]]:
    """A Ray arm's trial start-up, phase by phase in the order they came, in seconds since the phase before (the
    first since Tuner.fit). Tune may tell its callbacks that a trial started after the trial's process started."""
    marks = [
        ("Tune starts the trial (driver)", arm["tune_start_s"]), ("trial's process created", arm["trial_process_s"])
    ]
    marks += [(phase, arm["trial_process_s"] + arm[f"startup_{phase}_s"]) for phase in phases]
    marks.sort(key=lambda mark: mark[1])
    return [(name, at - (marks[i - 1][1] if i else 0.0)) for i, (name, at) in enumerate(marks)]


def startup_against_floor(floor: dict[str, float], ray_arm: dict[str, float]) -> list[list]:
    """Rows of phase, the floor's seconds and msx's (each since the phase before); msx's later phases alone."""
    floor_seconds = dict(startup_phases(floor, FLOOR_PHASES))
    return [[name, floor_seconds.get(name, ""), seconds] for name, seconds in startup_phases(ray_arm)]


@contextmanager
def fresh_local_ray(metrics_port: int) -> Iterator[float]:
    """A local Ray of its own, started as `msx launch` starts one (study.start_ray) plus a known metrics port to read
    the worker from; yields the seconds `ray.init` took."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    ray.init(
        address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


def one_run(spec: ExperimentSpec, trial: TrialConfig, worker_threads: int, baseline: bool) -> dict:
    """Ray Train's floor, then msx's trial, each on a fresh local Ray; with `baseline`, the plain-Python fold loop
    first and the overhead against it."""
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        synthetic = spec.data.synthetic
        write_synthetic_cohort(scratch / "cohort", synthetic.patients, synthetic.shape, synthetic.seed)

        if baseline:
            threads_before = torch.get_num_threads()
            torch.set_num_threads(worker_threads)
            (scratch / "plain").mkdir()
            plain = plain_python_trial(spec, trial, scratch / "cohort", scratch / "plain")
            torch.set_num_threads(threads_before)
            print(f"plain Python: {plain['wall_s']:.1f} s", flush=True)

        with fresh_local_ray(free_port()) as floor_ray_init_s:
            floor = floor_trial(scratch / "floor")
        print(f"Ray Train's floor: worker loop {floor['startup_worker_loop_s']:.1f} s after its trial's process "
              f"started (ray.init {floor_ray_init_s:.1f} s before it)", flush=True)
        port = free_port()
        with fresh_local_ray(port) as ray_init_s:
            ray_arm = ray_trial(spec, scratch / "cohort", scratch, f"http://127.0.0.1:{port}/metrics")
        print(f"Ray trial: {ray_arm['wall_s']:.1f} s, worker loop {ray_arm['startup_worker_loop_s']:.1f} s after its "
              f"trial's process started (ray.init {ray_init_s:.1f} s before it)", flush=True)
    run = {
        "ray": ray_arm, "ray_init_s": ray_init_s, "floor": floor, "floor_ray_init_s": floor_ray_init_s,
        "load_average": os.getloadavg(),
    }
    if baseline:
        overhead_s = ray_arm["wall_s"] - plain["wall_s"]
        first_step_delay_s = ray_arm["to_first_step_s"] - plain["to_first_step_s"]
        run.update({
            "plain": plain,
            "overhead_s": overhead_s,
            "overhead_fraction": overhead_s / ray_arm["wall_s"],
            # What Ray's own clocks attribute to the orchestration, over the work it orchestrates: free of the
            # training epochs' noise between the arms, which a shared CPU makes as large as the overhead.
            "clocked_overhead_fraction": (
                first_step_delay_s + ray_arm["report_s"] + ray_arm["teardown_s"]
            ) / plain["wall_s"],
            "first_step_delay_s": first_step_delay_s,
        })
    return run


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=24, help="training epochs (the smoke spec's 24 by default)")
    parser.add_argument("--runs", type=int, default=2, help="runs of every arm; the one of least overhead is kept")
    parser.add_argument(
        "--startup-only", action="store_true",
        help="the start-up against Ray Train's floor only: msx's trial for one epoch, no plain-Python baseline",
    )
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    epochs = 1 if args.startup_only else args.epochs
    baseline = not args.startup_only
    spec = benchmark_spec(epochs)
    trial = TrialConfig(BACKBONE, fold=1, configuration=f"{BACKBONE}-c1")
    worker_threads = int(spec.resources.cpus_per_worker)
    runs = []
    for number in range(1, args.runs + 1):
        print(f"run {number}/{args.runs}, load average {os.getloadavg()[0]:.1f}", flush=True)
        runs.append(one_run(spec, trial, worker_threads, baseline))
        if baseline:
            print(f"run {number}: overhead {100 * runs[-1]['overhead_fraction']:.1f} %", flush=True)
    best = min(runs, key=lambda run: run["overhead_fraction"] if baseline else run["ray"]["startup_worker_loop_s"])
    floor_worker_loop_s = min(run["floor"]["startup_worker_loop_s"] for run in runs)
    msx_worker_loop_s = min(run["ray"]["startup_worker_loop_s"] for run in runs)
    results = {
        **best,
        "floor_worker_loop_s": floor_worker_loop_s,
        "msx_worker_loop_s": msx_worker_loop_s,
        "startup_beyond_floor_s": msx_worker_loop_s - floor_worker_loop_s,
        "runs": runs,
    }
    settings = {"epochs": epochs, "runs": args.runs, "startup_only": args.startup_only, "backbone": BACKBONE, "fold": 1,
                "worker_threads": worker_threads, "spec": spec.to_dict()}
    write_json(args.json, torch.device("cpu"), settings, results)

    ray_arm = best["ray"]
    if baseline:
        plain = best["plain"]
        headers = ["arm", "wall s", "to first step s", "in training epochs s", "last epoch steps/s", "best val Dice",
                   "test DSC"]
        rows = [
            [name, arm["wall_s"], arm["to_first_step_s"], arm["training_s"], arm["last_epoch_steps_per_s"],
             arm["val_dice"], arm["test_dsc"]]
            for name, arm in (("plain Python (baseline)", plain), ("Tune + Ray Train + MLflow", ray_arm))
        ]
        print_table(headers, rows)
        print()
        print_table(["where the overhead went", "s"], overhead_breakdown(plain, ray_arm))
        print()
    print_table(
        ["start-up phase (since the one before)", "Ray Train's floor s", "msx s"],
        startup_against_floor(best["floor"], ray_arm),
    )
    print()
    floor_runs, msx_runs = (
        ", ".join(f"{run[arm]['startup_worker_loop_s']:.1f}" for run in runs) for arm in ("floor", "ray")
    )
    print(f"worker loop after the trial's process started, best of {args.runs}: Ray Train's floor "
          f"{floor_worker_loop_s:.1f} s ({floor_runs}), msx {msx_worker_loop_s:.1f} s ({msx_runs}): "
          f"{results['startup_beyond_floor_s']:+.1f} s beyond the floor")
    if baseline:
        print(f"{ray_arm['reports']} reports, {ray_arm['per_report_s']:.3f} s each (worker blocked); a live-epoch call "
              f"costs its caller {1e6 * ray_arm['live_epoch_call_s']:.0f} us; training-only epoch in the baseline "
              f"{plain['training_only_epoch_s']:.2f} s (median)")
        fractions = ", ".join(f"{100 * run['overhead_fraction']:.1f} %" for run in runs)
        print(f"overhead {best['overhead_s']:.1f} s = {100 * best['overhead_fraction']:.1f} % of the Ray trial's wall "
              f"time (best of {args.runs}: {fractions}); by Ray's clocks (start-up beyond the baseline's, reports, "
              f"tear-down) {100 * best['clocked_overhead_fraction']:.1f} % of the baseline's; first step "
              f"{best['first_step_delay_s']:.1f} s later than the baseline's; ray.init {best['ray_init_s']:.1f} s")


if __name__ == "__main__":
    main()
