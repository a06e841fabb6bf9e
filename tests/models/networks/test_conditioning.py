import math

import pytest
import torch
from torch import nn

from msx.models.networks import BACKBONES
from msx.models.networks.conditioning import TimestepEmbedding


def sinusoid(t: int, dim: int) -> list[float]:
    half = dim // 2
    freqs = [math.exp(-math.log(10000) * k / half) for k in range(half)]
    return [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]


def test_time_embedding_is_an_mlp_of_the_sinusoidal_encoding():
    embedding = TimestepEmbedding(hidden_dim=16, frequency_dim=8)
    t = torch.tensor([0, 1, 999])
    expected_encoding = torch.tensor([sinusoid(int(s), 8) for s in t], dtype=torch.float32)
    assert expected_encoding[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    first, _, second, _ = embedding.mlp
    expected = nn.functional.silu(second(nn.functional.silu(first(expected_encoding))))
    torch.testing.assert_close(embedding(t), expected)
    assert not torch.allclose(embedding(t)[1], embedding(t)[2])


# The MONAI families conditioned by stage additions: (width, input size), tiny (test_backbones.py).
ADDITIONS_CASES = {
    "attention-unet": (0.125, (32, 32, 32)),
    "basic-unet": (0.125, (32, 32, 32)),
    "segresnet": (0.125, (32, 32, 32)),
    "swinunetr": (0.25, (64, 32, 32)),
    "unetr": (0.05, (32, 32, 32)),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks on one intra-op thread: faster on a shared CPU (see test_backbones.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_family_conditioned_by_additions_is_covered():
    assert set(ADDITIONS_CASES) == {n for n in BACKBONES.names() if BACKBONES.get(n).conditioning == "additions"}


def monai_forward_with_hooks(network: nn.Module, names, x: torch.Tensor, additions) -> torch.Tensor:
    """MONAI's own forward, the additions added to the named modules' outputs by forward hooks."""
    handles = [
        network.get_submodule(name).register_forward_hook(lambda module, args, out, a=a: out + a)
        for name, a in zip(names, additions, strict=True)
    ]
    try:
        return network(x)
    finally:
        for handle in handles:
            handle.remove()


def stage_shapes(network: nn.Module, names, x: torch.Tensor) -> list[torch.Size]:
    seen = {}
    handles = [
        network.get_submodule(name).register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out.shape))
        for name in names
    ]
    try:
        network(x)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[name] for name in names]


@pytest.mark.parametrize("backbone", sorted(ADDITIONS_CASES))
def test_conditioned_forward_is_monais_forward_with_the_additions_at_the_stage_outputs(backbone):
    # Pins the MONAI version these forwards were written against: a MONAI whose forward runs its modules
    # differently fails here.
    width, size = ADDITIONS_CASES[backbone]
    family = BACKBONES.get(backbone)
    torch.manual_seed(0)
    network = family.build(2, 1, width, size).eval()
    x = torch.randn(1, 2, *size)
    names = family.conditioned_modules()
    with torch.no_grad():
        shapes = stage_shapes(network, names, x)
        zeros = [torch.zeros(shape) for shape in shapes]
        torch.testing.assert_close(family.conditioned_forward(network, x, zeros), network(x), rtol=0, atol=0)
        additions = [torch.randn(shape) for shape in shapes]
        torch.testing.assert_close(
            family.conditioned_forward(network, x, additions),
            monai_forward_with_hooks(network, names, x, additions),
            rtol=0,
            atol=0,
        )
