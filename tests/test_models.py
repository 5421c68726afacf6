import pytest
import torch

from distml.models import (
    ModelSpec,
    build_model,
    cnn_plan,
    count_parameters,
    describe,
    feature_shapes,
    iter_feature_outputs,
)


def test_vgg16_cifar_variant():
    spec = ModelSpec(arch="vgg16", num_classes=10)
    model = build_model(spec)
    names = [n for n, _ in model.features.named_children()]
    assert len([n for n in names if n.startswith("conv")]) == 13
    assert len([n for n in names if n.startswith("pool")]) == 5
    assert names[:3] == ["conv1_1", "conv1_2", "pool1"] and names[-1] == "pool5"
    # 14.7 M parameters: the CIFAR VGG16 (not torchvision's 134 M ImageNet head)
    assert 14.7e6 < count_parameters(model) < 14.8e6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_depth_8_is_resnet9():
    plan = cnn_plan(8, 1.0)
    assert [p.name for p in plan] == [
        "stem",
        "stage1",
        "pool1",
        "stage1_res1",
        "stage2",
        "pool2",
        "stage3",
        "pool3",
        "stage3_res1",
    ]
    model = build_model(ModelSpec(arch="cnn", num_classes=10))
    assert 6.5e6 < count_parameters(model) < 6.6e6  # ResNet-9 has 6.57 M
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 9, 12])
def test_cnn_depth_counts_conv_blocks(depth: int):
    model = build_model(ModelSpec(arch="cnn", num_classes=10, depth=depth, width=0.125))
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("norm", ["batch", "group", "layer", "instance", "none"])
def test_every_norm_builds_and_runs(norm: str):
    model = build_model(ModelSpec(arch="vgg16", num_classes=10, width=0.125, norm=norm))
    model.train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_taps_follow_the_feature_layers():
    spec = ModelSpec(arch="vgg16", num_classes=10, width=0.125)
    model = build_model(spec).eval()
    shapes = feature_shapes(spec)
    with torch.no_grad():
        for name, out in iter_feature_outputs(model, torch.zeros(1, 3, 32, 32)):
            assert out.shape[1:] == (shapes[name].channels, shapes[name].size, shapes[name].size)


def test_spec_describes_cuts_and_channel_overrides():
    spec = ModelSpec(
        arch="vgg16",
        num_classes=10,
        width=0.25,
        num_feature_layers=11,
        channels={"conv4_1": 7},
        head_hidden=(32,),
    )
    model = build_model(spec)
    names = [n for n, _ in model.features.named_children()]
    assert names[-1] == "conv4_1" and len(names) == 11
    assert model.features.conv4_1.conv.out_channels == 7
    assert model.head.fc1.in_features == 7 * 4 * 4  # the flattened 7 x 4 x 4 map
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("arch", ["cnn", "vgg16"])
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "leaky_relu"])
def test_pool_and_activation_build_the_named_layers(arch: str, pool: str, activation: str):
    spec = ModelSpec(
        arch=arch,
        num_classes=10,
        width=0.125,
        depth=4,
        pool=pool,
        activation=activation,
        head_hidden=(16,),
    )
    model = build_model(spec)
    kinds = {type(m) for m in model.modules()}
    wanted_act = {
        "relu": torch.nn.ReLU,
        "gelu": torch.nn.GELU,
        "silu": torch.nn.SiLU,
        "leaky_relu": torch.nn.LeakyReLU,
    }[activation]
    wanted_pool = torch.nn.AvgPool2d if pool == "avg" else torch.nn.MaxPool2d
    other_pool = torch.nn.MaxPool2d if pool == "avg" else torch.nn.AvgPool2d
    assert wanted_act in kinds and wanted_pool in kinds and other_pool not in kinds
    assert all(type(m) is wanted_act for n, m in model.named_modules() if n.endswith("act"))
    assert isinstance(model.head.act1, wanted_act)
    if arch == "cnn":
        assert model.head.pool.pool == pool  # GlobalPool: max or mean over the whole map
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pool_and_activation_keep_the_weights_and_change_the_outputs():
    classic = build_model(ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=4)).eval()
    options = {"pool": "avg", "activation": "silu"}
    spec = ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=4, **options)
    other = build_model(spec).eval()
    other.load_state_dict(classic.state_dict(), strict=True)  # same tensor names and shapes
    assert describe(spec).startswith("cnn (silu, avg pool) [")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(classic(x), other(x))


def test_specs_written_before_pool_and_activation_read_as_max_and_relu():
    old = '{"arch": "vgg16", "num_classes": 10, "width": 0.125, "norm": "batch"}'
    spec = ModelSpec.model_validate_json(old)
    assert (spec.pool, spec.activation) == ("max", "relu")
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    model = build_model(spec)
    assert isinstance(model.features.pool1, torch.nn.MaxPool2d)
    assert isinstance(model.features.conv1_1.act, torch.nn.ReLU)


def test_global_pool_equals_the_adaptive_pools_it_replaces():
    # GlobalPool exists because nn.AdaptiveMax/AvgPool2d have no deterministic CUDA backward;
    # it must compute exactly what they compute, so older checkpoints behave the same
    from distml.models import GlobalPool

    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    assert torch.equal(GlobalPool("max")(x), torch.nn.AdaptiveMaxPool2d(1)(x))
    torch.testing.assert_close(GlobalPool("avg")(x), torch.nn.AdaptiveAvgPool2d(1)(x))
    grad = torch.autograd.grad(GlobalPool("max")(x).sum(), x)[0]
    assert grad.sum().item() == 4 * 6  # one unit of gradient per map, at its maximum
