"""Every backbone traces into one graph (training loss, forward, sampling's denoise) and compiles to the same numbers.

The training step is the loss function compiled (dynamo traces forward and loss as one graph; AOTAutograd derives
the backward graph from it) and `loss.backward()` on its result, as a compiled training loop runs it.
Backend "aot_eager" keeps these tests fast; it runs the same traced forward and backward graphs Inductor would
compile (benchmarks/compile_graphs.py times Inductor).
"""

import copy

import pytest
import torch

from msx.models.diffusion import diffusion_loss, x0_loss
from msx.models.networks import BACKBONES, NetworkConfig, build_network

# backbone -> (width, input size): the smallest each takes in training mode (test_more_backbones.py explains
# SwinUNETR's and UNETR's).
CASES = {
    "attention-unet": (0.125, (32, 32, 32)),
    "basic-unet": (0.125, (32, 32, 32)),
    "multiencoder": (0.125, (32, 32, 32)),
    "segresnet": (0.125, (32, 32, 32)),
    "swinunetr": (0.25, (64, 32, 32)),
    "unet": (0.125, (32, 32, 32)),
    "unetr": (0.05, (32, 32, 32)),
}
IMAGE_CHANNELS = 2
BATCH = 2  # batch norm in training mode needs two samples where the maps are one voxel


def test_every_registered_backbone_is_covered():
    assert set(CASES) == set(BACKBONES.names())


@pytest.fixture(autouse=True)
def one_thread_and_fresh_dynamo():
    """One intra-op thread (tiny networks on a shared CPU, see test_more_backbones.py); no cached compilations."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def network(backbone: str) -> torch.nn.Module:
    width, size = CASES[backbone]
    torch.manual_seed(0)
    config = NetworkConfig(backbone=backbone, image_channels=IMAGE_CHANNELS, width=width, patch_size=size)
    return build_network(config).train()


def batch(backbone: str):
    size = CASES[backbone][1]
    generator = torch.Generator().manual_seed(1)
    image = torch.randn((BATCH, IMAGE_CHANNELS, *size), generator=generator)
    mask = (torch.rand((BATCH, 1, *size), generator=generator) < 0.1).float()
    noisy_mask = torch.randn((BATCH, 1, *size), generator=generator)
    return image, mask, noisy_mask, torch.tensor([3, 700])


def assert_one_graph(explanation) -> None:
    reasons = [str(b.reason)[:300] for b in explanation.break_reasons]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), reasons


# Tracing and compiling cost seconds to minutes per family on a shared 2-core CPU. The unit tier checks the
# cheaper families; the slow tier (CI) runs every check for every family.
FAST_TRACE_CHECKS = {"basic-unet", "multiencoder", "segresnet", "unet"}
FAST_COMPILE_CHECKS = {"basic-unet"}


def tiered(fast: set[str]) -> list:
    return [b if b in fast else pytest.param(b, marks=pytest.mark.slow) for b in sorted(CASES)]


@pytest.mark.parametrize("backbone", tiered(FAST_TRACE_CHECKS))
def test_training_loss_traces_into_one_graph(backbone):
    # The loss as the engine computes it: the network's forward (encoder and denoiser), the time steps and noise
    # drawn inside, and the x0 loss. A break anywhere in the forward would show here too.
    net = network(backbone)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in net.modules())
    image, mask, _, _ = batch(backbone)
    assert_one_graph(torch._dynamo.explain(diffusion_loss)(net, image, mask))


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(CASES))
def test_forward_and_sampling_denoise_trace_into_one_graph(backbone):
    net = network(backbone).eval()
    image, _, noisy_mask, t = batch(backbone)
    assert_one_graph(torch._dynamo.explain(net)(image, noisy_mask, t))
    # Sampling's call: the encoder's features computed once, then the denoiser at every step.
    with torch.no_grad():
        features = net.encode(image)
    assert_one_graph(torch._dynamo.explain(net.denoise)(image, noisy_mask, t, features))


def forward_and_loss(net, image, noisy_mask, t, mask):
    logits = net(image, noisy_mask, t)
    return logits, x0_loss(logits, mask)


@pytest.mark.parametrize("backbone", tiered(FAST_COMPILE_CHECKS))
def test_compiled_training_step_equals_eager(backbone):
    eager_net = network(backbone)
    compiled_net = copy.deepcopy(eager_net)
    image, mask, noisy_mask, t = batch(backbone)

    logits, loss = forward_and_loss(eager_net, image, noisy_mask, t, mask)
    loss.backward()
    compiled_step = torch.compile(forward_and_loss, backend="aot_eager", fullgraph=True)
    compiled_logits, compiled_loss = compiled_step(compiled_net, image, noisy_mask, t, mask)
    compiled_loss.backward()

    torch.testing.assert_close(compiled_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, eager), compiled in zip(eager_net.named_parameters(), compiled_net.parameters()):
        if eager.grad is None:  # UNETR's never-run cross-attention norms (frozen)
            assert compiled.grad is None, name
            continue
        torch.testing.assert_close(compiled.grad, eager.grad, rtol=1e-3, atol=1e-6, msg=name)
