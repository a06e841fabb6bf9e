"""The paper's U-Net ("unet") and its multiencoder: structure, conditioning by arguments, explicit sizes.

That it computes what the reference code computes is test_fidelity.py's (the reference's own numbers).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msx.models.checkpoint import load_checkpoint, save_checkpoint
from msx.models.networks import NetworkConfig, build_network
from msx.models.networks.encoders import ModalitySumEncoder
from msx.models.networks.mssegdiff_unet import (
    MSSegDiffUNetDenoiser,
    SqueezeAttention,
    TimeConditionedTwoConv,
    ddpm_sinusoid,
)

SIDE = 32  # the smallest side: four poolings and the last squeeze-attention block's own leave one voxel
FEATURES = (8, 8, 16, 16, 32, 8)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inputs(batch: int = 2, channels: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, channels, SIDE, SIDE, SIDE), generator=generator)
    noisy = torch.randn((batch, 1, SIDE, SIDE, SIDE), generator=generator)
    return image, noisy, torch.randint(0, 1000, (batch,), generator=generator)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(backbone="unet", image_channels=3, features=FEATURES)).eval()
    # Freshly initialised batch norms (running mean 0, variance 1, bias 0) leave about half the ReLUs of a
    # squeeze-attention block dead, and at the bottom (one voxel) whole blocks can output zero, hiding what
    # feeds them; statistics like trained ones keep every path alive.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm3d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, 0.2, 0.4)
            nn.init.uniform_(module.running_mean, -0.1, 0.1)
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    return net


def test_the_ddpm_sinusoid_puts_sines_first_with_frequencies_over_half_minus_one():
    t = torch.tensor([0, 1, 999])
    half = 64
    frequencies = torch.tensor([math.exp(-math.log(10000) * k / (half - 1)) for k in range(half)])
    angles = t.double()[:, None] * frequencies.double()[None]
    expected = torch.cat([angles.sin(), angles.cos()], dim=1).float()
    torch.testing.assert_close(ddpm_sinusoid(t, 128), expected, rtol=0, atol=1e-4)
    assert ddpm_sinusoid(t, 128)[0].tolist() == [0.0] * half + [1.0] * half


def test_squeeze_attention_is_pooled_attention_times_features_plus_attention():
    torch.manual_seed(0)
    block = SqueezeAttention(4).eval()
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        y = F.interpolate(block.attention(F.avg_pool3d(x, 2)), scale_factor=2.0, mode="nearest")
        torch.testing.assert_close(block(x), y * block.features(x) + y, rtol=0, atol=0)
    # [3x3x3 conv, batch norm, ReLU] twice in each branch.
    for branch in (block.features, block.attention):
        assert [type(layer.conv).__name__ for layer in branch] == ["Conv3d", "Conv3d"]
        assert [type(layer.adn.N).__name__ for layer in branch] == ["BatchNorm3d", "BatchNorm3d"]


def test_time_enters_every_two_convolution_block_decoder_included(net):
    blocks = [name for name, module in net.denoiser.named_modules() if isinstance(module, TimeConditionedTwoConv)]
    assert blocks == [
        "conv_0", "down_1.convs", "down_2.convs", "down_3.convs", "down_4.convs",
        "upcat_4.convs", "upcat_3.convs", "upcat_2.convs", "upcat_1.convs",
    ]
    image, noisy, t = inputs(batch=1)  # eval mode: one sample shows each path as well as two
    with torch.no_grad():
        reference = net(image, noisy, t)
        for name in blocks:
            projection = net.denoiser.get_submodule(name).time_projection
            saved = projection.bias.clone()
            projection.bias.add_(0.5)
            try:
                # Each squeeze-attention block damps what passes through it about tenfold at this initialisation:
                # any change of the output shows the path.
                assert not torch.equal(net(image, noisy, t), reference), name
            finally:
                projection.bias.copy_(saved)


def test_each_encoder_stage_reaches_the_denoiser(net):
    image, noisy, t = inputs(batch=1)
    with torch.no_grad():
        features = net.encode(image)
        reference = net.denoise(image, noisy, t, features)
        for stage in range(5):
            changed = [f.clone() for f in features]
            changed[stage] += 1.0
            assert not torch.equal(net.denoise(image, noisy, t, changed), reference), stage
        torch.testing.assert_close(net(image, noisy, t), reference, rtol=0, atol=0)


def test_eval_mode_treats_each_sample_on_its_own(net):
    image, noisy, t = inputs()
    with torch.no_grad():
        together = net(image, noisy, t)
        alone = torch.cat([net(image[i : i + 1], noisy[i : i + 1], t[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_in_training():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(backbone="unet", width=0.125)).train()
    net(*inputs()).square().mean().backward()  # batch norm in training needs 2 samples at the deepest pooling
    for name, parameter in net.named_parameters():
        assert (
            parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
        ), name


def test_width_scales_the_reference_features_and_features_can_be_given():
    assert build_network(NetworkConfig(backbone="unet", width=0.125)).denoiser.features == (8, 8, 16, 32, 64, 8)
    assert isinstance(build_network(NetworkConfig(backbone="unet", features=FEATURES)).denoiser, MSSegDiffUNetDenoiser)
    with pytest.raises(ValueError, match="six positive integers"):
        NetworkConfig(backbone="unet", features=(8, 8, 16))
    with pytest.raises(
        ValueError, match="segresnet is sized by width only; explicit features suit: multiencoder, unet"
    ):
        NetworkConfig(backbone="segresnet", features=FEATURES)
    assert NetworkConfig(backbone="unet", features=[8, 8, 16, 16, 32, 8]).features == FEATURES


def test_checkpoint_records_explicit_features(net, tmp_path):
    directory = save_checkpoint(tmp_path / "model", net, {"fold": 1})
    record = json.loads((directory / "network.json").read_text())["network"]
    assert record == {"backbone": "unet", "image_channels": 3, "width": 1.0, "features": list(FEATURES)}
    loaded, _ = load_checkpoint(directory)
    image, noisy, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(image, noisy, t), net(image, noisy, t), rtol=0, atol=0)


def test_rejects_sides_that_are_not_multiples_of_32(net):
    image, noisy, t = inputs()
    with pytest.raises(ValueError, match="multiple of 32"):
        net(image[..., :16], noisy[..., :16], t)


def test_multiencoder_shares_one_encoder_across_modalities():
    nets = {c: build_network(NetworkConfig(backbone="multiencoder", image_channels=c, width=0.125)) for c in (1, 3, 4)}
    assert len({parameter_count(n.encoder) for n in nets.values()}) == 1
    # Only the denoiser's first convolution grows with the modalities (27 weights per extra input channel and
    # output channel): the encoder is one 1-channel encoder whatever the number of modalities.
    first = nets[1].denoiser.conv_0.conv_0.conv.out_channels
    assert parameter_count(nets[4]) - parameter_count(nets[1]) == 3 * 27 * first
    encoder = nets[3].encoder
    assert isinstance(encoder, ModalitySumEncoder)
    assert encoder.shared.stages[0][0].conv_0.conv.in_channels == 1


def test_multiencoder_sums_the_shared_encoder_over_modalities_and_each_modality_counts():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(backbone="multiencoder", image_channels=3, width=0.125)).eval()
    image, noisy, t = inputs(batch=1)
    with torch.no_grad():
        features = net.encoder(image)
        per_modality = [net.encoder.shared(image[:, c : c + 1]) for c in range(3)]
        for stage, feature in enumerate(features):
            # Batched and one-by-one convolutions may take different kernels: equal up to float rounding.
            torch.testing.assert_close(feature, sum(f[stage] for f in per_modality), rtol=1e-4, atol=1e-4)
        reference = net(image, noisy, t)
        for c in range(3):
            changed = image.clone()
            changed[:, c] += 0.5 * torch.randn_like(changed[:, c])
            assert not torch.allclose(net(changed, noisy, t), reference), c
