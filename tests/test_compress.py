"""Layer taps, `distml si`, `prune`, `select-features`: the keep rule, exact channel slicing,
compressed checkpoints accepted everywhere, head training, and bad input (exit 2)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_plot, last_json, run_cli, train_json, tree_snapshot
from safetensors.torch import load_file

from distml import compress
from distml.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from distml.compress import kept_prefix, plan_slice, slice_channels
from distml.data import make_synthetic, write_dataset_file
from distml.errors import DistmlError
from distml.models import (
    ModelSpec,
    build_model,
    count_parameters,
    iter_feature_outputs,
    vgg16_plan,
)
from distml.si import SelectionResult

# A tiny VGG16 on the synthetic set: ~3 s per epoch on one CPU core.
TINY_VGG = [
    "--model",
    "vgg16",
    "--width",
    "0.125",
    "--dataset",
    "synthetic",
    "--set",
    "data.synthetic_train_size=1000",
    "--set",
    "data.synthetic_test_size=200",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--scheduler",
    "cosine",
    "--label-smoothing",
    "0",
    "--device",
    "cpu",
    "--quiet",
]
CPU = ["--device", "cpu", "--quiet"]
VGG_LAYERS = 18  # 13 conv blocks + 5 pools


@pytest.fixture(scope="session")
def tiny_vgg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("vgg") / "run"
    return train_json(*TINY_VGG, "--epochs", "2", "--out", out)


@pytest.fixture
def vgg_ckpt(tiny_vgg, tmp_path: Path) -> Path:
    """A private copy of the tiny VGG16's best checkpoint (default outputs land beside it)."""
    path = tmp_path / "vgg.safetensors"
    shutil.copyfile(Path(tiny_vgg["run_dir"]) / "best.safetensors", path)
    return path


# ----------------------------------------------------------------------------- the keep rule


@pytest.mark.parametrize(
    ("curve", "tolerance", "kept"),
    [
        ([0.2, 0.5, 0.52, 0.51, 0.3], 0.0, 3),  # T = 0: up to the first maximum
        ([0.2, 0.5, 0.52, 0.51, 0.3], 0.05, 2),  # 0.52 raises 0.5 by less than 0.05
        ([0.2, 0.5, 0.52, 0.51, 0.3], 0.02, 2),  # exactly the tolerance: not "more than"
        ([0.2, 0.5, 0.52, 0.51, 0.3], 0.019, 3),
        ([0.2, 0.5, 0.52, 0.51, 0.3], 1.0, 1),
        ([0.5, 0.5, 0.5], 0.0, 1),  # equal values: the shortest prefix
        ([0.9, 0.5, 0.9, 0.8], 0.0, 1),  # the maximum comes first
        ([0.9, 0.5, 0.9, 0.8], 0.5, 1),
        ([0.3, 0.5, 0.7], 0.0, 3),  # the maximum comes last
        # index values are fractions of samples: 4/300 - 1/300 is 0.01 only up to rounding,
        # and a prefix exactly at max - T is kept
        ([1 / 300, 4 / 300], 0.01, 1),
        ([1 / 50, 4 / 50], 0.06, 1),
        ([1 / 50, 4 / 50 + 1e-6], 0.06, 2),  # a rise just above T is not cut
        # a slow climb of steps below the tolerance is kept: it rises 0.05 in all
        ([0.10, 0.105, 0.11, 0.115, 0.12, 0.125, 0.13, 0.135, 0.14, 0.145, 0.15], 0.01, 9),
    ],
)
def test_keep_rule(curve, tolerance, kept):
    assert kept_prefix(curve, tolerance) == kept
    # the library's selection result (select_features) keeps what the CLI keeps
    order = list(range(len(curve)))[::-1]
    result = SelectionResult.from_curve(order, curve, tolerance)
    assert (result.kept, result.selected) == (kept, sorted(order[:kept]))


@pytest.mark.parametrize(("curve", "tolerance"), [([], 0.01), ([0.5], -0.01), ([0.5], math.nan)])
def test_keep_rule_refuses_bad_input(curve, tolerance):
    with pytest.raises(DistmlError):
        kept_prefix(curve, tolerance)


# ----------------------------------------------------------------------------- slicing


def random_checkpoint(spec: ModelSpec, seed: int = 0) -> Checkpoint:
    """A model with non-trivial norm parameters and running statistics."""
    torch.manual_seed(seed)
    model = build_model(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.InstanceNorm2d):
            module.weight.data.normal_()
            module.bias.data.normal_()
            if module.running_mean is not None:
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    classes = [f"c{i}" for i in range(spec.num_classes)]
    return Checkpoint(spec=spec, state=model.state_dict(), classes=classes, normalization={})


def outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: out.clone() for name, out in iter_feature_outputs(model.eval(), x)}


@pytest.mark.parametrize(
    ("arch", "norm", "layer", "conv", "next_conv"),
    [
        ("vgg16", "batch", "conv2_1", "conv2_1", "conv2_2"),
        ("vgg16", "batch", "pool1", "conv1_2", "conv2_1"),  # a pool passes channels through
        ("vgg16", "instance", "conv4_3", "conv4_3", "conv5_1"),
        ("vgg16", "none", "pool5", "conv5_3", None),  # the last conv: only the head follows
        ("cnn", "batch", "stage1", "stage1", "stage2"),
    ],
)
def test_sliced_model_computes_the_kept_channels_exactly(arch, norm, layer, conv, next_conv):
    spec = ModelSpec(arch=arch, num_classes=10, width=0.125, depth=4, norm=norm)
    ckpt = random_checkpoint(spec)
    plan = plan_slice(spec, layer)
    assert (plan.conv, plan.next_conv) == (conv, next_conv)
    keep = list(range(0, plan.channels, 3))
    sliced, sliced_spec = slice_channels(ckpt, plan, keep, seed=0)
    assert sliced_spec.channels[conv] == len(keep) and sliced_spec.kept_channels[conv] == keep
    state = sliced.state_dict()
    assert state[f"features.{conv}.conv.weight"].shape[0] == len(keep)
    if next_conv:
        assert state[f"features.{next_conv}.conv.weight"].shape[1] == len(keep)
    assert count_parameters(sliced) < count_parameters(model_from_checkpoint(ckpt))

    x = torch.randn(3, 3, 32, 32)
    original, new = outputs(model_from_checkpoint(ckpt), x), outputs(sliced, x)
    names = list(original)
    # up to the sliced conv (inclusive) and its pools: the kept channels, exactly (a kernel
    # may sum in another order for another channel count, hence the 1e-6)
    for name in names[: names.index(conv) + 1]:
        expected = original[name][:, keep] if name == conv else original[name]
        torch.testing.assert_close(new[name], expected, rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(new[layer], original[layer][:, keep], rtol=1e-6, atol=1e-6)


def test_downstream_layers_read_the_sliced_inputs():
    """Silence the removed channels in the original (norm scale and shift 0: ReLU(0) = 0);
    then every later layer of the sliced model must match the original."""
    spec = ModelSpec(arch="vgg16", num_classes=10, width=0.125)
    ckpt = random_checkpoint(spec)
    plan = plan_slice(spec, "conv3_2")
    keep = [1, 2, 5, 8, 13, 21, 30]
    removed = [c for c in range(plan.channels) if c not in keep]
    state = dict(ckpt.state)
    for key in ("features.conv3_2.norm.weight", "features.conv3_2.norm.bias"):
        state[key] = state[key].clone()
        state[key][removed] = 0.0
    silenced = Checkpoint(spec=spec, state=state, classes=ckpt.classes, normalization={})
    sliced, _ = slice_channels(silenced, plan, keep, seed=0)
    x = torch.randn(3, 3, 32, 32)
    original, new = outputs(model_from_checkpoint(silenced), x), outputs(sliced, x)
    names = list(original)
    for name in names[names.index("conv3_3") :]:
        torch.testing.assert_close(new[name], original[name], rtol=1e-5, atol=1e-5, msg=name)


def test_slicing_twice_records_the_original_channel_indices():
    spec = ModelSpec(arch="vgg16", num_classes=10, width=0.125)
    ckpt = random_checkpoint(spec)
    once, once_spec = slice_channels(ckpt, plan_slice(spec, "conv2_2"), [1, 4, 6, 9, 12], 0)
    again = Checkpoint(
        spec=once_spec, state=once.state_dict(), classes=ckpt.classes, normalization={}
    )
    _, twice_spec = slice_channels(again, plan_slice(once_spec, "conv2_2"), [0, 3], 0)
    assert twice_spec.kept_channels["conv2_2"] == [1, 9]


NORM = (
    "this model uses {} norm, which normalises over groups of channels: removing channels "
    "would change the values of the kept ones. Channel selection needs batch, instance or no "
    "normalisation (train with --norm batch)."
)
RESIDUAL_FIX = (
    ". Select features of one of stem, stage2, pool2, stage3, pool3 (--layer), or cut the "
    "network before its residual units first (distml prune)."
)
FEEDS = (
    "stage1 feeds the residual unit stage1_res1, whose sum x + f(x) needs all of its input "
    "channels" + RESIDUAL_FIX
)
VGG_NAMES = (
    "conv1_1, conv1_2, pool1, conv2_1, conv2_2, pool2, conv3_1, conv3_2, conv3_3, pool3, "
    "conv4_1, conv4_2, conv4_3, pool4, conv5_1, conv5_2, conv5_3, pool5"
)


@pytest.mark.parametrize(
    ("spec", "layer", "message"),
    [
        (ModelSpec(arch="vgg16", num_classes=10, width=0.125, norm="group"), "conv2_1",
         NORM.format("group")),
        (ModelSpec(arch="vgg16", num_classes=10, width=0.125, norm="layer"), "conv2_1",
         NORM.format("layer")),
        (ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=5), "stage1", FEEDS),
        # a pool's channels are its conv's: the conv is named
        (ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=5), "pool1", FEEDS),
        (ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=5), "stage1_res1",
         "the channels of stage1_res1 are a residual sum x + f(x); removing some would change "
         "the kept ones" + RESIDUAL_FIX),
        (ModelSpec(arch="vgg16", num_classes=10, width=0.125), "conv9_9",
         f"layer 'conv9_9' does not exist in this model. Its feature layers are: {VGG_NAMES}. "
         "Pass one of them to --layer."),
        (ModelSpec(arch="vgg16", num_classes=10, width=0.125, num_feature_layers=4), "conv5_1",
         "layer 'conv5_1' does not exist in this model (it was cut away by distml prune). Its "
         "feature layers are: conv1_1, conv1_2, pool1, conv2_1. Pass one of them to --layer."),
    ],
)  # fmt: skip
def test_slicing_refuses_what_it_cannot_do_exactly(spec, layer, message):
    with pytest.raises(DistmlError) as err:
        plan_slice(spec, layer)
    assert str(err.value) == message


def test_the_layers_next_to_a_residual_unit_that_can_be_sliced():
    spec = ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=5)
    assert plan_slice(spec, "stem") == compress.SlicePlan("stem", "stem", "stage1", 8)
    assert plan_slice(spec, "stage2") == compress.SlicePlan("stage2", "stage2", "stage3", 32)
    assert plan_slice(spec, "pool3") == compress.SlicePlan("pool3", "stage3", None, 64)


def test_keeping_every_channel_keeps_the_trained_head():
    """Only a model whose feature width changed needs a new head: keeping all the channels
    gives the original network back, logits and all."""
    spec = ModelSpec(arch="vgg16", num_classes=10, width=0.125)
    ckpt = random_checkpoint(spec)
    plan = plan_slice(spec, "conv5_3")
    sliced, _ = slice_channels(ckpt, plan, list(range(plan.channels)), seed=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model_from_checkpoint(ckpt).eval()(x)
        torch.testing.assert_close(sliced.eval()(x), expected, rtol=1e-6, atol=1e-6)
    fewer, _ = slice_channels(ckpt, plan, list(range(plan.channels - 1)), seed=1)
    original_head = {k: v for k, v in ckpt.state.items() if k.startswith("head.")}
    new_head = {f"head.{k}": v for k, v in fewer.head.state_dict().items()}
    assert new_head.keys() == original_head.keys()
    assert not any(torch.equal(new_head[k], v) for k, v in original_head.items() if v.ndim > 1)


@pytest.mark.parametrize("keep", [[], [2, 1], [1, 1], [-1, 2], [0, 8], [0, 1, 8]], ids=str)
def test_slicing_refuses_a_bad_channel_list(keep):
    spec = ModelSpec(arch="vgg16", num_classes=10, width=0.125)
    plan = plan_slice(spec, "conv1_1")  # 8 channels
    with pytest.raises(ValueError) as err:
        slice_channels(random_checkpoint(spec), plan, keep, seed=0)
    assert str(err.value) == "keep must be ascending unique channels in [0, 8)"


# ----------------------------------------------------------------------------- distml si


def test_si_needs_only_the_checkpoint(vgg_ckpt: Path):
    result = last_json(run_cli("si", vgg_ckpt, "--json", "--quiet"))
    out = vgg_ckpt.parent / "vgg-si"
    assert Path(result["json"]) == out / "si.json"
    assert_plot(out / "si.png")
    assert result["samples"] == {"train": 90, "test": 20}  # 10% of 900 train, of 200 test
    assert len(result["layers"]) == VGG_LAYERS
    first = result["layers"][0]
    assert (first["name"], first["channels"], first["size"]) == ("conv1_1", 8, 32)
    for row in result["layers"]:
        for index in ("si", "center_si"):
            assert set(row[index]) == {"train", "test"}
            # a fraction of the sampled images: 90 train, 20 test
            for split, count in (("train", 90), ("test", 20)):
                value = row[index][split] * count
                assert value == pytest.approx(round(value), abs=1e-9), (row["name"], index)
    assert json.loads((out / "si.json").read_text())["layers"] == result["layers"]


def test_si_table_and_the_same_subset_every_time(vgg_ckpt: Path, tmp_path: Path):
    text = run_cli("si", vgg_ckpt, "--splits", "train", "--fraction", "0.2", *CPU).stdout
    assert "conv1_1" in text and "pool5" in text and "SI train" in text
    again = last_json(
        run_cli(
            "si",
            vgg_ckpt,
            "--splits",
            "train",
            "--fraction",
            "0.2",
            "--json",
            "--out",
            tmp_path / "again",
            *CPU,
        )
    )
    first = json.loads((vgg_ckpt.parent / "vgg-si" / "si.json").read_text())
    assert first["layers"] == again["layers"] and again["samples"] == {"train": 180}


# ----------------------------------------------------------------------------- prune


VGG_NAMES = [layer.name for layer in vgg16_plan(0.125)]
# a hand-made layer curve: 0.70 at conv4_1 is within 0.02 of the best (0.72): 11 layers kept
# fmt: off
HAND_CURVE = [0.30, 0.32, 0.35, 0.40, 0.44, 0.47, 0.52, 0.55, 0.60, 0.64,
              0.70, 0.715, 0.72, 0.705, 0.71, 0.69, 0.70, 0.71]
# fmt: on


@pytest.fixture
def hand_made_curve(monkeypatch) -> list[float]:
    curve = {name: {"si": value} for name, value in zip(VGG_NAMES, HAND_CURVE, strict=True)}
    monkeypatch.setattr(compress, "index_curve", lambda *args, **kwargs: curve)
    return HAND_CURVE


def test_prune_applies_the_rule_to_the_layer_curve(vgg_ckpt: Path, tmp_path, hand_made_curve):
    curve, names = hand_made_curve, VGG_NAMES
    # 0.70 at conv4_1 is within 0.02 of the best (0.72): keep 11 layers
    out = tmp_path / "pruned"
    result = last_json(
        run_cli("prune", vgg_ckpt, "--tolerance", "0.02", "--out", out, "--json", *CPU)
    )
    assert result["kept_layers"] == 11 and result["cut_after"] == "conv4_1"
    assert result["removed_layers"] == names[11:]
    assert result["curve"] == curve and result["head_rebuilt"]
    pruned = load_checkpoint(out / "pruned.safetensors")
    assert pruned.spec.num_feature_layers == 11
    assert pruned.extra["step"] == "prune" and pruned.extra["source"] == str(vgg_ckpt)
    assert pruned.extra["curve"] == curve and pruned.extra["tolerance"] == 0.02
    model = model_from_checkpoint(pruned)
    assert list(model.features._modules)[-1] == "conv4_1"
    assert model.head.fc.in_features == 64 * 4 * 4  # conv4_1's 64 x 4 x 4 map
    source = load_file(str(vgg_ckpt))
    for key, value in pruned.state.items():
        if key.startswith("features."):
            assert torch.equal(value, source[key]), key  # the kept layers are untouched
    p = result["parameters"]
    assert p["after"]["features"] < p["before"]["features"]
    assert p["after"]["total"] == count_parameters(model)
    assert (out / "prune.json").is_file()
    assert_plot(out / "prune.png")
    assert result["test_accuracy"] == {"before": None, "after": None}


def test_prune_with_head_training(vgg_ckpt: Path, tiny_vgg, tmp_path: Path):
    out, save = tmp_path / "p", tmp_path / "final.safetensors"
    result = last_json(
        run_cli(
            "prune",
            vgg_ckpt,
            "--fraction",
            "0.2",
            "--head-epochs",
            "1",
            "--out",
            out,
            "--save",
            save,
            "--json",
            *CPU,
        )
    )
    head = result["head_training"]
    # before: the source evaluated like `distml eval`, i.e. exactly the run's test accuracy
    assert result["test_accuracy"]["before"] == tiny_vgg["test_accuracy"]
    assert result["test_accuracy"]["after"] == head["test_accuracy_after"]
    summary = json.loads((Path(head["run_dir"]) / "summary.json").read_text())
    assert summary["test_accuracy"] == result["test_accuracy"]["after"]
    assert summary["trainable_parameters"] == result["parameters"]["after"]["head"]
    assert save.read_bytes() == Path(head["checkpoint"]).read_bytes()  # --save: final model
    pruned, trained = load_file(str(out / "pruned.safetensors")), load_file(str(save))
    for key in pruned:
        if key.startswith("features."):
            assert torch.equal(pruned[key], trained[key]), key  # frozen
    human = run_cli("prune", vgg_ckpt, "--fraction", "0.2", "--out", tmp_path / "h", *CPU).stdout
    assert "<- last kept layer" in human and "parameters" in human


# ----------------------------------------------------------------------------- select-features


def test_select_features_removes_channels(vgg_ckpt: Path, tmp_path: Path):
    out = tmp_path / "sel"
    result = last_json(
        run_cli(
            "select-features",
            vgg_ckpt,
            "--layer",
            "conv2_1",
            "--max-features",
            "6",
            "--tolerance",
            "0.02",
            "--fraction",
            "0.2",
            "--out",
            out,
            "--json",
            *CPU,
        )
    )
    sel = result["selection"]
    assert len(sel["curve"]) == 6 and len(sel["order"]) == 6
    assert sel["kept"] == kept_prefix(sel["curve"], 0.02)
    assert sel["selected"] == sorted(sel["order"][: sel["kept"]])
    kept = result["channels_after"]
    assert kept == sel["kept"] and result["channels_before"] == 16
    ckpt = load_checkpoint(out / "selected.safetensors")
    assert ckpt.spec.channels == {"conv2_1": kept}
    assert ckpt.spec.kept_channels == {"conv2_1": sel["selected"]}
    assert ckpt.state["features.conv2_1.conv.weight"].shape == (kept, 8, 3, 3)  # 8 inputs
    assert ckpt.state["features.conv2_1.norm.running_mean"].shape == (kept,)
    assert ckpt.state["features.conv2_2.conv.weight"].shape == (16, kept, 3, 3)
    source = load_file(str(vgg_ckpt))
    index = torch.tensor(sel["selected"])
    assert torch.equal(
        ckpt.state["features.conv2_1.conv.weight"], source["features.conv2_1.conv.weight"][index]
    )
    p = result["parameters"]
    assert p["after"]["total"] < p["before"]["total"]
    assert p["after"]["total"] == count_parameters(model_from_checkpoint(ckpt))
    assert_plot(out / "selection.png")
    saved = json.loads((out / "selection.json").read_text())
    assert saved["selection"] == sel and saved["step"] == "select-features"


def test_compressed_checkpoints_work_everywhere(vgg_ckpt: Path, tmp_path: Path, hand_made_curve):
    """prune (cut after conv4_1) -> select-features (default layer: the last kept) -> eval,
    si, train --init (frozen features or not)."""
    pruned = tmp_path / "pruned.safetensors"
    run_cli(
        "prune", vgg_ckpt, "--tolerance", "0.02", "--out", tmp_path / "p", "--save", pruned, *CPU
    )
    last = load_checkpoint(pruned).spec.num_feature_layers
    assert last == 11
    select = ["select-features", pruned, "--max-features", "8", "--out", tmp_path / "s"]
    result = last_json(run_cli(*select, "--fraction", "0.2", "--json", *CPU))
    names = [n for n, _ in build_model(load_checkpoint(pruned).spec).features.named_children()]
    assert result["layer"] == names[last - 1]
    selected = Path(result["checkpoint"])
    spec = load_checkpoint(selected).spec
    assert spec.num_feature_layers == last and spec.channels

    evaluated = last_json(run_cli("eval", selected, "--json", "--out", tmp_path / "e", *CPU))
    assert evaluated["count"] == 200
    measured = last_json(run_cli("si", selected, "--json", "--out", tmp_path / "si", *CPU))
    assert len(measured["layers"]) == last
    assert measured["layers"][-1]["channels"] == result["channels_after"]
    head = train_json(
        *TINY_VGG,
        "--epochs",
        "1",
        "--init",
        selected,
        "--freeze-features",
        "--out",
        tmp_path / "head",
    )
    assert (
        head["trainable_parameters"] < head["parameters"] == result["parameters"]["after"]["total"]
    )
    whole = train_json(*TINY_VGG, "--epochs", "1", "--init", selected, "--out", tmp_path / "all")
    assert whole["trainable_parameters"] == whole["parameters"]


# ----------------------------------------------------------------------------- bad input


def assert_clean_failure(result, *fragments: str) -> None:
    assert "Traceback" not in result.output
    assert result.stderr.startswith("distml: error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def workdir(vgg_ckpt: Path, monkeypatch) -> Path:
    """The checkpoint, a group-norm and a residual checkpoint, other datasets, a file."""
    root = vgg_ckpt.parent
    source = load_checkpoint(vgg_ckpt)
    for name, spec in {
        "group.safetensors": source.spec.model_copy(update={"norm": "group"}),
        "resnet.safetensors": ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=5),
    }.items():
        save_checkpoint(
            root / name,
            build_model(spec),
            Checkpoint(
                spec=spec,
                state={},
                classes=source.classes,
                normalization=source.normalization,
                settings=source.settings,
            ),
        )
    synthetic = make_synthetic(40, 20)
    write_dataset_file(
        root / "other-classes.safetensors",
        synthetic.__class__(
            synthetic.train_images,
            synthetic.train_labels,
            synthetic.test_images,
            synthetic.test_labels,
            [f"c{i}" for i in range(10)],
            "x",
        ),
    )
    write_dataset_file(
        root / "small-images.safetensors",
        synthetic.__class__(
            synthetic.train_images[:, :16, :16].contiguous(),
            synthetic.train_labels,
            synthetic.test_images[:, :16, :16].contiguous(),
            synthetic.test_labels,
            synthetic.classes,
            "y",
        ),
    )
    (root / "notes.txt").write_text("keep me")
    monkeypatch.chdir(root)
    return root


BAD_INPUT = [
    (["si", "vgg.safetensors", "--fraction", "0"], ["fraction (--fraction)", "greater than 0"]),
    (["si", "vgg.safetensors", "--fraction", "1.5"], ["fraction (--fraction)", "less than or"]),
    (["prune", "vgg.safetensors", "--fraction", "0"], ["fraction (--fraction)"]),
    (["si", "vgg.safetensors", "--splits", "train,nope"], ["'train', 'val' or 'test'"]),
    (["si", "vgg.safetensors", "--fraction", "0.001"], ["needs at least 2"]),
    (["si", "missing.safetensors"], ["does not exist"]),
    (["si", "vgg.safetensors", "--out", "notes.txt"], ["is a file"]),
    (["si", "vgg.safetensors", "--dataset", "other-classes.safetensors"], ["same classes"]),
    (["si", "vgg.safetensors", "--dataset", "small-images.safetensors"], ["32x32x3 images"]),
    (["prune", "vgg.safetensors", "--dataset", "other-classes.safetensors"], ["same classes"]),
    (["prune", "vgg.safetensors", "--tolerance", "-1"], ["tolerance (--tolerance)"]),
    (
        ["select-features", "vgg.safetensors", "--layer", "conv9"],
        ["'conv9' does not exist", "conv1_1, conv1_2, pool1"],
    ),
    (["select-features", "vgg.safetensors", "--max-features", "65"], ["64 channels of pool5"]),
    (
        ["select-features", "vgg.safetensors", "--dataset", "small-images.safetensors"],
        ["input shape"],
    ),
    (["select-features", "group.safetensors"], ["group norm"]),
    (["select-features", "resnet.safetensors", "--layer", "stage1_res1"], ["residual sum"]),
    (["select-features", "resnet.safetensors", "--layer", "stage1"], ["feeds the residual"]),
    (["prune", "vgg.safetensors", "--head-epochs", "-1"], ["head.epochs (--head-epochs)"]),
]


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUT, ids=lambda v: " ".join(v)[:50])
def test_bad_input_exits_2_and_changes_nothing(workdir: Path, args, fragments):
    before = tree_snapshot(workdir)
    result = run_cli(*args, *CPU, expect=2)
    assert_clean_failure(result, *fragments)
    assert tree_snapshot(workdir) == before


def test_an_existing_result_is_not_overwritten(vgg_ckpt: Path, tmp_path: Path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "prune.json").write_text("{}")
    result = run_cli("prune", vgg_ckpt, "--out", out, *CPU, expect=2)
    assert_clean_failure(result, f"--out {out} already holds results", "--overwrite")
    assert (out / "prune.json").read_text() == "{}"
