import math
import threading

import pytest
import torch
from torch import nn

from msx.models.networks.conditioning import TimestepEmbedding, add_stage_conditioning, stage_conditioning


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


def hooked_linear() -> nn.Linear:
    layer = nn.Linear(2, 2)
    layer.register_forward_hook(add_stage_conditioning)
    return layer


def test_hook_adds_the_conditioning_set_for_its_module_only_while_active():
    layer, x = hooked_linear(), torch.randn(3, 2)
    plain = layer.forward(x)  # .forward bypasses hooks
    with stage_conditioning({layer: torch.full((3, 2), 5.0)}):
        torch.testing.assert_close(layer(x), plain + 5)
    with pytest.raises(RuntimeError, match="no stage conditioning"):
        layer(x)
    with stage_conditioning({hooked_linear(): torch.ones(3, 2)}), pytest.raises(RuntimeError):
        layer(x)  # conditioning for another module is not this one's


def test_nested_conditioning_restores_the_outer_values():
    layer, x = hooked_linear(), torch.zeros(1, 2)
    plain = layer.forward(x)
    with stage_conditioning({layer: torch.ones(1, 2)}):
        with stage_conditioning({layer: torch.full((1, 2), 7.0)}):
            torch.testing.assert_close(layer(x), plain + 7)
        torch.testing.assert_close(layer(x), plain + 1)


def test_threads_do_not_see_each_others_conditioning():
    layer, x = hooked_linear(), torch.zeros(1, 2)
    plain = layer.forward(x)
    inside, release = threading.Event(), threading.Event()
    seen_by_other_thread = []

    def other():
        with stage_conditioning({layer: torch.full((1, 2), 3.0)}):
            inside.set()
            release.wait(5)
            seen_by_other_thread.append(layer(x))

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(5)
    with stage_conditioning({layer: torch.full((1, 2), 2.0)}):
        release.set()
        mine = layer(x)
    thread.join(5)
    torch.testing.assert_close(mine, plain + 2)
    torch.testing.assert_close(seen_by_other_thread[0], plain + 3)
