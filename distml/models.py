"""The two architectures, built from a ``ModelSpec`` that is stored in every checkpoint.

A model is ``Classifier(features, head)``. ``features`` is an ``nn.Sequential`` of named
layers (conv blocks, pools, residual units) that the SI code taps one by one; ``head`` turns
the last feature map into logits. A spec can describe a compressed network too: a cut after
the first ``num_feature_layers`` layers and per-layer channel counts (``channels``), so
``distml eval x.safetensors`` rebuilds any checkpoint without other flags.

- ``cnn``: the ResNet-9 family of David Page's DAWNBench entry ("How to train your ResNet",
  Myrtle.ai 2018; 94% CIFAR-10 test accuracy in 24 epochs). ``depth`` counts conv blocks;
  8 is ResNet-9 exactly (see ``cnn_plan``).
- ``vgg16``: the CIFAR variant (13 conv3x3+norm+ReLU, 5 max-pools, classifier from the
  flattened 512x1x1 map), as in kuangliu/pytorch-cifar; not torchvision's ImageNet head.

Both take ``pool`` (max or avg: every 2x2 downsampling, and the cnn head's global pool) and
``activation`` (after every conv block and every hidden classifier layer). Neither has
weights, so they change no tensor name or shape; specs written before they existed read
as the defaults (max, relu), which is what those networks were.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from distml.choices import Activation, Norm, Pool

if TYPE_CHECKING:  # the settings model is only a type here: models stays below config
    from distml.config import ModelSettings

VGG16_LAYOUT: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)
CNN_STAGE_WIDTHS = (128, 256, 512)
CNN_STEM_WIDTH = 64
CNN_LOGIT_SCALE = 0.125  # Page's ResNet-9 scales logits down; it steadies the early epochs


class ModelSpec(BaseModel):
    """Everything needed to rebuild a network's shapes (weights come from the checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["cnn", "vgg16"]
    num_classes: int = Field(ge=2)
    in_channels: int = Field(3, ge=1)
    image_size: int = Field(32, ge=4)
    width: float = Field(1.0, gt=0)
    depth: int = Field(8, ge=1)
    norm: Norm = "batch"
    pool: Pool = "max"
    activation: Activation = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    head_hidden: tuple[int, ...] = ()
    num_feature_layers: int | None = Field(None, ge=1, description="cut: keep the first k layers")
    channels: dict[str, int] = Field(default_factory=dict, description="out-channel overrides")
    kept_channels: dict[str, list[int]] = Field(
        default_factory=dict, description="original indices of the channels kept, per layer"
    )

    @classmethod
    def from_settings(
        cls, settings: ModelSettings, num_classes: int, in_channels: int, image_size: int
    ) -> ModelSpec:
        """The spec of a fresh model of ``distml train``'s model settings for a dataset."""
        return cls(
            arch=settings.arch,
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            width=settings.width,
            depth=settings.depth,
            norm=settings.norm,
            pool=settings.pool,
            activation=settings.activation,
            dropout=settings.dropout,
            head_hidden=tuple(settings.head_hidden),
        )


@dataclass(frozen=True)
class LayerPlan:
    """One named layer of the feature extractor."""

    name: str
    kind: Literal["conv", "pool", "residual"]
    out_channels: int = 0  # conv: output channels; residual: channels of its inner blocks
    inner: tuple[str, ...] = field(default=())  # residual: names of its inner conv blocks


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def vgg16_plan(width: float) -> list[LayerPlan]:
    plan: list[LayerPlan] = []
    stage, index = 1, 1
    for item in VGG16_LAYOUT:
        if item == "M":
            plan.append(LayerPlan(f"pool{stage}", "pool"))
            stage, index = stage + 1, 1
        else:
            plan.append(LayerPlan(f"conv{stage}_{index}", "conv", scaled(int(item), width)))
            index += 1
    return plan


def cnn_plan(depth: int, width: float) -> list[LayerPlan]:
    """ResNet-9 family. Block 1 is the stem; blocks 2-4 open stages 1-3 (conv + max-pool);
    the remaining blocks form residual units of two blocks, given to stages in the order
    1, 3, 2, 1, 3, 2, ... (an odd remainder makes a one-block unit). depth=8 is ResNet-9."""
    plan = [LayerPlan("stem", "conv", scaled(CNN_STEM_WIDTH, width))]
    stages = min(depth - 1, len(CNN_STAGE_WIDTHS))
    leftover = depth - 1 - stages
    units_per_stage = {s: [] for s in range(1, stages + 1)}
    order = [s for s in (1, 3, 2) if s <= stages]
    turn = 0
    while leftover > 0:
        size = min(2, leftover)
        units_per_stage[order[turn % len(order)]].append(size)
        leftover -= size
        turn += 1
    for s in range(1, stages + 1):
        channels = scaled(CNN_STAGE_WIDTHS[s - 1], width)
        plan.append(LayerPlan(f"stage{s}", "conv", channels))
        plan.append(LayerPlan(f"pool{s}", "pool"))
        for u, size in enumerate(units_per_stage[s], start=1):
            inner = tuple(f"conv{i}" for i in range(1, size + 1))
            plan.append(LayerPlan(f"stage{s}_res{u}", "residual", channels, inner))
    return plan


def feature_plan(spec: ModelSpec) -> list[LayerPlan]:
    """The spec's feature layers, after its cut and channel overrides."""
    base = vgg16_plan(spec.width) if spec.arch == "vgg16" else cnn_plan(spec.depth, spec.width)
    if spec.num_feature_layers is not None:
        base = base[: spec.num_feature_layers]
    return [
        LayerPlan(p.name, p.kind, spec.channels.get(p.name, p.out_channels), p.inner)
        if p.kind == "conv"
        else p
        for p in base
    ]


def full_layer_names(spec: ModelSpec) -> list[str]:
    """Names of every feature layer of the uncut architecture."""
    uncut = spec.model_copy(update={"num_feature_layers": None})
    return [p.name for p in feature_plan(uncut)]


# ----------------------------------------------------------------------------- modules


def make_norm(norm: Norm, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 32), channels)
    if norm == "layer":  # LayerNorm over (C, H, W), the usual form for conv nets
        return nn.GroupNorm(1, channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def make_activation(activation: Activation) -> nn.Module:
    if activation == "gelu":
        return nn.GELU()
    if activation == "silu":
        return nn.SiLU(inplace=True)
    if activation == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    return nn.ReLU(inplace=True)


def make_pool(pool: Pool) -> nn.Module:
    """The 2x2, stride-2 downsampling between stages."""
    return nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2)


class GlobalPool(nn.Module):
    """Max or mean over the whole feature map, (N, C, H, W) -> (N, C, 1, 1). A plain
    reduction rather than nn.AdaptiveMax/AvgPool2d: their CUDA backward is nondeterministic
    (atomic adds), which would make ``--deterministic`` refuse every cnn on a GPU."""

    def __init__(self, pool: Pool):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            return x.mean(dim=(2, 3), keepdim=True)
        return x.amax(dim=(2, 3), keepdim=True)

    def extra_repr(self) -> str:
        return self.pool


def make_global_pool(pool: Pool) -> nn.Module:
    return GlobalPool(pool)


class ConvBlock(nn.Sequential):
    """conv3x3 -> norm -> activation."""

    def __init__(self, in_channels: int, out_channels: int, spec: ModelSpec):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=spec.norm == "none"),
                norm=make_norm(spec.norm, out_channels),
                act=make_activation(spec.activation),
            )
        )


class Residual(nn.Module):
    """x + blocks(x): the residual unit of ResNet-9."""

    def __init__(self, channels: int, inner: tuple[str, ...], spec: ModelSpec):
        super().__init__()
        self.blocks = nn.Sequential(
            OrderedDict((name, ConvBlock(channels, channels, spec)) for name in inner)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Classifier(nn.Module):
    """features (named layers) -> head (logits)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class FeatureShape:
    channels: int
    size: int  # spatial side after the layer


def feature_shapes(spec: ModelSpec) -> dict[str, FeatureShape]:
    """Output shape of each feature layer (square inputs, 'same' convs, 2x2 pools)."""
    channels, size = spec.in_channels, spec.image_size
    shapes: dict[str, FeatureShape] = {}
    for layer in feature_plan(spec):
        if layer.kind == "conv":
            channels = layer.out_channels
        elif layer.kind == "pool":
            size //= 2
            if size < 1:
                raise ValueError(
                    f"input {spec.image_size}x{spec.image_size} is too small for layer "
                    f"{layer.name}: every pool halves the image"
                )
        shapes[layer.name] = FeatureShape(channels, size)
    return shapes


def build_features(spec: ModelSpec) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = spec.in_channels
    for layer in feature_plan(spec):
        if layer.kind == "conv":
            layers[layer.name] = ConvBlock(channels, layer.out_channels, spec)
            channels = layer.out_channels
        elif layer.kind == "pool":
            layers[layer.name] = make_pool(spec.pool)
        else:
            if layer.out_channels != channels:
                raise ValueError(f"residual unit {layer.name} needs {layer.out_channels} inputs")
            layers[layer.name] = Residual(channels, layer.inner, spec)
    return nn.Sequential(layers)


def head_input_size(spec: ModelSpec) -> int:
    last = list(feature_shapes(spec).values())[-1]
    return last.channels if spec.arch == "cnn" else last.channels * last.size * last.size


def build_head(spec: ModelSpec) -> nn.Sequential:
    """cnn: global pool -> linear -> x0.125 (ResNet-9); vgg16: flatten -> MLP. The vgg16
    head reads exactly the flattened features that the SI study measures."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.arch == "cnn":
        layers["pool"] = make_global_pool(spec.pool)
    layers["flatten"] = nn.Flatten()
    size = head_input_size(spec)
    for i, hidden in enumerate(spec.head_hidden, start=1):
        layers[f"drop{i}"] = nn.Dropout(spec.dropout)
        layers[f"fc{i}"] = nn.Linear(size, hidden)
        layers[f"act{i}"] = make_activation(spec.activation)
        size = hidden
    layers["drop"] = nn.Dropout(spec.dropout)
    layers["fc"] = nn.Linear(size, spec.num_classes)
    if spec.arch == "cnn":
        layers["scale"] = Scale(CNN_LOGIT_SCALE)
    return nn.Sequential(layers)


def build_model(spec: ModelSpec) -> Classifier:
    return Classifier(build_features(spec), build_head(spec))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def iter_feature_outputs(model: Classifier, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Run the feature extractor layer by layer, yielding each named layer's output."""
    for name, layer in model.features.named_children():
        x = layer(x)
        yield name, x


def describe(spec: ModelSpec) -> str:
    """A one-line architecture summary for logs and summaries."""
    parts = []
    for layer in feature_plan(spec):
        if layer.kind == "conv":
            parts.append(f"{layer.name}:{layer.out_channels}")
        elif layer.kind == "pool":
            parts.append("M")
        else:
            parts.append(f"res{len(layer.inner)}x{layer.out_channels}")
    head = [str(h) for h in spec.head_hidden] + [str(spec.num_classes)]
    # only what differs from the classic networks, so their one-liners stay as they were
    options = [spec.activation] * (spec.activation != "relu") + ["avg pool"] * (spec.pool == "avg")
    arch = f"{spec.arch} ({', '.join(options)})" if options else spec.arch
    return f"{arch} [{' '.join(parts)}] -> head {head_input_size(spec)}->{'->'.join(head)}"
