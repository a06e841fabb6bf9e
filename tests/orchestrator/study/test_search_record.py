import json

from msx.orchestrator.study.search_record import (
    ConfigurationSummary,
    SearchSummary,
    read_summary,
    summary_to_dict,
    write_summary,
)


def configuration(name: str, backbone: str) -> ConfigurationSummary:
    return ConfigurationSummary(
        name, backbone, searched={}, status="complete", rung_means={}, final_score=0.5, epochs_trained=10,
        folds_waiting=0, last_report=None, decided_at=None, protected=False,
    )


def summary(epochs: dict, rungs: dict) -> SearchSummary:
    return SearchSummary(
        folds=2, epochs=epochs, rungs=rungs, concurrency=2,
        configurations=(configuration("unet-c1", "unet"), configuration("segresnet-c1", "segresnet")),
        finished=True, cut_short=False, time_budget_s=None, elapsed_s=1.0, pauses=0, paused_fold_s=0.0,
        median_start_s=None, median_resume_s=None, median_epoch_s=None, resumes=0, idle_slot_s=0.0,
        idle_while_waiting_slot_s=0.0,
    )


def test_one_last_epoch_and_rungs_read_as_one_and_differing_ones_by_backbone():
    same = summary({"unet": 8, "segresnet": 8}, {"unet": (2, 4), "segresnet": (2, 4)})
    assert (same.describe_rungs(), same.describe_last_epochs(), same.epochs_full_grid) == ("2, 4", "8", 2 * 8 + 2 * 8)
    apart = summary({"unet": 12, "segresnet": 8}, {"unet": (), "segresnet": (2, 4)})
    assert (apart.describe_rungs(), apart.describe_last_epochs()) == (
        "none (unet); 2, 4 (segresnet)",
        "12 (unet), 8 (segresnet)",
    )
    assert apart.epochs_full_grid == 2 * 12 + 2 * 8


def test_a_summary_written_and_read_back_is_the_same_and_an_older_one_takes_its_values_for_every_backbone(tmp_path):
    written = summary({"unet": 12, "segresnet": 8}, {"unet": (4, 8), "segresnet": (2,)})
    write_summary(tmp_path / "s.json", written)
    assert read_summary(tmp_path / "s.json") == written
    older = summary_to_dict(written) | {"epochs": 8, "rungs": [2, 4]}  # one last epoch for the whole study
    (tmp_path / "old.json").write_text(json.dumps(older))
    read = read_summary(tmp_path / "old.json")
    assert read.epochs == {"unet": 8, "segresnet": 8} and read.rungs == {"unet": (2, 4), "segresnet": (2, 4)}
