"""A trial, the unit of a study: one (backbone, configuration's searched values, fold); and the keys of what it reports.

Ray Tune carries a trial's config as a flat dict, `{"backbone", "fold", "configuration", **searched}` with the
searched values under their dotted spec fields ("training.lr"), and so do the MLflow params of its runs. That dict
is made and read here only (`to_tune`, `from_tune`); every other module handles a `TrialConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the spec imports msx.models (torch, MONAI), which a trial's own process does without
    from .spec import ExperimentSpec

# The keys of a trial's reports (trials/worker.py makes them from the fold loop's EpochReport). A trial reports at
# its validation epochs only, the last epoch included; Tune's scheduler and the searcher optimise BEST_VALIDATION_DICE.
EPOCH = "epoch"
TRAIN_LOSS = "train_loss"
LEARNING_RATE = "lr"
# The epochs since the previous report, which were not reported themselves: a list of (epoch, train_loss, lr), logged to
# MLflow at their own epochs (a report's own epoch's loss and rate are under TRAIN_LOSS and LEARNING_RATE).
EARLIER_EPOCHS = "earlier_epochs"
# Seconds the reporting worker spent blocked in its earlier reports to Tune (Ray Train synchronises the ranks and
# waits for its controller to take the previous result): what reporting costs a trial.
REPORT_WAIT = "report_wait_s"
# The first report of a worker group's run: seconds from the trial's process start to each phase of the start-up,
# under this prefix (`startup/first_epoch_s`); trials/startup.py names the phases.
STARTUP_PREFIX = "startup/"
# The last report: seconds the run spent in each phase (msx.models.fold.EpochReport.phase_seconds), under this prefix
# (`seconds/training`, `seconds/validation`, `seconds/evaluation_msx`, ...).
PHASE_SECONDS_PREFIX = "seconds/"
VALIDATION_DICE = "val_dice_now"  # this epoch's weights
BEST_VALIDATION_DICE = "val_dice"  # the best so far, whose weights the trial keeps
# Marks the last report, which carries the final evaluation's split scores (`val/mean/dsc`, ...).
FINAL_REPORT = "final"
# Marks the report of the checkpoint a run resumed from, made again (models.fold.EpochReport.replayed): its scheduler
# decides on it as on any report; MLflow keeps it once.
REPLAYED_REPORT = "replayed"


@dataclass(frozen=True)
class TrialConfig:
    """Which backbone, which of its configurations (named like `unet-c1`, with its searched values) and which fold."""

    backbone: str
    fold: int
    configuration: str
    # Dotted spec fields -> values, as the searcher proposed them (strings when read back from MLflow params).
    searched: Mapping[str, Any] = field(default_factory=dict)

    def to_tune(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "fold": self.fold, "configuration": self.configuration, **self.searched}

    @classmethod
    def from_tune(cls, config: Mapping[str, Any]) -> TrialConfig:
        """From Tune's config dict, or a trial run's MLflow params (where every value is a string)."""
        return cls(
            backbone=config["backbone"],
            fold=int(config["fold"]),
            configuration=config["configuration"],
            searched={key: value for key, value in config.items() if "." in key},
        )

    def configuration_params(self) -> dict[str, Any]:
        """What the configuration's folds share: the trial's config without its fold."""
        return {key: value for key, value in self.to_tune().items() if key != "fold"}

    @property
    def run_name(self) -> str:
        return f"{self.configuration}-fold{self.fold}"

    @property
    def label(self) -> str:
        return f"{self.configuration} fold {self.fold}"

    def spec_of(self, experiment: ExperimentSpec) -> ExperimentSpec:
        """The experiment's spec as this trial runs it: its one backbone under its recipe, and its searched values. It
        is recorded with the trial's model, which so carries its own plan."""
        return experiment.for_backbone(self.backbone).with_overrides(
            {"model.backbones": (self.backbone,), **self.searched}
        )
