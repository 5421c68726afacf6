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
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from distml.checkpoint import Checkpoint, load_checkpoint
from distml.compress import (
    check_head_training,
    head_training_config,
    plan_slice,
    prune_checkpoint,
    residual_problem,
    select_checkpoint_features,
    select_layer,
)
from distml.config import (
    PruneSettings,
    SelectSettings,
    SiSettings,
    StudySettings,
    TrainConfig,
    validate_settings,
)
from distml.data import DatasetShape, dataset_shape, outermost_missing, remove_created
from distml.errors import DistmlError
from distml.files import atomic_write_json, atomic_write_text, check_out_dir
from distml.models import ModelSpec, build_model, feature_plan, feature_shapes, full_layer_names
from distml.progress import Reporter
from distml.taps import measure_layers

# every step's folder, in the order they run, and the file that makes it a finished result
# (each is written last, atomically, by the step)
STEP_RESULTS = {
    "1-train": "summary.json",
    "2-head": "summary.json",
    "3a-si": "si.json",
    "3b-prune": "prune.json",
    "3c-select": "selection.json",
    "4-si-2-head": "si.json",
    "4-si-3b-prune": "si.json",
    "4-si-3c-select": "si.json",
}
STEPS = tuple(STEP_RESULTS)
STUDY_FILE = "study.json"  # the settings of the study in this folder: written first
# the first step each setting changes (a setting changes every later step too)
FIRST_STEP_OF = {
    "training": "1-train",
    "head": "2-head",
    "fraction": "3a-si",
    "criterion": "3b-prune",
    "layer_tolerance": "3b-prune",
    "feature_tolerance": "3c-select",
    "layer": "3c-select",
    "max_features": "3c-select",
}
# settings that say where and how the steps run, not what they compute
RUN_ONLY = ("out", "training.output.", "training.dist.", "training.train.device", "head.mode")


# ----------------------------------------------------------------------------- the plan


def planned_spec(settings: StudySettings, shape: DatasetShape) -> ModelSpec:
    """Step 1's model, as `distml train` will build it, from the settings and the dataset's
    shape; built on the meta device (no memory, no time) to find a model that does not fit."""
    model = settings.training.model
    spec = ModelSpec.from_settings(model, shape.num_classes, shape.channels, shape.image_size)
    try:
        with torch.device("meta"):
            build_model(spec)
    except ValueError as exc:
        raise DistmlError(
            f"the {model.arch} model does not fit the {shape.image_size}x{shape.image_size} "
            f"images of {settings.training.data.dataset}: {exc}."
        ) from None
    return spec


def default_selection_layer(spec: ModelSpec) -> str:
    """The layer the study selects channels in when --layer is not given: the last layer of
    the (pruned) model whose channels can be removed exactly (a cnn's residual units cannot)."""
    plan = feature_plan(spec)
    sliceable = [p.name for i, p in enumerate(plan) if residual_problem(plan, i) is None]
    return sliceable[-1] if sliceable else plan[-1].name


def check_subsets(settings: StudySettings, shape: DatasetShape) -> None:
    """Every SI step measures class-balanced subsets of the train and test splits."""
    val_size = round(shape.train_size * settings.training.data.val_fraction)
    for split, size in (("train", shape.train_size - val_size), ("test", shape.test_size)):
        count = round(size * settings.fraction)
        if count < 2:
            raise DistmlError(
                f"--fraction {settings.fraction} of the {split} split ({size} images) is "
                f"{count} sample(s); the Separation Index needs at least 2. Use a larger "
                "--fraction."
            )


def planned_checkpoint(spec: ModelSpec, config: TrainConfig, path: Path) -> Checkpoint:
    """The metadata a step's checkpoint will have (no weights): enough to check the settings
    of every step that reads it."""
    return Checkpoint(
        spec=spec,
        state={},
        classes=[f"class{k}" for k in range(spec.num_classes)],
        normalization={},
        settings=config.model_dump(mode="json"),
        path=path,
    )


def check_study(settings: StudySettings) -> None:
    """Check the whole plan, every step's settings included, before the first file is
    written: a problem found after hours of training is found now."""
    out = settings.out
    # a study continues in its own folder: resume_point decides what is kept or redone
    check_out_dir(out, overwrite=True)
    model = settings.training.model
    if model.init is not None:
        raise DistmlError(
            "the study trains step 1 from scratch; remove model.init from its settings."
        )
    shape = dataset_shape(settings.training.data)
    spec = planned_spec(settings, shape)
    check_subsets(settings, shape)
    names = full_layer_names(spec)
    if settings.layer is not None and settings.layer not in names:
        raise DistmlError(
            f"--layer {settings.layer!r} is not a layer of this model; its feature layers are: "
            f"{', '.join(names)}."
        )
    # the selection runs in the pruned, head-trained model; however the prune cuts, it keeps
    # the selected layer as its last layer at the least: check against that cut
    layer = settings.layer or default_selection_layer(spec)
    cut = spec.model_copy(update={"num_feature_layers": names.index(layer) + 1})
    plan_slice(cut, layer)  # refuses norms and residual units that cannot be sliced
    best1 = out / "1-train" / "best.safetensors"
    step1 = planned_checkpoint(spec, step_config(settings.training, out / "1-train"), best1)
    head_config(settings, step1, out / "2-head")
    prune = prune_settings(settings, best1)
    check_head_training(prune, step1, prune.out)
    device = settings.training.train.device
    pruned = prune.out / "pruned.safetensors"
    pruned_head = head_training_config(step1, pruned, settings.head, device, prune.out, {})
    step3 = planned_checkpoint(cut, pruned_head, prune.out / "head-training" / "best.safetensors")
    select = select_settings(settings, step3.path, layer, settings.max_features)
    if settings.layer is not None:  # the default layer caps --max-features at its channels
        select_layer(select, step3)
    check_head_training(select, step3, select.out)


def step_config(training: TrainConfig, run_dir: Path) -> TrainConfig:
    output = training.output.model_copy(update={"dir": run_dir, "name": None, "save": None})
    return training.model_copy(update={"output": output})


def head_config(settings: StudySettings, source: Checkpoint, run_dir: Path) -> TrainConfig:
    """Step 2: a new classifier head on the frozen features of step 1's model."""
    assert source.path is not None
    device = settings.training.train.device
    return head_training_config(source, source.path, settings.head, device, run_dir, {})


def common_settings(settings: StudySettings) -> dict[str, Any]:
    return {"fraction": settings.fraction, "device": settings.training.train.device}


def si_settings(settings: StudySettings, checkpoint: Path, out: Path) -> SiSettings:
    values = {"checkpoint": checkpoint, "out": out, **common_settings(settings)}
    return validate_settings(SiSettings, values)


def prune_settings(settings: StudySettings, checkpoint: Path) -> PruneSettings:
    values = {
        "checkpoint": checkpoint,
        "criterion": settings.criterion,
        "tolerance": settings.layer_tolerance,
        "head": settings.head,
        "out": settings.out / "3b-prune",
        **common_settings(settings),
    }
    return validate_settings(PruneSettings, values)


def select_settings(
    settings: StudySettings, checkpoint: Path, layer: str, max_features: int | None
) -> SelectSettings:
    values = {
        "checkpoint": checkpoint,
        "layer": layer,
        "criterion": settings.criterion,
        "tolerance": settings.feature_tolerance,
        "max_features": max_features,
        "head": settings.head,
        "out": settings.out / "3c-select",
        **common_settings(settings),
    }
    return validate_settings(SelectSettings, values)


# ----------------------------------------------------------------------------- resuming


def step_finished(out: Path, step: str) -> bool:
    """A step is finished when its result file is there and holds a JSON object."""
    path = out / step / STEP_RESULTS[step]
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def finished_steps(out: Path) -> list[str]:
    """The steps kept by a resumed study: the finished ones before the first unfinished one
    (every later step is redone, since it may have been built on an unfinished one)."""
    finished = []
    for step in STEPS:
        if not step_finished(out, step):
            break
        finished.append(step)
    return finished


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_study(settings: StudySettings, stored: dict[str, Any], finished: list[str]) -> None:
    """A resumed study may change only what no finished step has used yet."""
    old, new = flat_settings(stored), flat_settings(settings.model_dump(mode="json"))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key) or key.startswith(RUN_ONLY):
            continue
        step = FIRST_STEP_OF.get(key.split(".")[0], STEPS[0])
        if step in finished:
            raise DistmlError(
                f"{settings.out} holds a study begun with other settings: {key} was "
                f"{old.get(key)!r}, now {new.get(key)!r}, and the finished step {step} used it. "
                "Run the same command again to continue that study, or choose another --out."
            )


def resume_point(settings: StudySettings) -> list[str]:
    """The finished steps of the study already in ``out`` (none for a new one); refuses a
    folder that holds something else, or a study with other settings."""
    out = settings.out
    study_file = out / STUDY_FILE
    if not study_file.exists():
        used = [name for name in ("report.json", *STEPS) if (out / name).exists()]
        if used:
            raise DistmlError(
                f"{out} already holds a study ({', '.join(used)}) without its {STUDY_FILE}, so "
                "it cannot be continued. Choose another --out or delete it."
            )
        return []
    try:
        stored = json.loads(study_file.read_text(encoding="utf-8"))
        assert isinstance(stored, dict)
    except (OSError, ValueError, AssertionError):
        raise DistmlError(
            f"{study_file} is damaged, so the study in {out} cannot be continued. Choose another "
            "--out or delete it."
        ) from None
    finished = finished_steps(out)
    check_same_study(settings, stored, finished)
    return finished


def begin(settings: StudySettings, finished: list[str]) -> None:
    """Write the settings first, then clear what will be redone: partial step folders, every
    step after the first unfinished one, and the report of an earlier, unfinished attempt."""
    out = settings.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistmlError(f"cannot create the study folder {out}: {exc.strerror}.") from None
    atomic_write_json(out / STUDY_FILE, settings.model_dump(mode="json"))
    if len(finished) < len(STEPS):
        for name in ("report.json", "report.md"):
            (out / name).unlink(missing_ok=True)
    for step in STEPS[len(finished) :]:
        shutil.rmtree(out / step, ignore_errors=True)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))


def finished_result(out: Path, step: str) -> dict[str, Any]:
    """A finished step's result as the step returned it (si, prune and select results name
    their own file under "json")."""
    path = out / step / STEP_RESULTS[step]
    result = json.loads(path.read_text(encoding="utf-8"))
    return result if step in ("1-train", "2-head") else {**result, "json": str(path)}


# ----------------------------------------------------------------------------- the steps


def run_study(settings: StudySettings, *, show_progress: bool = True) -> dict[str, Any]:
    """Run steps 1-4 (see the module doc) and write the report; returns report.json's dict.
    Re-run with the same settings, it continues after the last finished step."""
    started = time.perf_counter()
    check_study(settings)
    finished = resume_point(settings)
    out, reporter = settings.out, Reporter(show_progress)
    if len(finished) == len(STEPS) and (out / "report.json").is_file():
        reporter.line(f"{out} holds a finished study; nothing to do.")
        return json.loads((out / "report.json").read_text(encoding="utf-8"))
    if finished:
        reporter.line(f"continuing the study in {out}: {', '.join(finished)} already finished")
    created = outermost_missing(out)
    existing = set() if created is not None else set(out.iterdir())
    begin(settings, finished)
    try:
        report = run_steps(settings, finished, reporter, show_progress)
    except BaseException:
        if not step_finished(out, STEPS[0]):  # nothing durable yet: leave no half-made study
            remove_created(out, created, existing)
        raise
    report["seconds"] = time.perf_counter() - started
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report, out))
    return report


def run_steps(
    settings: StudySettings, finished: list[str], reporter: Reporter, show_progress: bool
) -> dict[str, Any]:
    """Every step not in ``finished``, in order; the finished ones are read back."""
    from distml.launch import start_training

    out = settings.out
    results: dict[str, dict[str, Any]] = {}

    def step(name: str, title: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name in finished:
            results[name] = finished_result(out, name)
        else:
            reporter.line(f"study step {title}")
            results[name] = run()
        return results[name]

    run1 = step(
        "1-train",
        "1: training end to end",
        lambda: start_training(
            step_config(settings.training, out / "1-train"), show_progress=show_progress
        ),
    )
    best1 = Path(run1["checkpoints"]["best"])
    step(
        "2-head",
        "2: a new head on the frozen features",
        lambda: start_training(
            head_config(settings, load_checkpoint(best1), out / "2-head"),
            show_progress=show_progress,
        ),
    )
    step(
        "3a-si",
        "3a: SI per layer",
        lambda: measure_layers(
            si_settings(settings, best1, out / "3a-si"), show_progress=show_progress
        ),
    )
    prune = step(
        "3b-prune",
        "3b: prune, new head",
        lambda: prune_checkpoint(prune_settings(settings, best1), show_progress=show_progress),
    )
    step(
        "3c-select",
        "3c: select features, new head",
        lambda: select_checkpoint_features(
            study_selection(settings, prune, reporter), show_progress=show_progress
        ),
    )
    later = {
        "2-head": results["2-head"]["checkpoints"]["best"],
        "3b-prune": prune["head_training"]["checkpoint"],
        "3c-select": results["3c-select"]["head_training"]["checkpoint"],
    }
    for source, checkpoint in later.items():
        name = f"4-si-{source}"
        settings_4 = si_settings(settings, Path(checkpoint), out / name)
        step(
            name,
            f"4: SI per layer of {source}",
            partial(measure_layers, settings_4, show_progress=show_progress),
        )
    return study_report(settings, results, finished)


def study_selection(
    settings: StudySettings, prune: dict[str, Any], reporter: Reporter
) -> SelectSettings:
    """Step 3c's settings in the pruned model: --layer, else its last sliceable layer, where a
    --max-features above the layer's channels selects among all of them."""
    spec = ModelSpec.model_validate(prune["model_spec"])
    layer = settings.layer or default_selection_layer(spec)
    max_features = settings.max_features
    if settings.layer is None and max_features is not None:
        channels = feature_shapes(spec)[layer].channels
        if channels < max_features:
            reporter.line(f"{layer} has {channels} channels: selecting among all of them")
            max_features = channels
    checkpoint = Path(prune["head_training"]["checkpoint"])
    return select_settings(settings, checkpoint, layer, max_features)


MODEL_NAMES = {
    "1-train": "1 end to end",
    "2-head": "2 new head (frozen)",
    "3b-prune": "3 pruned + new head",
    "3c-select": "3 selected + new head",
}


def study_report(
    settings: StudySettings, results: dict[str, dict[str, Any]], reused: list[str]
) -> dict[str, Any]:
    """report.json's dict from every step's result (``reused``: the steps an earlier run of
    the same study had finished); "seconds" is filled in by the caller."""
    runs = {step: results[step] for step in ("1-train", "2-head")}
    runs |= {
        step: read_summary(results[step]["head_training"]["run_dir"])
        for step in ("3b-prune", "3c-select")
    }
    si = {"1-train": results["3a-si"]}
    si |= {step: results[f"4-si-{step}"] for step in ("2-head", "3b-prune", "3c-select")}
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
        "prune": results["3b-prune"],
        "select": results["3c-select"],
        "reused_steps": reused,
        "seconds": None,
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
        f"{r['created']}, {r['device_name']}, {r['seconds'] / 60:.1f} min in all"
        f"{reuse_note(r['reused_steps'])}. Step 1: "
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


def reuse_note(reused: list[str]) -> str:
    if not reused:
        return ""
    return f" (this run; steps {', '.join(reused)} were finished by an earlier run)"


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
