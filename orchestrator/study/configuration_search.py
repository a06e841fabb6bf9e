"""Early stopping whose unit is the configuration, over the leave-one-subject-out folds.

A configuration (backbone + searched hyperparameters) is trained as one Tune trial per fold. Folds differ in
difficulty, so one fold's validation Dice against another fold's says more about the folds than about the
configurations, and selection needs a configuration finished on every fold. Hence:

- one Optuna study per backbone proposes configurations (`ask`; the spec's `initial` point is enqueued first)
  and learns their scores (`tell`);
- at each rung (`search.rung_epochs`) a configuration's folds wait for each other: a fold trial that reaches
  the rung is paused (Tune frees its workers; its Ray Train checkpoint of that epoch stays) until every fold
  of its configuration has, and the configuration's score at the rung is its folds' mean validation Dice,
  reported to its Optuna trial, whose pruner (successive halving) decides for the configuration as a whole;
- pruned: every fold trial stops and Optuna records the trial PRUNED; promoted: the paused folds resume
  from their checkpoints;
- complete (every fold reached its final evaluation): Optuna is told the mean over folds.

Neither library groups trials: Tune's schedulers judge single trials and Optuna's pruners single curves.
What is written here is that grouping, nothing else: Optuna samples and prunes, Tune pauses, resumes and
stops. `ConfigurationSearch`, Tune's searcher, owns the bookkeeping, and Tune saves it with the experiment
(`save`/`restore`), so a restarted driver knows which configurations were pruned or waiting;
`ConfigurationScheduler`, Tune's scheduler, holds no state (Tune pickles its scheduler once, at the start)
and acts on the searcher's. The searcher also bounds how many fold trials hold workers at once: Tune's own
limit counts paused trials, which hold none.

Two more duties: the time budget (`search.time_budget_s`), which msx keeps itself so that it never cuts
off the one configuration that would give the study its answer (`_cut_short`), and a JSON snapshot of the
search (`search_record.SearchSummary`) for `msx status`, the launch's output and the report.
"""

from __future__ import annotations

import math
import os
import pickle
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from msx.models.data.folds import Fold

from ..spec import ExperimentSpec
from ..trial import EPOCH, FINAL_REPORT, TrialConfig
from ..trials.rung_gate import open_gate
from . import interruption
from .search import MODE, OPTIMISED_METRIC, PRUNERS, SAMPLERS, optuna_distribution, rung_epochs
from .search_record import ConfigurationSummary, SearchSummary, write_summary

# A fold trial's phase, as the search sees it.
QUEUED = "queued"  # handed to Tune (starting or training): holds, or is about to hold, its workers
WAITING = "waiting"  # paused at a rung until the configuration's other folds reach it
READY = "ready"  # paused; its configuration was promoted; resumes when a slot is free
DONE, STOPPED, FAILED = "done", "stopped", "failed"

# A configuration's status.
RUNNING, COMPLETE, PRUNED, CUT_SHORT = "running", "complete", "pruned", "cut short"

# Tests only: seconds the scheduler takes before it returns a PAUSE, as a driver on a loaded machine may, while the
# paused trial's workers go on (tests/test_study_lifecycle_e2e.py).
PAUSE_DELAY_VARIABLE = "MSX_TEST_PAUSE_DELAY_S"

# How long Tune may hold paused folds with nothing running, nothing ready and nothing left to start before the
# search calls the study stalled: longer than the moment between one trial's end and the next one's start.
STALL_GRACE_S = 10.0


@dataclass
class FoldProgress:
    fold: int
    trial_id: str | None = None  # None until Tune asked for the trial
    phase: str = QUEUED
    epoch: int = 0
    rung_scores: dict[int, float] = field(default_factory=dict)
    final_score: float | None = None
    last_report: float | None = None  # wall-clock time of its latest report
    paused_at: float | None = None  # while paused
    # When the trial was handed to Tune (started, or resumed after a pause), until its first report.
    handed_at: float | None = None
    resumed: bool = False


@dataclass
class ConfigurationProgress:
    name: str
    backbone: str
    searched: dict[str, Any]
    optuna_trial_id: int
    optuna_number: int
    folds: dict[int, FoldProgress]
    status: str = RUNNING
    next_rung: int = 0  # index into the rungs
    rung_means: dict[int, float] = field(default_factory=dict)
    decided_at: float | None = None  # when it was pruned, completed, failed or cut short
    # Kept although its pruner said stop: no other configuration of its backbone could still finish.
    protected: bool = False

    def fold_of(self, trial_id: str) -> FoldProgress:
        return next(f for f in self.folds.values() if f.trial_id == trial_id)


class ConfigurationSearch(Searcher):
    """Tune's searcher for a study: configurations from Optuna, one trial per fold, decisions by configuration.

    `concurrency`: how many fold trials may hold workers at once. `snapshot`: the JSON file the search's
    summary is written to whenever it changes. `echo` prints the decisions.
    """

    def __init__(
        self,
        spec: ExperimentSpec,
        folds: tuple[Fold, ...],
        concurrency: int,
        snapshot: Path | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        super().__init__(metric=OPTIMISED_METRIC, mode=MODE)
        self._folds = tuple(fold.index for fold in folds)
        # Each backbone trains under its own recipe (ExperimentSpec.recipes): its last epoch and rungs are its own.
        self._epochs = {b: spec.for_backbone(b).training.epochs for b in spec.model.backbones}
        self._rungs = {b: rung_epochs(spec.for_backbone(b)) for b in spec.model.backbones}
        self._concurrency = concurrency
        self._budget = {backbone: spec.search.configurations_per_backbone for backbone in spec.model.backbones}
        self._distributions = {p.name: optuna_distribution(p) for p in spec.search.parameters}
        self._studies = {
            backbone: self._new_study(spec.for_backbone(backbone), seed_offset)
            for seed_offset, backbone in enumerate(spec.model.backbones)
        }
        self._configurations: dict[str, ConfigurationProgress] = {}
        self._configuration_of_trial: dict[str, str] = {}
        self._next_backbone = 0
        self._time_budget_s = spec.search.time_budget_s
        self._elapsed_before_s = 0.0
        self._clock = time.monotonic()
        self._cut_short = False
        # Set by `restore`: the first scheduler step puts the restored trials back in their phases.
        self.restored = False
        # What synchronising the folds costs, for the summary: pause lengths, the time from a (re)start to
        # the trial's first report, the time between two reports, and slot-seconds no trial held.
        self._pause_s: list[float] = []
        self._start_s: list[float] = []
        self._resume_s: list[float] = []
        self._epoch_s: list[float] = []
        self._idle_slot_s = 0.0
        self._idle_while_waiting_slot_s = 0.0
        self._last_tick: float | None = None
        self._snapshot = snapshot
        self._echo = echo

    @staticmethod
    def _new_study(spec: ExperimentSpec, seed_offset: int) -> optuna.Study:
        study = optuna.create_study(
            direction="maximize",
            sampler=SAMPLERS[spec.search.searcher](spec.search.seed + seed_offset),
            pruner=PRUNERS[spec.search.scheduler.name](spec),
        )
        parameters = spec.search.parameters
        if parameters and all(p.initial is not None for p in parameters):
            study.enqueue_trial({p.name: p.initial for p in parameters})
        return study

    # ---- what Tune asks

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.restored:
            return None  # until the scheduler has put the restored trials back in their phases
        if self.active() >= self._concurrency or self.ready_trials():
            return None
        found = self._unsuggested_fold() or (self._open_configuration() and self._unsuggested_fold())
        if not found:
            return Searcher.FINISHED if self._nothing_left_to_open() else None
        configuration, fold = found
        fold.trial_id = trial_id
        fold.phase = QUEUED
        fold.handed_at = time.time()
        self._configuration_of_trial[trial_id] = configuration.name
        self._write_snapshot()
        return TrialConfig(
            configuration.backbone, fold.fold, configuration.name, dict(configuration.searched)
        ).to_tune()

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._configuration_of_trial:
            return
        configuration = self._configurations[self._configuration_of_trial[trial_id]]
        fold = configuration.fold_of(trial_id)
        if error:
            fold.phase = FAILED
            if configuration.status == RUNNING:
                # Selection needs every fold: the configuration can no longer be chosen, and its other folds stop.
                self._end(configuration, FAILED)
                self._echo(f"{configuration.name}: fold {fold.fold} failed; the configuration stops")
        elif result and result.get(FINAL_REPORT):
            fold.phase = DONE
            fold.epoch = int(result.get(EPOCH, self._epochs[configuration.backbone]))
            score = result.get(OPTIMISED_METRIC)
            fold.final_score = math.nan if score is None else float(score)
            if configuration.status == RUNNING and all(f.phase == DONE for f in configuration.folds.values()):
                mean = _mean(f.final_score for f in configuration.folds.values())
                configuration.status = COMPLETE
                configuration.decided_at = time.time()
                self._studies[configuration.backbone].tell(configuration.optuna_number, mean)
                self._echo(
                    f"{configuration.name}: complete, mean validation Dice {mean:.4f} over {len(self._folds)} folds"
                )
        else:
            fold.phase = STOPPED
        self._write_snapshot()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return True

    def save(self, checkpoint_path: str) -> None:
        # Tune checkpoints this with the experiment: a restarted driver resumes the search, decisions included.
        self._elapsed_before_s = self.elapsed_s()
        self._clock = time.monotonic()
        self._write_snapshot()
        state = {k: v for k, v in self.__dict__.items() if k not in ("_snapshot", "_echo")}
        with open(checkpoint_path, "wb") as file:
            pickle.dump(state, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__setstate__(pickle.load(file))
        self.restored = True

    def __setstate__(self, state: dict) -> None:
        # Also when Tune unpickles the searcher it saved at the start: time runs from this process's clock.
        self.__dict__.update(state)
        self._clock = time.monotonic()
        self._last_tick = None

    # ---- decisions, asked by the scheduler

    def configuration_of(self, trial_id: str) -> ConfigurationProgress | None:
        name = self._configuration_of_trial.get(trial_id)
        return self._configurations[name] if name else None

    def on_report(self, trial_id: str, result: dict) -> str:
        """A fold trial's report: CONTINUE, PAUSE (wait at the rung) or STOP (its configuration ended)."""
        configuration = self.configuration_of(trial_id)
        if configuration is None:
            return TrialScheduler.CONTINUE
        fold = configuration.fold_of(trial_id)
        now = time.time()
        if fold.handed_at is not None:
            # From Tune's start of the trial (or its resume) to the first report: what a (re)start costs.
            (self._resume_s if fold.resumed else self._start_s).append(now - fold.handed_at)
            fold.handed_at = None
        elif (
            result.get("time_this_iter_s") is not None
            and (epochs := int(result.get(EPOCH, fold.epoch)) - fold.epoch) > 0
        ):
            # A trial reports at its validations: the time since its last report covers that many epochs.
            self._epoch_s.append(float(result["time_this_iter_s"]) / epochs)
        fold.last_report = now
        if configuration.status != RUNNING:
            return TrialScheduler.STOP
        if fold.phase == WAITING:
            return TrialScheduler.PAUSE
        fold.phase = QUEUED
        fold.epoch = int(result.get(EPOCH, fold.epoch))
        score = result.get(OPTIMISED_METRIC)
        rungs = self._rungs[configuration.backbone]
        rung = rungs[configuration.next_rung] if configuration.next_rung < len(rungs) else None
        if rung is None or score is None or fold.epoch < rung or result.get(FINAL_REPORT) or self._cut_short:
            return TrialScheduler.CONTINUE
        fold.rung_scores[rung] = float(score)
        if any(rung not in f.rung_scores for f in configuration.folds.values()):
            fold.phase = WAITING
            fold.paused_at = now
            self._echo(
                f"{configuration.name} fold {fold.fold}: at epoch {rung}, paused (workers freed) until its other folds "
                "get there"
            )
            self._write_snapshot()
            return TrialScheduler.PAUSE
        decision = self._decide(configuration, rung)
        self._write_snapshot()
        return decision

    def _decide(self, configuration: ConfigurationProgress, rung: int) -> str:
        """Every fold reached `rung`: the configuration's mean goes to Optuna, whose pruner decides for all folds."""
        mean = _mean(f.rung_scores[rung] for f in configuration.folds.values())
        configuration.rung_means[rung] = mean
        study = self._studies[configuration.backbone]
        trial = optuna.trial.Trial(study, configuration.optuna_trial_id)
        trial.report(mean, rung)
        prune = trial.should_prune()
        if prune and not self._others_can_finish(configuration):
            prune, configuration.protected = False, True
        if prune:
            self._end(configuration, PRUNED)
            self._echo(
                f"{configuration.name}: pruned at epoch {rung} (mean validation Dice {mean:.4f} over "
                f"{len(self._folds)} folds); its fold trials stop"
            )
            return TrialScheduler.STOP
        rungs = self._rungs[configuration.backbone]
        while configuration.next_rung < len(rungs) and rungs[configuration.next_rung] <= rung:
            configuration.next_rung += 1
        for fold in configuration.folds.values():
            if fold.phase == WAITING:
                fold.phase = READY
        protected = " (kept: no other configuration of its backbone can finish)" if configuration.protected else ""
        self._echo(f"{configuration.name}: continues past epoch {rung} (mean validation Dice {mean:.4f}){protected}")
        return TrialScheduler.CONTINUE

    def _others_can_finish(self, configuration: ConfigurationProgress) -> bool:
        """Whether another configuration of the backbone is complete or may still be: the incumbent's guard."""
        return any(
            other is not configuration and other.backbone == configuration.backbone
            and other.status in (RUNNING, COMPLETE)
            for other in self._configurations.values()
        ) or self._budget[configuration.backbone] > 0

    def _end(self, configuration: ConfigurationProgress, status: str) -> None:
        """Pruned, failed or cut short: its folds stop (the scheduler stops their trials) and Optuna is told."""
        configuration.status = status
        configuration.decided_at = time.time()
        for fold in configuration.folds.values():
            if fold.phase in (QUEUED, WAITING, READY):
                if fold.paused_at is not None:
                    self._pause_s.append(configuration.decided_at - fold.paused_at)
                    fold.paused_at = None
                fold.phase = STOPPED
        study = self._studies[configuration.backbone]
        optuna.trial.Trial(study, configuration.optuna_trial_id).set_user_attr("msx_status", status)
        study.tell(configuration.optuna_number, state=TrialState.PRUNED if status == PRUNED else TrialState.FAIL)

    def resumed(self, trial_id: str) -> None:
        """The scheduler gave a paused fold trial back to Tune."""
        configuration = self.configuration_of(trial_id)
        fold = configuration.fold_of(trial_id)
        now = time.time()
        self._pause_s.append(now - (fold.paused_at or now))
        fold.phase, fold.paused_at, fold.handed_at, fold.resumed = QUEUED, None, now, True
        self._write_snapshot()

    def phase_of(self, trial_id: str) -> str | None:
        configuration = self.configuration_of(trial_id)
        return configuration.fold_of(trial_id).phase if configuration else None

    def active(self) -> int:
        """Fold trials that hold, or are about to hold, workers."""
        return sum(
            f.phase == QUEUED and f.trial_id is not None for c in self._configurations.values()
            for f in c.folds.values()
        )

    def ready_trials(self) -> list[str]:
        """Paused fold trials of promoted configurations, oldest configuration first."""
        return [
            f.trial_id for c in self._configurations.values() if c.status == RUNNING
            for f in c.folds.values() if f.phase == READY
        ]

    def has_free_slot(self) -> bool:
        return self.active() < self._concurrency

    def ended_trials(self) -> set[str]:
        """Fold trials whose configuration ended (pruned, failed, cut short) and which Tune may still run."""
        return {
            f.trial_id for c in self._configurations.values() if c.status not in (RUNNING, COMPLETE)
            for f in c.folds.values() if f.trial_id is not None and f.phase == STOPPED
        }

    def stall(self) -> str | None:
        """Why the search can no longer go on, or None: a configuration whose folds wait at a rung for a fold that
        ended without a score there. Rung gates keep a fold from passing a rung unreported (trials/rung_gate.py):
        this names what went wrong if that ever fails, rather than wait for a score that cannot come."""
        for configuration in self._configurations.values():
            rungs = self._rungs[configuration.backbone]
            if configuration.status != RUNNING or configuration.next_rung >= len(rungs):
                continue
            rung = rungs[configuration.next_rung]
            waiting = [f.fold for f in configuration.folds.values() if f.phase == WAITING]
            lost = [
                f"{f.fold} ({f.phase} at epoch {f.epoch})" for f in configuration.folds.values()
                if f.phase in (DONE, STOPPED, FAILED) and rung not in f.rung_scores
            ]
            if waiting and lost:
                return (
                    f"{configuration.name}: fold(s) {', '.join(map(str, waiting))} wait at the epoch-{rung} rung for "
                    f"fold(s) {', '.join(lost)}, which ended without a score there"
                )
        return None

    def echo(self, line: str) -> None:
        self._echo(line)

    def waiting_folds(self) -> list[str]:
        """The folds paused at a rung, as `configuration fold N`."""
        return [
            f"{c.name} fold {f.fold}" for c in self._configurations.values() for f in c.folds.values()
            if f.phase == WAITING
        ]

    def can_start_more(self) -> bool:
        """Whether a fold trial is left to hand to Tune: one not yet suggested, or a configuration not yet opened."""
        return self._unsuggested_fold() is not None or not self._nothing_left_to_open()

    # ---- the time budget

    def elapsed_s(self) -> float:
        return self._elapsed_before_s + time.monotonic() - self._clock

    def check_budget(self) -> None:
        """Once the budget is spent: no configuration opens; with one complete, every other stops; without,
        the most advanced one (furthest rung, then best score there) goes on alone, so the study ends with an
        answer."""
        if self._cut_short or self._time_budget_s is None or self.elapsed_s() < self._time_budget_s:
            return
        self._cut_short = True
        running = [c for c in self._configurations.values() if c.status == RUNNING]
        complete = [c for c in self._configurations.values() if c.status == COMPLETE]
        keep = max(running, key=self._advance, default=None) if not complete else None
        for configuration in running:
            if configuration is not keep:
                self._end(configuration, CUT_SHORT)
        for fold in keep.folds.values() if keep else ():
            if fold.phase == WAITING:
                fold.phase = READY
        kept = f"; {keep.name} goes on to its last epoch so that one configuration finishes every fold" if keep else ""
        self._echo(f"time budget of {self._time_budget_s:.0f} s spent: no further configuration starts{kept}")
        self._write_snapshot()

    def _advance(self, configuration: ConfigurationProgress) -> tuple[int, float, int]:
        """How far a configuration got: rungs passed, its mean at the last of them, its slowest fold's epoch."""
        passed = configuration.next_rung
        score = (
            configuration.rung_means.get(self._rungs[configuration.backbone][passed - 1], math.nan) if passed
            else math.nan
        )
        return passed, -math.inf if math.isnan(score) else score, min(f.epoch for f in configuration.folds.values())

    # ---- bookkeeping

    def tick(self, now: float | None = None) -> None:
        """Slot-seconds no trial held, and those while a fold waited at a rung (synchronisation's idle time)."""
        now = time.monotonic() if now is None else now
        if self._last_tick is not None:
            free = max(0, self._concurrency - self.active()) * (now - self._last_tick)
            self._idle_slot_s += free
            if any(f.phase == WAITING for c in self._configurations.values() for f in c.folds.values()):
                self._idle_while_waiting_slot_s += free
        self._last_tick = now

    def _unsuggested_fold(self) -> tuple[ConfigurationProgress, FoldProgress] | None:
        for configuration in self._configurations.values():
            if configuration.status != RUNNING:
                continue
            for fold in configuration.folds.values():
                if fold.trial_id is None:
                    return configuration, fold
        return None

    def _open_configuration(self) -> bool:
        if self._cut_short and self._configurations:
            return False  # a budget spent before anything opened still lets one configuration give an answer
        backbones = [b for b in self._budget if self._budget[b] > 0]
        if not backbones:
            return False
        backbone = backbones[self._next_backbone % len(backbones)]
        self._next_backbone += 1
        self._budget[backbone] -= 1
        study = self._studies[backbone]
        trial = study.ask(self._distributions)
        name = f"{backbone}-c{sum(c.backbone == backbone for c in self._configurations.values()) + 1}"
        self._configurations[name] = ConfigurationProgress(
            name=name,
            backbone=backbone,
            searched=dict(trial.params),
            optuna_trial_id=trial._trial_id,
            optuna_number=trial.number,
            folds={index: FoldProgress(index) for index in self._folds},
        )
        return True

    def _nothing_left_to_open(self) -> bool:
        return (self._cut_short and bool(self._configurations)) or not any(self._budget.values())

    @property
    def studies(self) -> dict[str, optuna.Study]:
        """Each backbone's Optuna study: its trials' states and values are the search's record."""
        return self._studies

    def summary(self) -> SearchSummary:
        configurations = tuple(
            ConfigurationSummary(
                name=c.name,
                backbone=c.backbone,
                searched=dict(c.searched),
                status=c.status,
                rung_means={int(k): float(v) for k, v in c.rung_means.items()},
                final_score=_mean(f.final_score for f in c.folds.values()) if c.status == COMPLETE else None,
                epochs_trained=sum(f.epoch for f in c.folds.values()),
                folds_waiting=sum(f.phase in (WAITING, READY) for f in c.folds.values()),
                last_report=max((f.last_report for f in c.folds.values() if f.last_report), default=None),
                decided_at=c.decided_at,
                protected=c.protected,
            )
            for c in self._configurations.values()
        )
        return SearchSummary(
            folds=len(self._folds),
            epochs=dict(self._epochs),
            rungs=dict(self._rungs),
            concurrency=self._concurrency,
            configurations=configurations,
            finished=self._nothing_left_to_open() and all(c.status != RUNNING for c in self._configurations.values()),
            cut_short=self._cut_short,
            time_budget_s=self._time_budget_s,
            elapsed_s=self.elapsed_s(),
            pauses=len(self._pause_s),
            paused_fold_s=sum(self._pause_s),
            median_start_s=_median(self._start_s),
            median_resume_s=_median(self._resume_s),
            median_epoch_s=_median(self._epoch_s),
            resumes=len(self._resume_s),
            idle_slot_s=self._idle_slot_s,
            idle_while_waiting_slot_s=self._idle_while_waiting_slot_s,
        )

    def _write_snapshot(self) -> None:
        if self._snapshot is not None:
            write_summary(self._snapshot, self.summary())


class ConfigurationScheduler(TrialScheduler):
    """Tune's scheduler for a `ConfigurationSearch`: pauses, resumes and stops fold trials as the search decides.

    It keeps no state of its own (Tune saves the searcher's, not the scheduler's): every call finds the
    search through Tune's controller.
    """

    # One result at a time: a fold must pause at its rung, not after the results buffered behind it.
    _supports_buffered_results = False
    # Since when Tune has held paused folds with nothing else to run (the study stalls past STALL_GRACE_S); not
    # saved: a resumed driver counts afresh.
    _idle_since: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self._metric, self._mode = OPTIMISED_METRIC, MODE

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        pass

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        pass

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        search = _search_of(tune_controller)
        decision = search.on_report(trial.trial_id, result)
        if decision == TrialScheduler.STOP:
            self._stop_ended(tune_controller, search, besides=trial)
        elif decision == TrialScheduler.CONTINUE and EPOCH in result:
            # The trial's workers wait at a rung until this (trials/rung_gate.py).
            open_gate(trial.trial_id, int(result[EPOCH]))
        elif decision == TrialScheduler.PAUSE and (delay := os.environ.get(PAUSE_DELAY_VARIABLE)):
            time.sleep(float(delay))
        return decision

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        pass

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        pass

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """Called at every step of Tune's loop: the place for what does not wait for a trial's report."""
        search = _search_of(tune_controller)
        if search.restored:
            self._restore_phases(tune_controller, search)
        search.check_budget()
        search.tick()
        self._stop_ended(tune_controller, search)
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if search.has_free_slot():
            ready = set(search.ready_trials())
            for trial in trials:
                if trial.status == Trial.PAUSED and trial.trial_id in ready:
                    search.resumed(trial.trial_id)
                    return trial
        self._stop_if_stalled(search, trials)
        return None

    def _stop_if_stalled(self, search: ConfigurationSearch, trials: list[Trial]) -> None:
        """End the study, resumable, rather than wait for ever: folds wait at a rung for a score that cannot come,
        or Tune holds paused folds with nothing running, pending or left to start."""
        reason = search.stall()
        idle = (
            not any(trial.status in (Trial.RUNNING, Trial.PENDING) for trial in trials)
            and any(trial.status == Trial.PAUSED for trial in trials)
            and not search.can_start_more()
        )
        now = time.monotonic()
        self._idle_since = (self._idle_since or now) if idle else None
        if reason is None and self._idle_since is not None and now - self._idle_since >= STALL_GRACE_S:
            reason = (
                f"paused folds ({', '.join(search.waiting_folds()) or 'none waiting at a rung'}) and nothing to run"
            )
        if reason is None or interruption.INTERRUPTED.is_set():
            return
        search.echo(f"STALLED: {reason}. The study stops here, every result kept, to be resumed")
        interruption.stop_run(f"stalled: {reason}")

    def debug_string(self) -> str:
        return "Using ConfigurationScheduler: successive halving by configuration over folds."

    @staticmethod
    def _stop_ended(tune_controller, search: ConfigurationSearch, besides: Trial | None = None) -> None:
        """Stop every trial of a configuration that ended (the trial that reported is stopped by its decision)."""
        ended = search.ended_trials()
        for trial in tune_controller.get_trials():
            if trial is not besides and trial.trial_id in ended and trial.status in (
                Trial.PENDING, Trial.PAUSED, Trial.RUNNING
            ):
                tune_controller.stop_trial(trial)

    @staticmethod
    def _restore_phases(tune_controller, search: ConfigurationSearch) -> None:
        """A restored experiment lists every unfinished trial as PENDING: those that waited at a rung, or for a
        slot, wait again rather than start."""
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING and search.phase_of(trial.trial_id) in (WAITING, READY):
                tune_controller._set_trial_status(trial, Trial.PAUSED)
        search.restored = False


def _search_of(tune_controller) -> ConfigurationSearch:
    search = tune_controller.search_alg
    while not isinstance(search, ConfigurationSearch):
        search = search.searcher
    return search


def _mean(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
