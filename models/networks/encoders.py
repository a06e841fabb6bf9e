"""Encoders for backbones whose down path is not a chain of submodules.

Each keeps MONAI's own modules, taken from a freshly built network of the family, and runs the encoder
part of that network's forward; the rest of the network (its decoder) is dropped, so every parameter
an encoder holds is used (DistributedDataParallel needs no `find_unused_parameters`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from .conditioning import UNETR_SKIP_LAYERS


class SwinUNETREncoder(nn.Module):
    """SwinUNETR's down path: the Swin transformer and the five encoder blocks that read the image or it.

    Returns, as `SwinUNETR.forward` computes them, the outputs of encoder1, encoder2, encoder3, encoder4
    and encoder10: the maps the denoiser's same-named blocks produce.
    """

    def __init__(self, network: SwinUNETR) -> None:
        super().__init__()
        self.normalize = network.normalize
        self.swinViT = network.swinViT
        self.encoder1 = network.encoder1
        self.encoder2 = network.encoder2
        self.encoder3 = network.encoder3
        self.encoder4 = network.encoder4
        self.encoder10 = network.encoder10

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        hidden = self.swinViT(image, self.normalize)
        return [
            self.encoder1(image),
            self.encoder2(hidden[0]),
            self.encoder3(hidden[1]),
            self.encoder4(hidden[2]),
            # hidden[3] feeds only SwinUNETR's decoder.
            self.encoder10(hidden[4]),
        ]


class UNETREncoder(nn.Module):
    """UNETR's down path: the ViT up to the last layer a skip reads (layer 9) and the four encoder blocks.

    Returns, as `UNETR.forward` computes them, the outputs of encoder1 (from the image) and encoder2,
    encoder3, encoder4 (from ViT layers 3, 6 and 9, as feature maps). The ViT's later layers and final norm
    feed only UNETR's decoder and are dropped.
    """

    def __init__(self, network: UNETR) -> None:
        super().__init__()
        vit = network.vit
        if hasattr(vit, "cls_token"):
            raise ValueError("UNETR's ViT has a class token; the encoder expects patch tokens only")
        self.patch_embedding = vit.patch_embedding
        self.blocks = nn.ModuleList(list(vit.blocks)[: UNETR_SKIP_LAYERS[-1] + 1])
        self.encoder1 = network.encoder1
        self.encoder2 = network.encoder2
        self.encoder3 = network.encoder3
        self.encoder4 = network.encoder4
        # What UNETR.proj_feat reads to turn a token sequence into a feature map.
        self.proj_view_shape = list(network.proj_view_shape)
        self.proj_axes = tuple(network.proj_axes)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embedding(image)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        skips = [UNETR.proj_feat(self, hidden[i]) for i in UNETR_SKIP_LAYERS]
        return [self.encoder1(image), self.encoder2(skips[0]), self.encoder3(skips[1]), self.encoder4(skips[2])]


class ModalitySumEncoder(nn.Module):
    """One single-channel encoder applied to every image channel on its own; stage features summed.

    The channels are folded into the batch, so the shared encoder runs once; this equals running it per
    channel for encoders whose normalisation is per sample (BasicUNet's instance norm).
    """

    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.shared = shared

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        batch, channels = image.shape[:2]
        features = self.shared(image.reshape(batch * channels, 1, *image.shape[2:]))
        return [f.reshape(batch, channels, *f.shape[1:]).sum(dim=1) for f in features]
