"""Progress lines: a running trial shows the epoch its workers last told the study's live-epoch actor, and the
epoch of its last report where the actor knows none. Real (stub) Tune `Trial` objects; the actor itself is
exercised on a real local Ray in tests/orchestrator/trials/test_live_epochs.py."""

from ray.tune.experiment import Trial

from msx.orchestrator.study.progress import ProgressView, progress_of
from msx.orchestrator.trial import BEST_VALIDATION_DICE, EPOCH


def running_trial(fold: int, last_result: dict | None) -> Trial:
    trial = Trial(
        "msx", config={"backbone": "unet", "fold": fold, "configuration": "unet-c1"}, trial_id=f"t_{fold}", stub=True
    )
    trial.set_status(Trial.RUNNING)
    trial.run_metadata.last_result = dict(last_result or {})
    return trial


def test_running_trials_show_their_live_epoch_else_their_last_reported_one():
    trials = [
        running_trial(1, {EPOCH: 10, BEST_VALIDATION_DICE: 0.5}),  # validated at 10, now at 17
        running_trial(2, {EPOCH: 10, BEST_VALIDATION_DICE: 0.4}),  # the actor knows nothing of it
        running_trial(3, None),  # its worker started and finished no epoch yet
    ]
    live = {"t_1": 17, "t_3": 0}
    progress = progress_of(trials, total=3, elapsed_s=5.0, live_epochs=live)
    assert progress.running == ("unet-c1 fold 1: epoch 17", "unet-c1 fold 2: epoch 10", "unet-c1 fold 3: starting")
    assert progress_of(trials, total=3, elapsed_s=5.0).running[0] == "unet-c1 fold 1: epoch 10"


def test_without_a_live_epoch_actor_the_view_prints_the_reported_epochs(tmp_path):
    # A view that names no actor (as outside a study) asks nothing of Ray and says what the reports say.
    lines = []
    view = ProgressView(total_trials=1, echo=lines.append, snapshot=tmp_path / "progress.json")
    view.on_step_end(iteration=1, trials=[running_trial(1, {EPOCH: 10})])
    assert lines and lines[-1].endswith("unet-c1 fold 1: epoch 10")
