"""The MSSegDiff U-Net: the paper's denoiser, as the public reference code builds it, from MONAI blocks.

The denoiser is a BasicUNet-shaped network (five down stages, four up stages, feature sizes given as six
integers like BasicUNet's: the reference uses 64, 64, 128, 256, 512, 64) with three additions:

- a time embedding: the DDPM sinusoid of t (128 wide), Linear -> SiLU -> Linear (512 wide), projected into
  EVERY two-convolution block, decoder included, and added between the block's two convolutions;
- the image encoder's stage outputs, added after the first block and after each down stage;
- a squeeze-attention block after each down stage 1..4 and after each up stage.

Every conditioning input reaches the network as a forward argument (no hooks, no context variables), so
`torch.compile` traces it as one graph. The image encoder is MONAI's BasicUNet down path (`backbones.py`).
Checked against the reference's own outputs by `msx fidelity check` (`models/fidelity.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.networks.blocks.activation import Swish
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

# The reference's sizes: the sinusoid of t is 128 wide, the embedding 512 (hard-coded there, whatever the width).
FREQUENCY_DIM = 128
TIME_EMBEDDING_DIM = 512
ACTIVATION = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
NORM = ("instance", {"affine": True})
# Four 2x max-poolings, and the squeeze-attention block after the fourth pools once more.
SPATIAL_MULTIPLE = 32


class SinusoidTimeEmbedding(nn.Module):
    """DDPM's time embedding: sinusoid of t, then Linear -> SiLU -> Linear, and the SiLU every projection takes.

    The reference applies SiLU to the embedding inside each block before projecting it; that SiLU is the
    same in every block, so it runs once here and the blocks project its output.
    """

    def __init__(self, frequency_dim: int = FREQUENCY_DIM, embedding_dim: int = TIME_EMBEDDING_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, embedding_dim), Swish(), nn.Linear(embedding_dim, embedding_dim), Swish()
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(ddpm_sinusoid(timesteps, self.frequency_dim))


def ddpm_sinusoid(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """The DDPM (fairseq) sinusoid: [sin(t f_k), cos(t f_k)] with f_k = 10000^(-k / (dim/2 - 1)).

    MONAI's `get_timestep_embedding` divides by dim/2 instead and puts cosines first; with the maximal period
    raised to 10000^(half / (half - 1)) its frequencies are DDPM's (bit for bit, t = 0..999), and the halves
    swap back.
    """
    half = dim // 2
    embedding = get_timestep_embedding(timesteps, 2 * half, max_period=10000 ** (half / (half - 1)))
    return torch.cat([embedding[:, half:], embedding[:, :half]], dim=1)


class TimeConditionedTwoConv(nn.Module):
    """Two 3x3x3 convolutions (instance norm, LeakyReLU 0.1); the time embedding's projection added between."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = TIME_EMBEDDING_DIM) -> None:
        super().__init__()
        self.conv_0 = Convolution(3, in_channels, out_channels, act=ACTIVATION, norm=NORM, padding=1)
        self.time_projection = nn.Linear(time_dim, out_channels)
        self.conv_1 = Convolution(3, out_channels, out_channels, act=ACTIVATION, norm=NORM, padding=1)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.conv_1(self.conv_0(x) + self.time_projection(time)[:, :, None, None, None])


class TimeConditionedDown(nn.Module):
    """2x max-pooling, then a time-conditioned two-convolution block."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = TIME_EMBEDDING_DIM) -> None:
        super().__init__()
        self.convs = TimeConditionedTwoConv(in_channels, out_channels, time_dim)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.convs(F.max_pool3d(x, kernel_size=2), time)


class TimeConditionedUpCat(nn.Module):
    """2x transposed-convolution upsampling, concatenation after the skip, a time-conditioned two-conv block."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, halves: bool = True,
        time_dim: int = TIME_EMBEDDING_DIM,
    ) -> None:
        super().__init__()
        up_channels = in_channels // 2 if halves else in_channels
        self.upsample = UpSample(3, in_channels, up_channels, 2, mode="deconv")
        self.convs = TimeConditionedTwoConv(skip_channels + up_channels, out_channels, time_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.upsample(x)], dim=1), time)


def _batch_norm_relu_pair(channels: int) -> nn.Sequential:
    return nn.Sequential(*(Convolution(3, channels, channels, act="relu", norm="batch") for _ in range(2)))


class SqueezeAttention(nn.Module):
    """The reference's squeeze-attention block: y * x' + y, shape and channels kept.

    x' = two (3x3x3 conv, batch norm, ReLU) on x; y = the same on x average-pooled 2x, upsampled back
    (nearest). In eval mode batch norm uses its running statistics, as in the reference.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = _batch_norm_relu_pair(channels)
        self.attention = _batch_norm_relu_pair(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = _nearest_upsample_2x(self.attention(F.avg_pool3d(x, kernel_size=2)))
        return attention * self.features(x) + attention


def _nearest_upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """Each voxel repeated 2 x 2 x 2: F.interpolate(x, scale_factor=2, mode="nearest"), value for value.

    Written as a broadcast because Inductor (PyTorch 2.13) fails to generate CPU code for interpolate's backward
    from a one-voxel map, which the last squeeze-attention block of a 32^3 patch has; the broadcast's backward is
    a plain sum, and compiles.
    """
    n, c, d, h, w = x.shape
    return x[:, :, :, None, :, None, :, None].expand(n, c, d, 2, h, 2, w, 2).reshape(n, c, 2 * d, 2 * h, 2 * w)


class MSSegDiffUNetDenoiser(nn.Module):
    """forward(concat(image, x_t), t, encoder stage features) -> x0 logits, all conditioning as arguments.

    `features` are six sizes as BasicUNet takes them: the five down stages', then the last up stage's.
    The encoder's five stage outputs must have features[0..4] channels at full, 1/2, .., 1/16 resolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, features: Sequence[int], time_dim: int = TIME_EMBEDDING_DIM
    ) -> None:
        super().__init__()
        if len(features) != 6:
            raise ValueError(f"features must be six sizes (five down stages, the last up stage), got {features}")
        f = tuple(features)
        self.features = f
        self.time_embedding = SinusoidTimeEmbedding(FREQUENCY_DIM, time_dim)
        self.conv_0 = TimeConditionedTwoConv(in_channels, f[0], time_dim)
        self.down_1 = TimeConditionedDown(f[0], f[1], time_dim)
        self.down_2 = TimeConditionedDown(f[1], f[2], time_dim)
        self.down_3 = TimeConditionedDown(f[2], f[3], time_dim)
        self.down_4 = TimeConditionedDown(f[3], f[4], time_dim)
        self.down_attention = nn.ModuleList(SqueezeAttention(c) for c in f[1:5])
        self.upcat_4 = TimeConditionedUpCat(f[4], f[3], f[3], time_dim=time_dim)
        self.upcat_3 = TimeConditionedUpCat(f[3], f[2], f[2], time_dim=time_dim)
        self.upcat_2 = TimeConditionedUpCat(f[2], f[1], f[1], time_dim=time_dim)
        self.upcat_1 = TimeConditionedUpCat(f[1], f[0], f[5], halves=False, time_dim=time_dim)
        # After upcat_4 .. upcat_1; the reference sizes its last block by features[0], which must then equal
        # features[5] (as in every configuration it ships).
        self.up_attention = nn.ModuleList(SqueezeAttention(c) for c in (f[3], f[2], f[1], f[5]))
        self.final_conv = nn.Conv3d(f[5], out_channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, stage_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        time = self.time_embedding(timesteps)
        x0 = self.conv_0(x, time) + stage_features[0]
        skips = [x0]
        x = x0
        for down, attention, feature in zip(
            (self.down_1, self.down_2, self.down_3, self.down_4), self.down_attention, stage_features[1:], strict=True
        ):
            x = attention(down(x, time) + feature)
            skips.append(x)
        for upcat, attention, skip in zip(
            (self.upcat_4, self.upcat_3, self.upcat_2, self.upcat_1),
            self.up_attention,
            reversed(skips[:-1]),
            strict=True,
        ):
            x = attention(upcat(x, skip, time))
        return self.final_conv(x)
