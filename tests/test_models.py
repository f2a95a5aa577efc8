import json

import pytest
import torch
from torch import nn

from ign_fast.models import (
    DCGAN28,
    DCGAN64,
    MLP,
    MODEL_NAMES,
    build_model,
    expected_input_shape,
    group_norm_groups,
    init_dcgan_weights,
)

from conftest import devices

# Narrow widths keep the CPU tests fast; the architecture is the same at any width.
SMALL = {"dcgan28": dict(latent_dim=16, width=8), "dcgan64": dict(latent_dim=16, width=8)}


@pytest.mark.parametrize("name", ["dcgan28", "dcgan64"])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_dcgan_output_has_input_shape_and_tanh_range(name, norm, batch, in_channels):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, norm=norm, **SMALL[name])
    x = torch.rand(batch, *expected_input_shape(model)) * 2 - 1
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            y = model(x)
        assert y.shape == x.shape
        assert y.min() >= -1 and y.max() <= 1


def test_dcgan_latent_is_1x1():
    model = DCGAN28(latent_dim=16, width=8)
    z = model.encode(torch.zeros(2, 1, 28, 28))
    assert z.shape == (2, 16, 1, 1)
    assert model.decode(z).shape == (2, 1, 28, 28)
    assert DCGAN64(latent_dim=16, width=8).encode(torch.zeros(2, 3, 64, 64)).shape == (2, 16, 1, 1)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_shape_and_unbounded_output(dim, batch):
    model = MLP(dim, hidden=32, depth=2)
    y = model(torch.randn(batch, dim))
    assert y.shape == (batch, dim)
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and linears[-1].out_features == dim


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    model = DCGAN28()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if m.weight.numel() > 1000:  # enough draws for a 10% check on the std
                assert abs(m.weight.std().item() - 0.02) < 0.002
            assert torch.all(m.bias == 0)
        if isinstance(m, nn.BatchNorm2d):
            assert abs(m.weight.mean().item() - 1) < 0.01 and m.weight.std().item() < 0.04
            assert torch.all(m.bias == 0)


def test_init_dcgan_weights_covers_linear_and_groupnorm():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(200, 200), nn.GroupNorm(4, 64))
    assert init_dcgan_weights(module) is module
    assert abs(module[0].weight.std().item() - 0.02) < 0.002 and torch.all(module[0].bias == 0)
    assert abs(module[1].weight.mean().item() - 1) < 0.02 and torch.all(module[1].bias == 0)


def test_group_norm_groups_divide_channels():
    assert group_norm_groups(128) == 32
    assert group_norm_groups(64) == 16
    assert group_norm_groups(24) == 6
    assert group_norm_groups(20) == 5
    assert group_norm_groups(3) == 1
    for c in range(1, 300):
        assert c % group_norm_groups(c) == 0


@pytest.mark.parametrize("name,kwargs", [
    ("dcgan28", dict(in_channels=1, latent_dim=16, width=8, norm="group")),
    ("dcgan64", dict(in_channels=3, latent_dim=16, width=8, norm="batch")),
    ("mlp", dict(dim=2, hidden=16, depth=2)),
])
def test_build_model_round_trip_through_json_config(name, kwargs):
    model = build_model(name, **kwargs).eval()
    config = json.loads(json.dumps(model.config))
    assert config["name"] == name
    rebuilt = build_model(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, *expected_input_shape(model)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert expected_input_shape(rebuilt) == expected_input_shape(model)


def test_expected_input_shape():
    assert expected_input_shape(DCGAN28(in_channels=1, width=8)) == (1, 28, 28)
    assert expected_input_shape(DCGAN64(in_channels=3, width=8)) == (3, 64, 64)
    assert expected_input_shape(MLP(5)) == (5,)
    with pytest.raises(TypeError, match="model"):
        expected_input_shape(nn.Linear(2, 2))


def test_bad_arguments_raise():
    assert set(MODEL_NAMES) == {"dcgan28", "dcgan64", "mlp", "unet"}
    with pytest.raises(ValueError, match="name must be one of"):
        build_model("resnet")
    with pytest.raises(ValueError, match="norm"):
        DCGAN28(norm="layer")
    with pytest.raises(ValueError, match="width"):
        DCGAN64(width=0)
    with pytest.raises(TypeError, match="latent_dim"):
        DCGAN28(latent_dim=16.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_model("mlp", dim=2, width=3)
    with pytest.raises(ValueError, match=r"expects input \[B, 1, 28, 28\]"):
        DCGAN28(width=8)(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects input \[B, 2\]"):
        MLP(2)(torch.zeros(2, 3))


@pytest.mark.parametrize("device", devices())
def test_models_run_on_device(device):
    for model in (DCGAN28(width=8, latent_dim=8), MLP(2, hidden=8, depth=1)):
        model = model.to(device)
        x = torch.zeros(2, *expected_input_shape(model), device=device)
        assert model(x).shape == x.shape


@pytest.mark.parametrize("channels, size, depth", [(1, 28, 3), (3, 32, 3), (3, 64, 4)])
def test_unet_maps_images_to_their_shape_in_the_tanh_range(channels, size, depth):
    from ign_fast.models import UNet, build_model, expected_input_shape

    model = UNet(channels, size, width=8, depth=depth)
    x = torch.rand(2, channels, size, size) * 2 - 1
    y = model(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert expected_input_shape(model) == (channels, size, size)
    assert isinstance(build_model(**model.config), UNet)
    y.square().mean().backward()  # every parameter reaches the output (the skips and the bottleneck)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unet_refuses_sizes_its_depth_cannot_halve():
    from ign_fast.models import UNet

    with pytest.raises(ValueError, match=r"image_size must be divisible by 2\^\(depth-1\) = 8 for depth 4, got 28"):
        UNet(1, 28, depth=4)
    with pytest.raises(ValueError, match=r"unet expects input \[B, 1, 28, 28\]"):
        UNet(1, 28, width=8, depth=3)(torch.zeros(2, 1, 32, 32))
