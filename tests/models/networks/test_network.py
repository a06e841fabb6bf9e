import copy
import math
import pickle

import pytest
import torch
from torch import nn

from msx.models.networks import BACKBONES, DiffusionSegmentationNet, NetworkConfig, build_network

SIDE = 32  # the smallest cube the U-Net takes in training mode (instance norm needs 2^3 voxels at the bottom)


# Two families conditioned by stage additions; the paper's U-Net, conditioned by arguments, is
# test_mssegdiff_unet.py's, and test_conditioning.py checks every family's conditioned forward against MONAI's.
@pytest.fixture(scope="module", params=["basic-unet", "segresnet"])
def net(request) -> DiffusionSegmentationNet:
    torch.manual_seed(0)
    return build_network(NetworkConfig(backbone=request.param, image_channels=3, width=0.125))


def inputs(batch: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((batch, 3, SIDE, SIDE, SIDE), generator=generator)
    noisy_mask = torch.randn((batch, 1, SIDE, SIDE, SIDE), generator=generator)
    return image, noisy_mask, torch.randint(0, 1000, (batch,), generator=generator)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def straightforward_forward(net: DiffusionSegmentationNet, image, noisy_mask, t) -> torch.Tensor:
    """The method written out by hand on the same modules."""
    time = net.time_embedding.mlp(sinusoid(t, 128))
    additions, x = [], image
    for stage, project in zip(net.encoder.stages, net.time_projections, strict=True):
        x = stage(x)
        additions.append(x + project(time)[:, :, None, None, None])
    den, h = net.denoiser, torch.cat([image, noisy_mask], dim=1)
    if net.config.backbone == "basic-unet":
        x0 = den.conv_0.forward(h) + additions[0]
        x1 = den.down_1.forward(x0) + additions[1]
        x2 = den.down_2.forward(x1) + additions[2]
        x3 = den.down_3.forward(x2) + additions[3]
        x4 = den.down_4.forward(x3) + additions[4]
        u = den.upcat_1(den.upcat_2(den.upcat_3(den.upcat_4(x4, x3), x2), x1), x0)
        return den.final_conv(u)
    x, skips = den.convInit(h), []
    for layer, addition in zip(den.down_layers, additions, strict=True):
        x = layer.forward(x) + addition
        skips.append(x)
    return den.decode(x, skips[::-1])


def test_output_shape(net):
    with torch.no_grad():
        assert net(*inputs(batch=2)).shape == (2, 1, SIDE, SIDE, SIDE)


def test_matches_the_method_written_out_by_hand(net):
    image, noisy_mask, t = inputs(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(net(image, noisy_mask, t), straightforward_forward(net, image, noisy_mask, t))


def test_output_depends_on_image_and_time(net):
    image, noisy_mask, t = inputs()
    with torch.no_grad():
        reference = net(image, noisy_mask, t)
        assert not torch.allclose(net(image + 0.5 * torch.randn_like(image), noisy_mask, t), reference)
        assert not torch.allclose(net(image, noisy_mask, (t + 500) % 1000), reference)
        # Through the encoder alone: silencing one encoder stage changes the prediction.
        deepest_stage = net.encoder.stages[-1]
        handle = deepest_stage.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
        try:
            assert not torch.allclose(net(image, noisy_mask, t), reference)
        finally:
            handle.remove()


def test_gradients_reach_every_parameter(net):
    net.zero_grad()
    net(*inputs()).square().mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    for part in (net.encoder, net.denoiser, net.time_embedding, net.time_projections):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    net.zero_grad()


def test_rejects_wrong_inputs(net):
    image, noisy_mask, t = inputs()
    with pytest.raises(ValueError, match="multiple of"):
        net(image[..., :20], noisy_mask[..., :20], t)
    with pytest.raises(ValueError, match="image"):
        net(image[:, :2], noisy_mask, t)
    with pytest.raises(ValueError, match="noisy_mask"):
        net(image, noisy_mask[:, :, 1:], t)
    with pytest.raises(ValueError, match="timesteps"):
        net(image, noisy_mask, t[0])


def test_pickle_and_deepcopy_keep_the_function(net):
    args = inputs()
    with torch.no_grad():
        expected = net(*args)
        for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
            assert clone.config == net.config
            torch.testing.assert_close(clone(*args), expected)
            # The clone conditions with its own modules: changing the clone leaves the original alone.
            nn.init.zeros_(clone.time_projections[0].weight)
            nn.init.zeros_(clone.time_projections[0].bias)
            assert not torch.allclose(clone(*args), expected)
        torch.testing.assert_close(net(*args), expected)


def test_a_forward_nested_inside_another_does_not_disturb_it(net):
    image, noisy_mask, t = inputs()
    with torch.no_grad():
        expected = net(image, noisy_mask, t)
        other = inputs(seed=2)
        inner_results = []

        def run_another_forward(module, args, output):
            if handle.id in module._forward_hooks:  # once: the inner forward passes here too
                handle.remove()
                inner_results.append(net(*other))

        first_stage = BACKBONES.get(net.config.backbone).conditioned_modules()[0]
        handle = net.denoiser.get_submodule(first_stage).register_forward_hook(run_another_forward)
        try:
            nested = net(image, noisy_mask, t)
        finally:
            handle.remove()
        assert len(inner_results) == 1
        torch.testing.assert_close(nested, expected)
        torch.testing.assert_close(inner_results[0], net(*other))


def test_distributed_data_parallel_uses_every_parameter(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for backbone in ("unet", "basic-unet"):
            model = build_network(NetworkConfig(backbone=backbone, width=0.125))
            ddp = nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: strict
            image, noisy_mask, t = inputs(batch=2)  # batch norm in training needs two samples at the bottom
            for _ in range(2):  # an unused parameter only fails on the second iteration
                ddp(image, noisy_mask, t).mean().backward()
    finally:
        torch.distributed.destroy_process_group()
