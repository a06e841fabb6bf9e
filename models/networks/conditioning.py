"""Time embedding, and MONAI networks run with per-stage conditioning added to their down-path stages.

Each `*_forward(network, x, stage_additions)` below is the forward of one MONAI network class, written out on
that network's own submodules in the order its `forward` runs them, with `stage_additions[i]` added to the
output of down-path stage i (the modules `Backbone.stages` names). They are written by hand because MONAI's
networks take no extra forward arguments; the conditioning used to reach them through forward hooks reading a
context variable, which `torch.compile` cannot trace (a graph break at every stage). As plain arguments the
conditioning traces with the rest: the whole network is one graph. The network objects stay MONAI's, so their
state dicts are unchanged. Written against MONAI 1.6.1: tests/models/networks/test_conditioning.py checks each
against MONAI's own forward (with the additions added by hooks, and with zero additions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNETR, AttentionUnet, BasicUNet, SegResNet, SwinUNETR
from monai.networks.nets.basic_unet import UpCat
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

# The ViT hidden states UNETR.forward turns into skip connections (for encoder2, encoder3 and encoder4).
UNETR_SKIP_LAYERS = (3, 6, 9)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of integer diffusion time steps followed by a two-layer SiLU MLP (as in DDPM)."""

    def __init__(self, hidden_dim: int, frequency_dim: int = 128) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        # The trailing SiLU is the nonlinearity the reference applies before each per-stage projection.
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU()
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(get_timestep_embedding(timesteps, self.frequency_dim))


def basic_unet_forward(network: BasicUNet, x: torch.Tensor, stage_additions: Sequence[torch.Tensor]) -> torch.Tensor:
    """BasicUNet.forward; stage outputs: conv_0, down_1 .. down_4."""
    x0 = network.conv_0(x) + stage_additions[0]
    x1 = network.down_1(x0) + stage_additions[1]
    x2 = network.down_2(x1) + stage_additions[2]
    x3 = network.down_3(x2) + stage_additions[3]
    x4 = network.down_4(x3) + stage_additions[4]
    u4 = _up_concatenate(network.upcat_4, x4, x3)
    u3 = _up_concatenate(network.upcat_3, u4, x2)
    u2 = _up_concatenate(network.upcat_2, u3, x1)
    u1 = _up_concatenate(network.upcat_1, u2, x0)
    return network.final_conv(u1)


def _up_concatenate(upcat: UpCat, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """UpCat.forward with a skip, without its `torch.jit.isinstance` check (dynamo refuses to trace it).

    UpCat pads the upsampled map where a side was odd before pooling; the sides here are multiples of 16, so
    it never does.
    """
    return upcat.convs(torch.cat([skip, upcat.upsample(x)], dim=1))


def segresnet_forward(network: SegResNet, x: torch.Tensor, stage_additions: Sequence[torch.Tensor]) -> torch.Tensor:
    """SegResNet.forward (encode, then MONAI's own decode); stage outputs: down_layers.0 .. 3."""
    x = network.convInit(x)
    if network.dropout_prob is not None:
        x = network.dropout(x)
    skips = []
    for down, addition in zip(network.down_layers, stage_additions, strict=True):
        x = down(x) + addition
        skips.append(x)
    return network.decode(x, skips[::-1])


def attention_unet_forward(
    network: AttentionUnet, x: torch.Tensor, stage_additions: Sequence[torch.Tensor]
) -> torch.Tensor:
    """AttentionUnet.forward; stage outputs: the head, then each level's strided ConvBlock, top to bottom."""
    head, top_layer, reduce_channels = network.model
    return reduce_channels(_attention_layer(top_layer, head(x) + stage_additions[0], stage_additions[1:]))


def _attention_layer(layer: nn.Module, x: torch.Tensor, stage_additions: Sequence[torch.Tensor]) -> torch.Tensor:
    """AttentionLayer.forward, recursing into the next level's AttentionLayer."""
    if isinstance(layer.submodule, nn.Sequential):  # this level's ConvBlock, then the level below
        block, lower_layer = layer.submodule
        lower = _attention_layer(lower_layer, block(x) + stage_additions[0], stage_additions[1:])
    else:  # the bottom level: its ConvBlock alone
        lower = layer.submodule(x) + stage_additions[0]
    from_lower = layer.upconv(lower)
    attention = layer.attention(g=from_lower, x=x)
    return layer.merge(torch.cat((attention, from_lower), dim=1))


def swin_unetr_forward(network: SwinUNETR, x: torch.Tensor, stage_additions: Sequence[torch.Tensor]) -> torch.Tensor:
    """SwinUNETR.forward without its input-size check (NumPy; DiffusionSegmentationNet checks the sides).

    Stage outputs: encoder1, encoder2, encoder3, encoder4, encoder10.
    """
    hidden = network.swinViT(x, network.normalize)
    enc0 = network.encoder1(x) + stage_additions[0]
    enc1 = network.encoder2(hidden[0]) + stage_additions[1]
    enc2 = network.encoder3(hidden[1]) + stage_additions[2]
    enc3 = network.encoder4(hidden[2]) + stage_additions[3]
    dec4 = network.encoder10(hidden[4]) + stage_additions[4]
    dec3 = network.decoder5(dec4, hidden[3])
    dec2 = network.decoder4(dec3, enc3)
    dec1 = network.decoder3(dec2, enc2)
    dec0 = network.decoder2(dec1, enc1)
    return network.out(network.decoder1(dec0, enc0))


def unetr_forward(network: UNETR, x: torch.Tensor, stage_additions: Sequence[torch.Tensor]) -> torch.Tensor:
    """UNETR.forward; stage outputs: encoder1 .. encoder4."""
    last, hidden = network.vit(x)
    enc1 = network.encoder1(x) + stage_additions[0]
    skip2, skip3, skip4 = (network.proj_feat(hidden[layer]) for layer in UNETR_SKIP_LAYERS)
    enc2 = network.encoder2(skip2) + stage_additions[1]
    enc3 = network.encoder3(skip3) + stage_additions[2]
    enc4 = network.encoder4(skip4) + stage_additions[3]
    dec3 = network.decoder5(network.proj_feat(last), enc4)
    dec2 = network.decoder4(dec3, enc3)
    dec1 = network.decoder3(dec2, enc2)
    return network.out(network.decoder2(dec1, enc1))
