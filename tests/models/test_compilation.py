"""A fold trained and validated with `training.compile` on gives the eager fold's numbers, compiles once for
training and once for sampling, and never again per validation; its checkpoints keep plain keys.

Backend "aot_eager" runs the graphs dynamo and AOTAutograd trace (the ones Inductor would generate code for)
without Inductor's minutes of compilation on this CPU; `tests/models/networks/test_compile.py` proves every
backbone traces into one graph.
"""


import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msx.models.compilation import compile_wanted
from msx.models.engine import InferenceConfig
from msx.models.fold import FoldConfig, TrainingConfig, run_fold
from msx.models.networks import NetworkConfig
from tests.helpers import REPOSITORY, tiny_fold_data

PATCH = (32, 32, 32)
EPOCHS = 4
# One chain in validation and in the final evaluation: both sample windows of one shape, so after the first
# validation nothing is compiled again. sw_batch_size 3 leaves a smaller last batch of windows, which is padded.
EVALUATION = InferenceConfig(ddim_steps=2, samples=1, roi_size=PATCH, overlap=0.25, sw_batch_size=3, strategies=("mean",))


def fold_config(compile_setting) -> FoldConfig:
    return FoldConfig(
        NetworkConfig("basic-unet", image_channels=2, width=0.125, patch_size=PATCH),
        TrainingConfig(
            epochs=EPOCHS, batch_size=1, patch_size=PATCH, lr=2e-3, validate_every=2, validation_ddim_steps=2,
            compile=compile_setting,
        ),
        evaluation=EVALUATION,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fold_data(tmp_path_factory.mktemp("cohort"), (36, 40, 36), PATCH)


def run(data, compile_setting):
    """The fold's reports, and at each the number of graphs dynamo had compiled so far."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    reports, graphs = [], []

    def report(epoch_report, checkpoint):
        reports.append(epoch_report)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_fold(fold_config(compile_setting), data, torch.device("cpu"), report=report, compile_backend="aot_eager")
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    return result, reports, graphs


# Slow: the three checks below share two whole 4-epoch folds, one traced and compiled by dynamo (about 10 s of CPU
# on a quiet 2-core machine, 15-20 s under load); the unit tier keeps the compile decision and the DDP check.
FOLDS = pytest.mark.slow


@pytest.fixture(scope="module")
def eager(data):
    return run(data, False)


@pytest.fixture(scope="module")
def compiled(data):
    return run(data, True)


def test_auto_compiles_on_cuda_only():
    assert compile_wanted("auto", torch.device("cuda")) and not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted(True, torch.device("cpu")) and not compile_wanted(False, torch.device("cuda"))


@FOLDS
def test_compiled_fold_gives_the_eager_folds_numbers(eager, compiled):
    (eager_result, eager_reports, _), (compiled_result, compiled_reports, _) = eager, compiled
    assert [r.epoch for r in compiled_reports] == [r.epoch for r in eager_reports] == list(range(1, EPOCHS + 1))
    for plain, fast in zip(eager_reports, compiled_reports):
        assert fast.train_loss == pytest.approx(plain.train_loss, rel=1e-4)
        assert (fast.validation_dice is None) == (plain.validation_dice is None)
        if plain.validation_dice is not None:
            assert fast.validation_dice == pytest.approx(plain.validation_dice, abs=1e-3)
    for key, value in eager_result.metrics.items():
        assert compiled_result.metrics[key] == pytest.approx(value, abs=1e-3, nan_ok=True), key


@FOLDS
def test_compiles_once_for_training_and_once_for_sampling_never_per_validation(eager, compiled):
    _, reports, graphs = compiled
    # Epoch 1 compiles the loss, epoch 2's validation the sampler; the second validation (epoch 4) and the final
    # evaluation compile nothing.
    assert graphs[0] > 0 and graphs[1] > graphs[0]
    assert graphs[1] == graphs[2] == graphs[3]
    assert reports[0].compile_seconds > 0 and reports[1].compile_seconds > 0
    assert reports[2].compile_seconds is None and reports[3].compile_seconds is None
    assert all(report.compile_seconds is None for report in eager[1])


@FOLDS
def test_compiled_fold_keeps_plain_state_dict_keys(eager, compiled):
    keys = list(compiled[0].net.state_dict())
    assert keys == list(eager[0].net.state_dict())
    assert not any("_orig_mod" in key for key in keys)


def ddp_gradients_eager_and_compiled() -> None:
    """Runs in a child process (`test_compiled_network_trains_inside_ddp_as_eager`): a one-worker gloo process
    group on 127.0.0.1, the DDP step eager and compiled; fails with an AssertionError if they differ."""
    import copy
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from msx.models.compilation import compile_for_training
    from msx.models.diffusion import diffusion_loss
    from msx.models.networks import build_network

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        net = build_network(NetworkConfig("basic-unet", image_channels=2, width=0.125, patch_size=PATCH)).train()
        image = torch.randn((1, 2, *PATCH))
        mask = (torch.rand((1, 1, *PATCH)) < 0.05).float()
        gradients = []
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for compiled in (False, True):
            module = copy.deepcopy(net)
            wrapped = DistributedDataParallel(module)
            if compiled:
                compile_for_training(module, "aot_eager")
            torch.manual_seed(1)
            diffusion_loss(wrapped, image, mask).backward()
            gradients.append([p.grad for p in module.parameters()])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
        for eager_gradient, compiled_gradient in zip(*gradients):
            torch.testing.assert_close(compiled_gradient, eager_gradient, rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


def distributed_threads() -> list[str]:
    """Names of this process's threads that torch.distributed's gloo backend and TCPStore start (Linux)."""
    return sorted(
        name
        for task in Path("/proc/self/task").iterdir()
        if (name := (task / "comm").read_text().strip()).startswith(("gloo", "pt_gloo", "pt_tcpstore"))
    )


@pytest.mark.integration  # starts a process of its own, with a gloo process group: not the unit tier's
def test_compiled_network_trains_inside_ddp_as_eager():
    """Compiled in place after DDP wrapped it, as run_fold does under Ray Train: one graph (DDP's own forward
    stays eager), and the DDP step's gradients equal the eager one's (one worker, gloo on 127.0.0.1).

    The process group lives in a child process, never in pytest's own: once a DDP module has been built on it,
    `destroy_process_group` does not free it (torch keeps it referenced from C++; gc cannot reach it), so its
    gloo and TCPStore threads (pt_gloo_runloop, gloo_tcp_loop, pt_tcpstore_uv) would run on until the end of the
    whole test session and through the interpreter's teardown. Native threads still running while the interpreter
    and the libraries' static objects are torn down are the suspected cause of issue 23 (`make test` died with a
    segmentation fault after its summary, which earlier runs did not): the crash was not reproduced outside CI,
    but of the threads seen left in pytest's process by the tests added since, these are the only new ones.
    """
    before = distributed_threads() if Path("/proc/self/task").is_dir() else None
    child = subprocess.run(
        [sys.executable, "-c", f"from {__name__} import ddp_gradients_eager_and_compiled as check; check()"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    if before is not None:
        assert distributed_threads() == before
