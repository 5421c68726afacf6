"""``distml study``: Part B (VGG16 and the Separation Index) from one training config.

Steps, each in its own folder under ``out``:

1. ``1-train``: train the model end to end (the config; best checkpoint by validation).
2. ``2-head``: freeze its features, train a new classifier head.
3. ``3a-si``: SI and Center SI per layer of model 1 (train and test subsets);
   ``3b-prune``: cut the tail layers (keep rule on the training curve) + a new head;
   ``3c-select``: greedy channel selection in the last kept layer of the pruned model (its
   head-trained checkpoint, so "accuracy before" is a trained model) + a new head.
4. ``4-si-*``: SI and Center SI per layer of every other model.

``report.md`` and ``report.json`` gather the tables (test accuracy of every model, SI/Center
SI per layer, parameters and accuracy before/after each compression step) and link the plots.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from distml.checkpoint import load_checkpoint
from distml.compress import (
    head_training_config,
    plan_slice,
    prune_checkpoint,
    select_checkpoint_features,
)
from distml.config import (
    PruneSettings,
    SelectSettings,
    SiSettings,
    StudySettings,
    TrainConfig,
)
from distml.errors import DistmlError
from distml.files import atomic_write_json, atomic_write_text, check_out_dir
from distml.models import ModelSpec, full_layer_names
from distml.progress import Reporter
from distml.taps import measure_layers

STEP_DIRS = ("1-train", "2-head", "3a-si", "3b-prune", "3c-select")


def check_study(settings: StudySettings) -> None:
    """Problems that would stop the study after hours of training: find them first."""
    out = settings.out
    check_out_dir(out)
    used = [name for name in ("report.json", *STEP_DIRS) if (out / name).exists()]
    if used:
        raise DistmlError(
            f"{out} already holds a study ({', '.join(used)}). Choose another --out or delete it."
        )
    model = settings.training.model
    if model.init is not None:
        raise DistmlError(
            "the study trains step 1 from scratch; remove model.init from its settings."
        )
    spec = ModelSpec(
        arch=model.arch, num_classes=2, width=model.width, depth=model.depth, norm=model.norm
    )
    plan_slice(spec, full_layer_names(spec)[0])  # refuses norms that cannot be sliced
    if settings.layer is not None and settings.layer not in full_layer_names(spec):
        raise DistmlError(
            f"--layer {settings.layer!r} is not a layer of this model; its feature layers are: "
            f"{', '.join(full_layer_names(spec))}."
        )


def step_config(training: TrainConfig, run_dir: Path) -> TrainConfig:
    output = training.output.model_copy(update={"dir": run_dir, "name": None, "save": None})
    return training.model_copy(update={"output": output})


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))


def run_study(settings: StudySettings, *, show_progress: bool = True) -> dict[str, Any]:
    """Run steps 1-4 (see the module doc) and write the report; returns report.json's dict."""
    from distml.launch import start_training

    started = time.perf_counter()
    check_study(settings)
    out, device, reporter = settings.out, settings.training.train.device, Reporter(show_progress)
    common = {"fraction": settings.fraction, "device": device}

    reporter.line("study step 1: training end to end")
    run1 = start_training(
        step_config(settings.training, out / "1-train"), show_progress=show_progress
    )
    best1 = Path(run1["checkpoints"]["best"])

    reporter.line("study step 2: a new head on the frozen features")
    config2 = head_training_config(
        load_checkpoint(best1), best1, settings.head, device, out / "2-head", {}
    )
    run2 = start_training(config2, show_progress=show_progress)

    reporter.line("study step 3: SI per layer, prune, select features, new heads")
    si1 = measure_layers(
        SiSettings(checkpoint=best1, out=out / "3a-si", **common), show_progress=show_progress
    )
    prune = prune_checkpoint(
        PruneSettings(
            checkpoint=best1,
            criterion=settings.criterion,
            tolerance=settings.layer_tolerance,
            head=settings.head,
            out=out / "3b-prune",
            **common,
        ),
        show_progress=show_progress,
    )
    select = select_checkpoint_features(
        SelectSettings(
            checkpoint=Path(prune["head_training"]["checkpoint"]),
            layer=settings.layer,
            criterion=settings.criterion,
            tolerance=settings.feature_tolerance,
            max_features=settings.max_features,
            head=settings.head,
            out=out / "3c-select",
            **common,
        ),
        show_progress=show_progress,
    )

    reporter.line("study step 4: SI per layer of every model")
    later = {
        "2-head": run2["checkpoints"]["best"],
        "3b-prune": prune["head_training"]["checkpoint"],
        "3c-select": select["head_training"]["checkpoint"],
    }
    si = {"1-train": si1}
    for step, checkpoint in later.items():
        si[step] = measure_layers(
            SiSettings(checkpoint=Path(checkpoint), out=out / f"4-si-{step}", **common),
            show_progress=show_progress,
        )
    runs = {
        "1-train": run1,
        "2-head": run2,
        "3b-prune": read_summary(prune["head_training"]["run_dir"]),
        "3c-select": read_summary(select["head_training"]["run_dir"]),
    }
    report = study_report(settings, runs, si, prune, select, time.perf_counter() - started)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report, out))
    return report


MODEL_NAMES = {
    "1-train": "1 end to end",
    "2-head": "2 new head (frozen)",
    "3b-prune": "3 pruned + new head",
    "3c-select": "3 selected + new head",
}


def study_report(
    settings: StudySettings,
    runs: dict[str, dict[str, Any]],
    si: dict[str, dict[str, Any]],
    prune: dict[str, Any],
    select: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    out = settings.out
    models = [
        {
            "step": step,
            "name": MODEL_NAMES[step],
            "run_dir": run["run_dir"],
            "architecture": run["architecture"],
            "parameters": run["parameters"],
            "trainable_parameters": run["trainable_parameters"],
            "best_val_accuracy": run["best_val_accuracy"],
            "test_accuracy": run["test_accuracy"],
            "best_epoch": run["best_epoch"],
            "epochs_run": run["epochs_run"],
            "train_seconds": run["train_seconds"],
            "overfitting": run["overfitting"]["verdict"],
            "curves": str(Path(run["run_dir"]) / "curves.png"),
            "checkpoint": run["checkpoints"]["best"],
        }
        for step, run in runs.items()
    ]
    return {
        "created": datetime.now().isoformat(timespec="seconds"),
        "out": str(out),
        "settings": settings.model_dump(mode="json"),
        "device_name": runs["1-train"]["device_name"],
        "models": models,
        "si": {
            step: {k: r[k] for k in ("checkpoint", "samples", "layers", "plot")}
            for step, r in si.items()
        },
        "prune": prune,
        "select": select,
        "seconds": seconds,
        "report_md": str(out / "report.md"),
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def link(path: str, out: Path) -> str:
    return os.path.relpath(path, out)


def report_markdown(r: dict[str, Any], out: Path) -> str:
    """report.md: the tables and plot links of a finished study."""
    s = r["settings"]
    lines = [
        "# VGG16 Separation-Index study",
        "",
        f"{r['created']}, {r['device_name']}, {r['seconds'] / 60:.1f} min in all. Step 1: "
        f"{s['training']['model']['arch']} on {s['training']['data']['dataset']}, "
        f"epochs: {s['training']['train']['epochs']}; new heads: epochs: {s['head']['epochs']}, "
        f"lr {s['head']['lr']:g}. Indices on {100 * s['fraction']:g}% class-balanced subsets; "
        f"decisions by {s['criterion']} on the training subset (layer tolerance "
        f"{s['layer_tolerance']:g}, feature tolerance {s['feature_tolerance']:g}).",
        "",
        "## Models",
        "",
        "| model | parameters | trained | best val acc | test acc (best model) | best epoch "
        "| time | curves |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in r["models"]:
        lines.append(
            f"| {m['name']} | {m['parameters']:,} | {m['trainable_parameters']:,} | "
            f"{pct(m['best_val_accuracy'])} | {pct(m['test_accuracy'])} | "
            f"{m['best_epoch']}/{m['epochs_run']} | {m['train_seconds']:.0f} s | "
            f"[curves]({link(m['curves'], out)}) |"
        )
    lines += ["", *[f"- {m['name']}: {m['overfitting']}" for m in r["models"]], ""]
    lines += compression_markdown(r, out)
    for step, result in r["si"].items():
        lines += si_markdown(MODEL_NAMES[step], result, out)
    return "\n".join(lines) + "\n"


def compression_markdown(r: dict[str, Any], out: Path) -> list[str]:
    prune, select = r["prune"], r["select"]
    lines = [
        "## Compression",
        "",
        "| step | what | parameters before | after | removed | test acc before | after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [
        (
            "prune",
            f"kept {prune['kept_layers']} of {len(prune['layers'])} layers "
            f"(up to {prune['cut_after']})",
            prune,
        ),
        (
            "select-features",
            f"kept {select['channels_after']} of {select['channels_before']} "
            f"channels of {select['sliced_conv']}",
            select,
        ),
    ]
    for step, what, res in rows:
        p = res["parameters"]
        lines.append(
            f"| {step} | {what} | {p['before']['total']:,} | {p['after']['total']:,} | "
            f"{100 * p['removed_fraction']:.1f}% | {pct(res['test_accuracy']['before'])} | "
            f"{pct(res['test_accuracy']['after'])} |"
        )
    curve = " ".join(f"{n} {v:.3f}" for n, v in zip(prune["layers"], prune["curve"], strict=True))
    lines += [
        "",
        f"Layer curve ({prune['criterion']}, training subset): {curve}.",
        "",
        f"![layer curve]({link(prune['plot'], out)})",
        f"![selection curve]({link(select['plot'], out)})",
        "",
    ]
    return lines


def si_markdown(name: str, result: dict[str, Any], out: Path) -> list[str]:
    splits = list(result["samples"])
    samples = ", ".join(f"{n} {s}" for s, n in result["samples"].items())
    header = "| layer | shape | " + " | ".join(
        [f"SI {s}" for s in splits] + [f"Center SI {s}" for s in splits]
    )
    lines = [
        f"## SI and Center SI per layer: {name}",
        "",
        f"Checkpoint `{result['checkpoint']}`, {samples} samples.",
        "",
        header + " |",
        "| --- | --- |" + " ---: |" * (2 * len(splits)),
    ]
    for row in result["layers"]:
        cells = [row["si"][s] for s in splits] + [row["center_si"][s] for s in splits]
        shape = f"{row['channels']}x{row['size']}x{row['size']}"
        lines.append(f"| {row['name']} | {shape} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    lines += ["", f"![SI per layer]({link(result['plot'], out)})", ""]
    return lines
