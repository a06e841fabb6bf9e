"""The search's record: which configurations were pruned, waiting or complete, and what early stopping saved.

`configuration_search.ConfigurationSearch` writes a `SearchSummary` as JSON next to the study's record
whenever it changes (`msx status` reads it without Ray), and the launch logs it to its MLflow run, with a
status tag and the rung scores on each configuration's run (`tracking/summaries.py::log_search_record`;
`msx report` reads those).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state import STUDIES_FOLDER

SEARCH_SUFFIX = ".search.json"


def search_path(storage: Path, experiment: str, study: str) -> Path:
    return storage / experiment / STUDIES_FOLDER / f"{study}{SEARCH_SUFFIX}"


@dataclass(frozen=True)
class ConfigurationSummary:
    name: str
    backbone: str
    searched: dict[str, Any]
    status: str  # running, complete, pruned, failed, cut short
    rung_means: dict[int, float]  # rung epoch -> its folds' mean validation Dice there
    final_score: float | None  # complete: the mean over folds of the final validation Dice
    epochs_trained: int  # over its folds
    folds_waiting: int  # paused at a rung, or for a free slot
    last_report: float | None  # wall-clock time of its folds' latest report
    decided_at: float | None  # when it was pruned, completed, failed or cut short
    protected: bool  # its pruner said stop, but no other configuration of its backbone could finish

    @property
    def last_rung(self) -> int | None:
        return max(self.rung_means) if self.rung_means else None

    def describe(self) -> str:
        rung = self.last_rung
        at_rung = f"epoch {rung}, mean validation Dice {self.rung_means[rung]:.4f}" if rung is not None else ""
        if self.status == "complete":
            return f"complete, mean validation Dice {self.final_score:.4f}"
        if self.status == "pruned":
            return f"pruned at {at_rung}"
        if self.status == "running":
            passed = f"passed {at_rung}" if rung is not None else "before its first rung"
            waiting = f"; {self.folds_waiting} fold(s) paused" if self.folds_waiting else ""
            return f"running, {passed}{waiting}"
        return self.status + (f" after {at_rung}" if rung is not None else "")


@dataclass(frozen=True)
class SearchSummary:
    folds: int
    # By backbone (each may train under its own recipe): the last epoch, and the rung epochs before it.
    epochs: dict[str, int]
    rungs: dict[str, tuple[int, ...]]
    concurrency: int
    configurations: tuple[ConfigurationSummary, ...]
    finished: bool  # every configuration opened and resolved
    cut_short: bool  # the time budget ended the search
    time_budget_s: float | None
    elapsed_s: float
    # What synchronising the folds at the rungs cost.
    pauses: int
    paused_fold_s: float
    median_start_s: float | None  # from Tune starting a trial to its first report
    median_resume_s: float | None  # the same after a pause
    median_epoch_s: float | None  # per epoch, from the time between two reports of a running trial
    resumes: int
    idle_slot_s: float  # slot-seconds no trial held
    idle_while_waiting_slot_s: float  # of those, while a fold waited at a rung

    @property
    def epochs_trained(self) -> int:
        return sum(c.epochs_trained for c in self.configurations)

    @property
    def epochs_full_grid(self) -> int:
        """Every configuration the search opened, trained on every fold to the last epoch (FIFO's cost)."""
        return sum(self.folds * self.epochs[c.backbone] for c in self.configurations)

    def describe_rungs(self) -> str:
        """The rung epochs, like "2, 4", or by backbone where their recipes differ: "none (unet); 8, 16 (segresnet)"."""
        return _by_backbone({b: ", ".join(map(str, rungs)) or "none" for b, rungs in self.rungs.items()}, "; ")

    def describe_last_epochs(self) -> str:
        return _by_backbone({b: str(epochs) for b, epochs in self.epochs.items()}, ", ")

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.configurations)

    def lines(self) -> list[str]:
        statuses = ", ".join(
            f"{self.count(s)} {s}" for s in ("complete", "pruned", "running", "failed", "cut short") if self.count(s)
        )
        rungs = (
            f"; rungs at epochs {self.describe_rungs()}" if any(self.rungs.values())
            else "; no rung before the last epoch"
        )
        lines = [f"configurations: {len(self.configurations)} ({statuses or 'none yet'}){rungs}"]
        width = max((len(c.name) for c in self.configurations), default=0)
        for c in self.configurations:
            searched = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.searched.items())
            lines.append(f"  {c.name:{width}s}  {c.describe()}" + (f"  [{searched}]" if searched else ""))
        if self.configurations:
            full, trained = self.epochs_full_grid, self.epochs_trained
            lines.append(
                f"early stopping: {trained} of {full} fold-epochs trained, {full - trained} saved "
                f"({(full - trained) / full:.0%}) against every configuration on every fold to epoch "
                f"{self.describe_last_epochs()}"
            )
        if self.pauses or self.resumes:
            restart = ""
            if self.median_resume_s is not None and self.median_epoch_s is not None:
                restart = (f"; a resumed fold reported {self.median_resume_s:.0f} s after its resume (median; an "
                           f"epoch takes {self.median_epoch_s:.1f} s, a fresh start {self.median_start_s or 0:.0f} s)")
            lines.append(
                f"folds waiting at rungs: {self.pauses} pauses, {self.paused_fold_s:.0f} fold-s paused{restart}; "
                f"{self.idle_while_waiting_slot_s:.0f} slot-s idle while a fold waited"
            )
        if self.cut_short:
            lines.append(f"the search was cut short by search.time_budget_s ({self.time_budget_s:.0f} s)")
        return lines


def summary_to_dict(summary: SearchSummary) -> dict[str, Any]:
    return dataclasses.asdict(summary)


def summary_from_dict(raw: dict[str, Any]) -> SearchSummary:
    configurations = tuple(
        ConfigurationSummary(**{**c, "rung_means": {int(k): float(v) for k, v in c["rung_means"].items()}})
        for c in raw["configurations"]
    )
    epochs, rungs = raw["epochs"], raw["rungs"]
    if isinstance(epochs, int):  # written before backbones had recipes: one last epoch and one set of rungs
        backbones = {c.backbone for c in configurations}
        epochs, rungs = dict.fromkeys(backbones, epochs), dict.fromkeys(backbones, rungs)
    return SearchSummary(
        **{**raw, "epochs": epochs, "rungs": {b: tuple(r) for b, r in rungs.items()}, "configurations": configurations}
    )


def _by_backbone(values: dict[str, str], separator: str) -> str:
    """One value if every backbone has it, else each backbone's, named."""
    if len(set(values.values())) <= 1:
        return next(iter(values.values()), "")
    return separator.join(f"{value} ({backbone})" for backbone, value in values.items())


def write_summary(path: Path, summary: SearchSummary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(summary_to_dict(summary), indent=1))
    os.replace(partial, path)


def read_summary(path: Path) -> SearchSummary | None:
    try:
        return summary_from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
