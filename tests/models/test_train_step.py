"""One training step, the unit that train_epoch repeats and benchmarks/train_step.py times."""

import pytest
import torch

from msx.models.engine import train_epoch, train_step, training_autocast_dtype, training_optimizer
from msx.models.networks import NetworkConfig, build_network


def tiny_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn((2, 1, 32, 32, 32), generator=generator),
        "label": (torch.rand((2, 1, 32, 32, 32), generator=generator) < 0.1).float(),
    }


def test_train_step_updates_the_weights_and_returns_the_detached_loss():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(backbone="unet", image_channels=1, width=0.125)).train()
    device = torch.device("cpu")
    optimizer = training_optimizer(net.parameters(), lr=1e-3, weight_decay=0.0, device=device)
    before = [p.detach().clone() for p in net.parameters()]
    batch = tiny_batch(1)
    loss = train_step(net, batch["image"], batch["label"], optimizer, autocast_dtype=training_autocast_dtype(device))
    assert loss.shape == () and not loss.requires_grad and torch.isfinite(loss)
    assert any(not torch.equal(old, new) for old, new in zip(before, net.parameters()))


def test_train_epoch_averages_its_steps_losses():
    batches = [tiny_batch(2), tiny_batch(3)]
    device = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        net = build_network(NetworkConfig(backbone="unet", image_channels=1, width=0.125)).train()
        return net, training_optimizer(net.parameters(), lr=1e-3, weight_decay=0.0, device=device)

    net, optimizer = fresh()
    schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    torch.manual_seed(4)
    mean = train_epoch(net, batches, optimizer, schedule, device)

    net, optimizer = fresh()
    torch.manual_seed(4)
    losses = [train_step(net, b["image"], b["label"], optimizer) for b in batches]
    torch.testing.assert_close(mean, torch.stack(losses).mean())


def test_precision_fp32_never_autocasts_auto_only_on_a_gpu_bf16_everywhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (training_autocast_dtype(cpu, "fp32"), training_autocast_dtype(cuda, "fp32")) == (None, None)
    assert (training_autocast_dtype(cpu), training_autocast_dtype(cuda)) == (None, torch.bfloat16)  # "auto"
    assert (training_autocast_dtype(cpu, "bf16"), training_autocast_dtype(cuda, "bf16")) == (torch.bfloat16,) * 2
    with pytest.raises(ValueError, match="precision: unknown name 'fp16'; valid names: auto, fp32, bf16"):
        training_autocast_dtype(cpu, "fp16")


def test_optimizer_is_plain_adamw_unless_fused_is_asked_for_or_auto_on_a_gpu():
    net = torch.nn.Linear(2, 2)
    cpu = torch.device("cpu")
    for kind, fused in (("auto", None), ("adamw", None), ("adamw-fused", True)):
        optimizer = training_optimizer(net.parameters(), 1e-3, 0.0, cpu, kind)
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is fused, kind
    with pytest.raises(ValueError, match="optimizer: unknown name 'sgd'; valid names: auto, adamw, adamw-fused"):
        training_optimizer(net.parameters(), 1e-3, 0.0, cpu, "sgd")
