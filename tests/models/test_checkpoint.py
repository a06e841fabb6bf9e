import json
import os

import pytest
import torch

from msx.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msx.models.networks import NetworkConfig, build_network


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network(NetworkConfig(backbone="segresnet", image_channels=2, width=0.125))


def inputs():
    generator = torch.Generator().manual_seed(3)
    return (
        torch.randn(1, 2, 16, 16, 16, generator=generator),
        torch.randn(1, 1, 16, 16, 16, generator=generator),
        torch.tensor([321]),
    )


def test_round_trip_gives_identical_outputs_and_metadata(net, tmp_path):
    metadata = {"fold": 2, "epoch": 40, "val_dice": 0.61, "spec": {"patch": [96, 96, 96]}}
    directory = save_checkpoint(tmp_path / "best", net, metadata)
    assert sorted(p.name for p in directory.iterdir()) == ["network.json", "weights.pt"]
    record = json.loads((directory / "network.json").read_text())
    assert record["network"] == {"backbone": "segresnet", "image_channels": 2, "width": 0.125}

    loaded, loaded_metadata = load_checkpoint(directory)
    assert loaded.config == net.config and loaded_metadata == metadata
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs()), net(*inputs()), rtol=0, atol=0)


def test_saving_over_a_checkpoint_replaces_it_and_leaves_no_temporaries(net, tmp_path):
    target = tmp_path / "last"
    save_checkpoint(target, net, {"epoch": 1})
    save_checkpoint(target, net, {"epoch": 2})
    assert load_checkpoint(target)[1] == {"epoch": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_failed_save_keeps_the_previous_checkpoint(net, tmp_path, monkeypatch):
    target = tmp_path / "last"
    save_checkpoint(target, net, {"epoch": 1})

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(target, net, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(target)[1] == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_failure_while_swapping_in_the_new_checkpoint_restores_the_old_one(net, tmp_path, monkeypatch):
    target = tmp_path / "last"
    save_checkpoint(target, net, {"epoch": 1})
    real_replace, calls = os.replace, []

    def replace_failing_on_the_second_call(source, destination):
        calls.append((source, destination))
        if len(calls) == 2:  # the old checkpoint has moved aside; the new one is about to move in
            raise OSError("interrupted")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_on_the_second_call)
    with pytest.raises(OSError, match="interrupted"):
        save_checkpoint(target, net, {"epoch": 2})
    monkeypatch.undo()
    assert len(calls) == 3
    assert load_checkpoint(target)[1] == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_non_json_metadata_fails_before_writing(net, tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c", net, {"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_wrapped_networks_are_refused(net, tmp_path):
    with pytest.raises(TypeError, match="net.module"):
        save_checkpoint(tmp_path / "c", torch.nn.Sequential(net))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "absent" / "network.json")):
        load_checkpoint(tmp_path / "absent")


def test_missing_weights_name_the_path(net, tmp_path):
    directory = save_checkpoint(tmp_path / "c", net)
    (directory / "weights.pt").unlink()
    with pytest.raises(CheckpointError, match=str(directory / "weights.pt")):
        load_checkpoint(directory)


def test_truncated_weights_name_the_path(net, tmp_path):
    directory = save_checkpoint(tmp_path / "c", net)
    weights = directory / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(weights)):
        load_checkpoint(directory)


def test_weights_of_another_network_name_the_path(net, tmp_path):
    directory = save_checkpoint(tmp_path / "c", net)
    other = build_network(NetworkConfig(backbone="segresnet", image_channels=3, width=0.125))
    torch.save(other.state_dict(), directory / "weights.pt")
    with pytest.raises(CheckpointError, match="weights.pt"):
        load_checkpoint(directory)


@pytest.mark.parametrize("text", ["{not json", '{"network": {"backbone": "nope"}, "metadata": {}}', "[]"])
def test_corrupt_configuration_names_the_path(net, tmp_path, text):
    directory = save_checkpoint(tmp_path / "c", net)
    (directory / "network.json").write_text(text)
    with pytest.raises(CheckpointError, match=str(directory / "network.json")):
        load_checkpoint(directory)


def test_weights_are_loaded_without_unpickling_code(net, tmp_path):
    directory = save_checkpoint(tmp_path / "c", net)
    torch.save({"payload": print}, directory / "weights.pt")  # a pickled callable, refused by weights_only
    with pytest.raises(CheckpointError, match="weights.pt"):
        load_checkpoint(directory)
