import pytest
import torch

from msx.models.networks import BACKBONES, NetworkConfig, build_network, spatial_multiple
from msx.models.networks.backbones import scale_channels
from msx.models.registry import UnknownNameError


def conv3(cin: int, cout: int) -> int:
    return 27 * cin * cout + cout  # 3x3x3 kernel + bias


def two_conv(cin: int, cout: int) -> int:
    return conv3(cin, cout) + 2 * cout + conv3(cout, cout) + 2 * cout  # each conv: affine instance norm


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("reference", "width", "expected"),
    [(64, 1.0, 64), (512, 1.0, 512), (64, 0.125, 8), (512, 0.125, 64), (64, 0.01, 8), (64, 0.3, 16), (100, 1.0, 96)],
)
def test_scale_channels_rounds_to_multiples_of_eight(reference, width, expected):
    assert scale_channels(reference, width) == expected


def test_scale_channels_rejects_non_positive_width():
    with pytest.raises(ValueError, match="width"):
        scale_channels(64, 0.0)


def test_registered_backbones_and_spatial_multiples():
    assert {"unet", "basic-unet", "segresnet"} <= set(BACKBONES.names())
    assert spatial_multiple("unet") == 32  # four poolings, and the last squeeze-attention block pools once more
    assert spatial_multiple("basic-unet") == 16
    assert spatial_multiple("segresnet") == 8


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownNameError) as error:
        NetworkConfig(backbone="vnet")
    assert "'vnet'" in str(error.value)
    assert "segresnet" in str(error.value) and "unet" in str(error.value)
    with pytest.raises(UnknownNameError):
        spatial_multiple("vnet")


def test_unet_encoder_holds_only_the_down_path():
    net = build_network(NetworkConfig(backbone="unet", image_channels=3, width=0.125))
    features = (8, 8, 16, 32, 64)
    expected = two_conv(3, 8) + sum(two_conv(a, b) for a, b in zip(features, features[1:]))
    assert parameter_count(net.encoder) == expected
    assert [s.shape[1] for s in net.encoder(torch.zeros(1, 3, 32, 32, 32))] == list(features)


def test_segresnet_encoder_holds_only_the_down_path():
    net = build_network(NetworkConfig(backbone="segresnet", image_channels=2, width=0.125))

    def res_block(c):  # two (GroupNorm affine + bias-free 3x3x3 conv)
        return 2 * (2 * c + 27 * c * c)

    filters = (8, 16, 32, 64)
    blocks = (1, 2, 2, 4)
    expected = 27 * 2 * 8  # bias-free initial convolution
    expected += sum(n * res_block(c) for n, c in zip(blocks, filters))
    expected += sum(27 * c_in * c_out for c_in, c_out in zip(filters, filters[1:]))  # stride-2 convs
    assert parameter_count(net.encoder) == expected
    shapes = [tuple(s.shape[1:]) for s in net.encoder(torch.zeros(1, 2, 32, 32, 32))]
    assert shapes == [(8, 32, 32, 32), (16, 16, 16, 16), (32, 8, 8, 8), (64, 4, 4, 4)]


def full_size_parameter_count(backbone: str) -> int:
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost
        return parameter_count(build_network(NetworkConfig(backbone=backbone, width=1.0)))


def test_unet_and_multiencoder_have_the_reference_sizes():
    # Encoder + denoiser of the reference's MSSegDiff and MSSegDiff+MultiEncoder at features 64, 64, 128, 256,
    # 512, 64, counted from the reference code itself: 85,736,577 and 85,733,121.
    assert full_size_parameter_count("unet") == 85_736_577
    assert full_size_parameter_count("multiencoder") == 85_733_121


def test_basic_unet_is_the_paper_unet_without_squeeze_attention_and_decoder_time():
    # The reference's 8 squeeze-attention blocks (after each down stage: 64, 128, 256, 512 channels; after
    # each up stage: 256, 128, 64, 64), each two blocks of two biased 3x3x3 convs + BatchNorm, are not in
    # MONAI's BasicUNet; nor are the time projections of the decoder's four blocks.
    def conv_block(c):
        return 2 * (conv3(c, c) + 2 * c)

    squeeze_attention = sum(2 * conv_block(c) for c in (64, 128, 256, 512, 256, 128, 64, 64))
    assert squeeze_attention == 47_351_040
    up_projections = sum(512 * c + c for c in (256, 128, 64, 64))
    basic = full_size_parameter_count("basic-unet")
    assert basic == 38_122_881
    assert basic + squeeze_attention + up_projections == full_size_parameter_count("unet")


def test_segresnet_size_is_close_to_the_reference():
    # The reference keeps a full SegResNet (decoder included, 4.8 M, never run) as its encoder and never
    # uses its time embedding's output; msx drops the encoder's decoder and adds 0.5 M of time projections.
    count = full_size_parameter_count("segresnet")
    assert abs(count - 150.7e6) / 150.7e6 < 0.04, count
