"""Ray Train with 2 CPU workers (gloo): DistributedDataParallel averages the workers' gradients."""

import tempfile

import numpy as np
import pytest
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from msx.models.diffusion import DiffusionConfig, diffusion_loss
from tests.helpers import tiny_network


def gradient_check(config):
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    local = tiny_network(image_channels=2)
    ddp = ray.train.torch.prepare_model(tiny_network(image_channels=2))
    ddp.module.load_state_dict(local.state_dict())

    # Each rank sees different data.
    data = torch.Generator().manual_seed(100 + rank)
    image = torch.randn(1, 2, 32, 32, 32, generator=data)
    mask = (torch.rand(1, 1, 32, 32, 32, generator=data) > 0.8).float()

    def loss_of(net):
        return diffusion_loss(net, image, mask, DiffusionConfig(), generator=torch.Generator().manual_seed(7 + rank))

    loss_of(local).backward()
    loss_of(ddp).backward()
    local_grad = torch.cat([p.grad.flatten() for p in local.parameters()])
    ddp_grad = torch.cat([p.grad.flatten() for p in ddp.module.parameters()])
    gathered = [torch.zeros_like(local_grad) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local_grad)
    expected = torch.stack(gathered).mean(0)
    # Ray Train V2 keeps the metrics that come with a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report(
            {
                "rank": rank,
                "max_error_vs_mean": float((ddp_grad - expected).abs().max()),
                "max_difference_between_ranks": float((gathered[0] - gathered[1]).abs().max()),
                "grad_scale": float(expected.abs().max()),
            },
            checkpoint=checkpoint,
        )


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_gloo_workers_average_gradients(local_ray, tmp_path):
    trainer = TorchTrainer(
        gradient_check,
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=ray.train.torch.TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    metrics = result.metrics
    # Ranks really disagreed locally, and the DDP gradient is their mean.
    assert metrics["max_difference_between_ranks"] > 1e-3 * metrics["grad_scale"]
    assert metrics["max_error_vs_mean"] < 1e-5 * max(1.0, metrics["grad_scale"])
    assert np.isfinite(metrics["grad_scale"]) and metrics["grad_scale"] > 0
