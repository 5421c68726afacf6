"""Compression by the Separation Index: the layer cut (``distml prune``), greedy channel
selection with physical removal (``distml select-features``), the classifier rebuild and the
training of the rebuilt head on frozen features.

The keep rule (one rule for layers and for channels). Given a curve of index values
``c_1 .. c_n`` (per layer on the training subset, or per number of greedily selected
channels) and a tolerance ``T >= 0``, keep the first ``k`` entries, where ``k`` is the
smallest position with ``c_k >= max(c) - T``. Equivalently: ``k`` is the smallest position
after which no entry exceeds ``c_k`` by more than ``T``: the tail that is cut does not raise
the index by more than ``T`` over the last kept entry. ``T = 0`` keeps up to the first
maximum. A difference of exactly ``T`` counts as "not more than T" (up to 1e-9: index values
are fractions of samples and float subtraction is inexact). The rule is ``si.kept_prefix``,
the one copy that ``select_features`` also uses.

Why not "keep up to the last layer that beats the running maximum by more than T": a slow
climb of many steps, each smaller than T, would then be cut away although it raises the
index by far more than T in all.

Channel slicing removes channel ``j`` of a conv block for real: the conv's output filters,
its bias, its BatchNorm/InstanceNorm parameters and running statistics, and the input
channels of the next conv block (pools pass channels through). The kept channels compute
exactly what they computed before. Refused, with a message: group and layer norm (they
normalise over groups of channels, so removing channels changes the kept ones), and channels
that feed or leave a residual unit of the cnn (the sum x + f(x) needs all of x).

The classifier is rebuilt from the new ``ModelSpec`` (fresh weights, seeded by the
checkpoint's training seed) whenever the feature size changes; a cut that cuts nothing, or a
selection that keeps every channel, keeps the trained head.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distml.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    split_prefix,
)
from distml.config import (
    EvalSettings,
    HeadSettings,
    PruneSettings,
    SelectSettings,
    TrainConfig,
    validate_settings,
)
from distml.dist import device_name
from distml.errors import DistmlError
from distml.files import atomic_write_json, check_out_dir, check_save_target, copy_file, default_out
from distml.models import (
    Classifier,
    LayerPlan,
    ModelSpec,
    build_model,
    count_parameters,
    describe,
    feature_plan,
    feature_shapes,
    full_layer_names,
)
from distml.plots import plot_layer_indices, plot_selection_curve
from distml.progress import Reporter
from distml.si import SelectionResult, kept_prefix, select_features
from distml.taps import TapSource, index_curve, layer_features, open_taps

SLICEABLE_NORMS = ("batch", "instance", "none")
CONV_KEYS = ("conv.weight", "conv.bias")
NORM_KEYS = ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var")

# ----------------------------------------------------------------------------- model surgery


def parameter_counts(model: Classifier) -> dict[str, int]:
    return {
        "total": count_parameters(model),
        "features": count_parameters(model.features),
        "head": count_parameters(model.head),
    }


def assemble(
    spec: ModelSpec,
    features: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor] | None,
    seed: int,
) -> Classifier:
    """A model of ``spec`` with the given feature weights and either the given head weights or
    a new head (initialised from ``seed`` without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    model.features.load_state_dict(features, strict=True)
    if head is not None:
        model.head.load_state_dict(head, strict=True)
    return model


def cut_model(ckpt: Checkpoint, keep_layers: int, seed: int) -> tuple[Classifier, ModelSpec]:
    """The first ``keep_layers`` feature layers of the checkpoint with a rebuilt head (the
    trained head when nothing is cut)."""
    names = [layer.name for layer in feature_plan(ckpt.spec)]
    if not 1 <= keep_layers <= len(names):
        raise ValueError(f"keep_layers must be in [1, {len(names)}], got {keep_layers}")
    kept = set(names[:keep_layers])
    spec = ckpt.spec.model_copy(
        update={
            "num_feature_layers": keep_layers,
            "channels": {k: v for k, v in ckpt.spec.channels.items() if k in kept},
            "kept_channels": {k: v for k, v in ckpt.spec.kept_channels.items() if k in kept},
        }
    )
    trained = split_prefix(ckpt.state, "features.")
    features = {k: v for k, v in trained.items() if k.split(".", 1)[0] in kept}
    head = split_prefix(ckpt.state, "head.") if keep_layers == len(names) else None
    return assemble(spec, features, head, seed), spec


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """Where selecting the channels of ``layer`` cuts: the conv block whose output channels
    are removed and the next conv block whose input channels go with them."""

    layer: str
    conv: str
    next_conv: str | None
    channels: int


def unknown_layer(spec: ModelSpec, layer: str) -> DistmlError:
    names = [p.name for p in feature_plan(spec)]
    gone = layer in full_layer_names(spec)
    why = " (it was cut away by distml prune)" if gone else ""
    return DistmlError(
        f"layer {layer!r} does not exist in this model{why}. Its feature layers are: "
        f"{', '.join(names)}. Pass one of them to --layer."
    )


def residual_problem(plan: list[LayerPlan], position: int) -> str | None:
    """Why the channels of ``plan[position]`` cannot be removed exactly because of a residual
    unit, or None when they can."""
    conv = position
    while plan[conv].kind == "pool":  # a pool's channels are the conv block's before it
        conv -= 1
    if plan[conv].kind != "conv":
        return (
            f"the channels of {plan[conv].name} are a residual sum x + f(x); removing some "
            "would change the kept ones"
        )
    following = next((p for p in plan[conv + 1 :] if p.kind != "pool"), None)
    if following is not None and following.kind == "residual":
        return (
            f"{plan[conv].name} feeds the residual unit {following.name}, whose sum x + f(x) "
            "needs all of its input channels"
        )
    return None


def plan_slice(spec: ModelSpec, layer: str) -> SlicePlan:
    """Check that the channels of ``layer`` can be removed exactly; a DistmlError otherwise."""
    plan = feature_plan(spec)
    names = [p.name for p in plan]
    if layer not in names:
        raise unknown_layer(spec, layer)
    if spec.norm not in SLICEABLE_NORMS:
        raise DistmlError(
            f"this model uses {spec.norm} norm, which normalises over groups of channels: "
            "removing channels would change the values of the kept ones. Channel selection "
            "needs batch, instance or no normalisation (train with --norm batch)."
        )
    position = names.index(layer)
    problem = residual_problem(plan, position)
    if problem is not None:
        fine = [p.name for i, p in enumerate(plan) if residual_problem(plan, i) is None]
        raise DistmlError(
            f"{problem}. Select features of one of {', '.join(fine)} (--layer), or cut the "
            "network before its residual units first (distml prune)."
        )
    conv = position
    while plan[conv].kind == "pool":
        conv -= 1
    following = next((p for p in plan[conv + 1 :] if p.kind != "pool"), None)
    return SlicePlan(
        layer=layer,
        conv=plan[conv].name,
        next_conv=following.name if following is not None else None,
        channels=plan[conv].out_channels,
    )


def slice_feature_state(
    state: dict[str, torch.Tensor], plan: SlicePlan, keep: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Feature weights with only the ``keep`` channels of ``plan.conv`` (and the matching
    input channels of ``plan.next_conv``)."""
    index = torch.as_tensor(list(keep), dtype=torch.long)
    sliced = dict(state)
    for key in (*CONV_KEYS, *NORM_KEYS):
        name = f"{plan.conv}.{key}"
        if name in sliced:
            sliced[name] = sliced[name].index_select(0, index).clone()
    if plan.next_conv is not None:
        name = f"{plan.next_conv}.conv.weight"
        sliced[name] = sliced[name].index_select(1, index).clone()
    return sliced


def slice_channels(
    ckpt: Checkpoint, plan: SlicePlan, keep: Sequence[int], seed: int
) -> tuple[Classifier, ModelSpec]:
    """The checkpoint's model with only the ``keep`` channels (ascending, unique) of
    ``plan.conv``; the head is rebuilt unless every channel is kept."""
    keep = list(keep)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= plan.channels:
        raise ValueError(f"keep must be ascending unique channels in [0, {plan.channels})")
    original = ckpt.spec.kept_channels.get(plan.conv, list(range(plan.channels)))
    spec = ckpt.spec.model_copy(
        update={
            "channels": {**ckpt.spec.channels, plan.conv: len(keep)},
            "kept_channels": {**ckpt.spec.kept_channels, plan.conv: [original[i] for i in keep]},
        }
    )
    features = slice_feature_state(split_prefix(ckpt.state, "features."), plan, keep)
    head = split_prefix(ckpt.state, "head.") if len(keep) == plan.channels else None
    return assemble(spec, features, head, seed), spec


# ----------------------------------------------------------------------------- outputs


def check_outputs(out: Path, result_file: str, settings: PruneSettings) -> None:
    """Refuse, before any work, outputs that would overwrite a result or cannot be written."""
    check_out_dir(out, overwrite=settings.overwrite)
    check_save_target(settings.save, overwrite=settings.overwrite)


def compressed_checkpoint(
    source: Checkpoint, spec: ModelSpec, provenance: dict[str, Any]
) -> Checkpoint:
    """Metadata of a compressed model: the source's classes, normalisation and settings (so
    eval, si and train --init find the data), the step's provenance in ``extra``."""
    return Checkpoint(
        spec=spec,
        state={},
        classes=list(source.classes),
        normalization=source.normalization,
        settings=source.settings,
        epoch=source.epoch,
        metrics={},
        extra={**provenance, "source": str(source.path), "source_extra": source.extra},
    )


def head_training_config(
    ckpt: Checkpoint,
    init: Path,
    head: HeadSettings,
    device: str,
    out: Path,
    data_overrides: dict[str, Any],
) -> TrainConfig:
    """The checkpoint's own training settings, turned into a head-only run from ``init``."""
    values = copy.deepcopy(ckpt.settings) or {}
    values.setdefault("model", {}).update(
        arch=ckpt.spec.arch,
        init=str(init),
        freeze_features=True,
        head_hidden=list(ckpt.spec.head_hidden),
        dropout=ckpt.spec.dropout,
    )
    values.setdefault("data", {}).update(
        {k: str(v) for k, v in data_overrides.items() if v is not None}
    )
    values.setdefault("optim", {}).update(lr=head.lr, scheduler=head.scheduler)
    train = values.setdefault("train", {})
    train.update(
        epochs=head.epochs, label_smoothing=head.label_smoothing, device=device, early_stop=None
    )
    if head.batch_size is not None:
        train["batch_size"] = head.batch_size
        train["accum_steps"] = 1
    values["dist"] = {"mode": head.mode}
    values["output"] = {"dir": str(out)}
    return validate_settings(TrainConfig, values)


def train_new_head(
    source: Checkpoint,
    compressed: Path,
    settings: PruneSettings,
    out: Path,
    show_progress: bool,
) -> dict[str, Any]:
    """Test accuracy of the source, then of the compressed model after training its new head
    on frozen features (the same training loop as ``distml train``, any mode)."""
    from distml.evaluate import evaluate_checkpoint
    from distml.launch import start_training

    before = evaluate_checkpoint(
        EvalSettings(
            checkpoint=settings.checkpoint,
            dataset=settings.dataset,
            data_dir=settings.data_dir,
            device=settings.device,
            out=out / "source-eval-test",
            overwrite=settings.overwrite,
        ),
        show_progress=show_progress,
    )
    data = {"dataset": settings.dataset, "data_dir": settings.data_dir}
    config = head_training_config(
        source, compressed, settings.head, settings.device, out / "head-training", data
    )
    if settings.overwrite:  # --overwrite replaces this command's own earlier head run
        shutil.rmtree(out / "head-training", ignore_errors=True)
    summary = start_training(config, show_progress=show_progress)
    return {
        "test_accuracy_before": before["accuracy"],
        "test_accuracy_after": summary["test_accuracy"],
        "epochs": settings.head.epochs,
        "run_dir": summary["run_dir"],
        "checkpoint": summary["checkpoints"]["best"],
        "best_val_accuracy": summary["best_val_accuracy"],
        "train_seconds": summary["train_seconds"],
        "curves": str(Path(summary["run_dir"]) / "curves.png"),
    }


def finish(
    settings: PruneSettings,
    source: Checkpoint,
    taps: TapSource,
    model: Classifier,
    spec: ModelSpec,
    provenance: dict[str, Any],
    out: Path,
    names: tuple[str, str],
    plot: Path,
    started: float,
    show_progress: bool,
) -> dict[str, Any]:
    """Write the compressed checkpoint (``names``: its file and the JSON report's), count
    parameters, train and test the new head when asked, copy the final model (head-trained
    if any) to --save, and write the report: the shared part of prune and select-features."""
    checkpoint_name, json_name = names
    path = out / checkpoint_name
    save_checkpoint(path, model, compressed_checkpoint(source, spec, provenance))
    before = parameter_counts(model_from_checkpoint(source))
    after = parameter_counts(model)
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "saved": str(settings.save) if settings.save is not None else None,
        "architecture_before": describe(source.spec),
        "architecture_after": describe(spec),
        "model_spec": spec.model_dump(mode="json"),
        "parameters": {
            "before": before,
            "after": after,
            "removed_fraction": 1 - after["total"] / before["total"],
        },
        "head_rebuilt": provenance["head_rebuilt"],
        "test_accuracy": {"before": None, "after": None},
        "head_training": None,
    }
    if settings.head.epochs > 0:
        head = train_new_head(source, path, settings, out, show_progress)
        result["test_accuracy"] = {
            "before": head["test_accuracy_before"],
            "after": head["test_accuracy_after"],
        }
        result["head_training"] = head
    if settings.save is not None:  # the final model: the head-trained one when there is one
        final = Path(result["head_training"]["checkpoint"]) if settings.head.epochs else path
        copy_file(final, settings.save)
    result |= provenance | {
        "source": str(settings.checkpoint),
        "samples": len(taps.subsets["train"].labels),
        "plot": str(plot),
        "device_name": device_name(taps.device),
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / json_name, result)
    result["json"] = str(out / json_name)
    return result


def check_head_training(settings: PruneSettings, ckpt: Checkpoint, out: Path) -> None:
    """Head training starts from the checkpoint's own training settings: check them (and the
    flags that change them) before any work, not after the compressed model is written."""
    if settings.head.epochs == 0:
        return
    if not (ckpt.settings.get("data") or settings.dataset):
        raise DistmlError(
            f"checkpoint {ckpt.path} records no training settings; pass --dataset to train "
            "the new head (or drop --head-epochs)."
        )
    data = {"dataset": settings.dataset, "data_dir": settings.data_dir}
    head_training_config(
        ckpt, out / "compressed", settings.head, settings.device, out / "head-training", data
    )


# ----------------------------------------------------------------------------- distml prune


def prune_checkpoint(settings: PruneSettings, *, show_progress: bool = True) -> dict[str, Any]:
    """``distml prune``: the layer curve on the training subset, the keep rule, the cut model
    with a rebuilt classifier; writes ``pruned.safetensors``, ``prune.json``, ``prune.png``."""
    started = time.perf_counter()
    out = settings.out or default_out(settings.checkpoint, "prune")
    check_outputs(out, "prune.json", settings)
    reporter = Reporter(show_progress)
    ckpt = load_checkpoint(settings.checkpoint)
    check_head_training(settings, ckpt, out)
    source = open_taps(ckpt, settings, ["train"], reporter)
    curve = index_curve(source, "train", [settings.criterion], reporter)
    names = list(curve)
    values = [curve[name][settings.criterion] for name in names]
    keep = kept_prefix(values, settings.tolerance)
    model, spec = cut_model(ckpt, keep, ckpt.seed)
    reporter.line(f"keeping {keep} of {len(names)} feature layers (up to {names[keep - 1]})")
    provenance = {
        "step": "prune",
        "criterion": settings.criterion,
        "tolerance": settings.tolerance,
        "fraction": settings.fraction,
        "layers": names,
        "curve": values,
        "kept_layers": keep,
        "head_rebuilt": keep < len(names),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "prune.png"
    plot_layer_indices(
        names,
        {index_label(settings.criterion): {"train": values}},
        plot,
        f"{settings.checkpoint.name}: {index_label(settings.criterion)} per layer, cut after "
        f"{names[keep - 1]} (tolerance {settings.tolerance:g})",
        cut_after=keep,
    )
    provenance |= {"cut_after": names[keep - 1], "removed_layers": names[keep:]}
    files = ("pruned.safetensors", "prune.json")
    return finish(
        settings, ckpt, source, model, spec, provenance, out, files, plot, started, show_progress
    )


def index_label(criterion: str) -> str:
    return "SI" if criterion == "si" else "Center SI"


# ----------------------------------------------------------------------------- select-features


def select_layer(settings: SelectSettings, ckpt: Checkpoint) -> SlicePlan:
    layer = settings.layer or feature_plan(ckpt.spec)[-1].name
    plan = plan_slice(ckpt.spec, layer)
    channels = feature_shapes(ckpt.spec)[layer].channels
    if settings.max_features is not None and settings.max_features > channels:
        raise DistmlError(
            f"--max-features {settings.max_features} is more than the {channels} channels of "
            f"{layer}; use at most {channels}."
        )
    return plan


def run_selection(
    source: TapSource, plan: SlicePlan, settings: SelectSettings, reporter: Reporter
) -> SelectionResult:
    features = layer_features(source, "train", plan.layer)
    labels = source.subsets["train"].labels
    steps = settings.max_features or features.shape[1]
    with reporter.task(f"selecting channels of {plan.layer}", steps) as task:
        result = select_features(
            features,
            labels,
            criterion=settings.criterion,
            max_features=settings.max_features,
            tolerance=settings.tolerance,
            progress=lambda done, total: task.advance(1),
        )
    return result  # select_features applies si.kept_prefix, the keep rule prune uses


def select_checkpoint_features(
    settings: SelectSettings, *, show_progress: bool = True
) -> dict[str, Any]:
    """``distml select-features``: greedy channel selection in one layer on the training
    subset, the smallest prefix within tolerance of the best, the unselected channels removed
    from the weights and the classifier rebuilt; writes ``selected.safetensors``,
    ``selection.json`` and ``selection.png``."""
    started = time.perf_counter()
    ckpt = load_checkpoint(settings.checkpoint)
    plan = select_layer(settings, ckpt)  # bad layer names fail before any work
    out = settings.out or default_out(settings.checkpoint, f"select-{plan.layer}")
    check_outputs(out, "selection.json", settings)
    check_head_training(settings, ckpt, out)
    reporter = Reporter(show_progress)
    source = open_taps(ckpt, settings, ["train"], reporter)
    selection = run_selection(source, plan, settings, reporter)
    model, spec = slice_channels(ckpt, plan, selection.selected, ckpt.seed)
    reporter.line(
        f"keeping {selection.kept} of {plan.channels} channels of {plan.conv} "
        f"({index_label(settings.criterion)} {selection.curve[selection.kept - 1]:.4f}, "
        f"best {selection.best:.4f})"
    )
    provenance = {
        "step": "select-features",
        "layer": plan.layer,
        "sliced_conv": plan.conv,
        "next_conv": plan.next_conv,
        "criterion": settings.criterion,
        "tolerance": settings.tolerance,
        "fraction": settings.fraction,
        "channels_before": plan.channels,
        "channels_after": selection.kept,
        "selection": selection.to_dict(),
        "kept_channels": spec.kept_channels[plan.conv],
        "head_rebuilt": selection.kept < plan.channels,
    }
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "selection.png"
    plot_selection_curve(
        selection.curve,
        selection.kept,
        settings.tolerance,
        plot,
        f"{settings.checkpoint.name}: greedy selection in {plan.layer} "
        f"({len(source.subsets['train'].labels)} training samples)",
        f"{index_label(settings.criterion)} (train subset)",
    )
    files = ("selected.safetensors", "selection.json")
    return finish(
        settings, ckpt, source, model, spec, provenance, out, files, plot, started, show_progress
    )
