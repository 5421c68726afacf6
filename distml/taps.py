"""Per-layer feature taps and the per-layer Separation Index (``distml si``).

A tap is the output of one named layer of a model's feature extractor (every conv block's
conv+norm+activation output, every pooling output, and for the cnn every residual unit's output,
after the sum), measured on a fixed class-balanced subset of a split:

* subset: ``data.balanced_indices`` over the split's labels, ``round(fraction * N)`` samples,
  drawn with the checkpoint's training seed, from the splits exactly as in its training run
  (so "train" is the training split without the validation images); every split uses the
  same fraction and seed;
* model in eval mode (BatchNorm running statistics, no dropout), no gradients, float32 with
  TF32 off whatever precision the model was trained in, images normalised with the
  checkpoint's normalisation, no augmentation;
* features are kept on the device as float32 (N, C, H, W), flattened by the SI functions.

Memory: full-width VGG16 at N = 4,500 has 6 GB of feature outputs in all (conv1_x alone are
1.2 GB each). Layers are taken in consecutive groups of at most ``budget_bytes`` (4 GiB by
default); each group costs one forward pass over the subset, stopped at the group's last
layer, and its features are handed out one layer at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distml.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from distml.config import LayerTapSettings, SiSettings
from distml.data import Normalize, balanced_indices, to_device_nchw
from distml.dist import device_name, resolve_device
from distml.errors import DistmlError
from distml.evaluate import checkpoint_data
from distml.files import atomic_write_json, check_out_dir, default_out
from distml.models import Classifier, feature_plan, feature_shapes, iter_feature_outputs
from distml.plots import plot_layer_indices
from distml.progress import Reporter
from distml.si import center_separation_index, separation_index, tf32_disabled

DEFAULT_BUDGET_BYTES = 4 * 2**30
INDEX_FUNCTIONS = {"si": separation_index, "center-si": center_separation_index}


@dataclass(frozen=True)
class TapSubset:
    """The measured images of one split, on the device."""

    split: str
    images: torch.Tensor  # uint8 N x C x H x W
    labels: torch.Tensor  # int64 N
    indices: torch.Tensor  # positions within the split (CPU), sorted
    split_size: int


@dataclass(frozen=True)
class TapSource:
    """A checkpoint's model, ready to be tapped on its subsets."""

    ckpt: Checkpoint
    model: Classifier  # eval mode, float32, on ``device``
    normalize: Normalize
    device: torch.device
    batch_size: int
    dataset: str
    seed: int
    fraction: float
    subsets: dict[str, TapSubset]

    def layer_names(self) -> list[str]:
        return [layer.name for layer in feature_plan(self.ckpt.spec)]


def subset_of_split(
    split: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    fraction: float,
    seed: int,
    device: torch.device,
) -> TapSubset:
    """``round(fraction * N)`` class-balanced samples of a split (images N x H x W x C)."""
    count = round(len(labels) * fraction)
    if count < 2:
        raise DistmlError(
            f"--fraction {fraction} of the {split} split ({len(labels)} images) is {count} "
            "sample(s); the Separation Index needs at least 2. Use a larger --fraction."
        )
    index = balanced_indices(labels, count, seed)
    return TapSubset(
        split,
        to_device_nchw(images[index], device),
        labels[index].to(device),
        index,
        len(labels),
    )


def open_taps(
    ckpt: Checkpoint, settings: LayerTapSettings, splits: Sequence[str], reporter: Reporter
) -> TapSource:
    """Load the checkpoint's data (checking classes and input shape), draw the subsets and
    put the model on the device."""
    device = resolve_device(settings.device)
    data, all_splits = checkpoint_data(ckpt, settings.dataset, settings.data_dir)
    seed = ckpt.seed
    subsets = {}
    for split in splits:
        images, labels = all_splits.split(split)
        if len(labels) == 0:
            raise DistmlError(
                f"the {split} split is empty (the checkpoint was trained with val_fraction 0); "
                "measure train and test instead (--splits train,test)."
            )
        subsets[split] = subset_of_split(split, images, labels, settings.fraction, seed, device)
    model = model_from_checkpoint(ckpt).to(device).eval()
    batch_size = settings.batch_size or int(ckpt.train_setting("eval_batch_size", 1024))
    sizes = ", ".join(f"{len(s.labels)} of {s.split_size} {s.split}" for s in subsets.values())
    reporter.line(f"tapping {ckpt.path} on {data.name} ({sizes} images) on {device_name(device)}")
    return TapSource(
        ckpt=ckpt,
        model=model,
        normalize=Normalize(ckpt.normalization, device),
        device=device,
        batch_size=batch_size,
        dataset=data.name,
        seed=seed,
        fraction=settings.fraction,
        subsets=subsets,
    )


def layer_groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of layer positions whose sizes add up to at most ``budget`` bytes
    (a layer larger than the budget forms a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= budget:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


@torch.no_grad()
def iter_layer_features(
    source: TapSource,
    split: str,
    layers: Sequence[str] | None = None,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 N x C x H x W features on the device) for each wanted layer, in network
    order; see the module doc for the memory plan."""
    subset = source.subsets[split]
    shapes = feature_shapes(source.ckpt.spec)
    wanted = [name for name in shapes if layers is None or name in layers]
    n = len(subset.labels)
    sizes = [4 * n * shapes[name].channels * shapes[name].size ** 2 for name in wanted]
    for group in layer_groups(sizes, budget_bytes):
        names = [wanted[i] for i in group]
        buffers = {
            name: torch.empty(
                (n, shapes[name].channels, shapes[name].size, shapes[name].size),
                device=source.device,
            )
            for name in names
        }
        with tf32_disabled():
            for lo in range(0, n, source.batch_size):
                hi = min(n, lo + source.batch_size)
                x = source.normalize(subset.images[lo:hi])
                for name, output in iter_feature_outputs(source.model, x):
                    if name in buffers:
                        buffers[name][lo:hi] = output.float()
                    if name == names[-1]:
                        break  # the layers after this group are not needed in this pass
        for name in names:
            yield name, buffers.pop(name)


def layer_features(source: TapSource, split: str, layer: str) -> torch.Tensor:
    """One layer's features on a split's subset."""
    return next(iter_layer_features(source, split, [layer]))[1]


def index_curve(
    source: TapSource, split: str, criteria: Sequence[str], reporter: Reporter
) -> dict[str, dict[str, float]]:
    """{layer: {criterion: index}} on a split's subset, for every feature layer."""
    labels = source.subsets[split].labels
    curve: dict[str, dict[str, float]] = {}
    layers = source.layer_names()
    with reporter.task(f"SI per layer ({split})", len(layers)) as task:
        for name, features in iter_layer_features(source, split):
            curve[name] = {c: INDEX_FUNCTIONS[c](features, labels) for c in criteria}
            del features  # free this layer before the next one is handed out
            task.advance(1, status=name)
    return curve


# ----------------------------------------------------------------------------- distml si


def layer_table_rows(
    source: TapSource, curves: dict[str, dict[str, dict[str, float]]]
) -> list[dict[str, Any]]:
    """si.json's ``layers``: shape and both indices per split, one entry per layer."""
    shapes = feature_shapes(source.ckpt.spec)
    rows = []
    for layer in feature_plan(source.ckpt.spec):
        shape = shapes[layer.name]
        rows.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "channels": shape.channels,
                "size": shape.size,
                "features": shape.channels * shape.size**2,
                "si": {split: curve[layer.name]["si"] for split, curve in curves.items()},
                "center_si": {
                    split: curve[layer.name]["center-si"] for split, curve in curves.items()
                },
            }
        )
    return rows


def measure_layers(settings: SiSettings, *, show_progress: bool = True) -> dict[str, Any]:
    """``distml si``: SI and Center SI of every feature layer on each split's subset; writes
    ``si.json`` and ``si.png`` (both indices per layer, every split) and returns the report."""
    started = time.perf_counter()
    out = settings.out or default_out(settings.checkpoint, "si")
    check_out_dir(out, overwrite=settings.overwrite)
    reporter = Reporter(show_progress)
    ckpt = load_checkpoint(settings.checkpoint)
    source = open_taps(ckpt, settings, settings.splits, reporter)
    curves = {
        split: index_curve(source, split, ("si", "center-si"), reporter)
        for split in settings.splits
    }
    layers = layer_table_rows(source, curves)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "si.png"
    plot_layer_indices(
        [row["name"] for row in layers],
        {
            "SI": {s: [r["si"][s] for r in layers] for s in settings.splits},
            "Center SI": {s: [r["center_si"][s] for r in layers] for s in settings.splits},
        },
        plot,
        f"{settings.checkpoint.name}: separation per layer ({100 * settings.fraction:g}% "
        "class-balanced subsets)",
    )
    report = {
        "checkpoint": str(settings.checkpoint),
        "architecture": ckpt.spec.arch,
        "dataset": source.dataset,
        "fraction": settings.fraction,
        "seed": source.seed,
        "samples": {split: len(s.labels) for split, s in source.subsets.items()},
        "splits": list(settings.splits),
        "device_name": device_name(source.device),
        "layers": layers,
        "plot": str(plot),
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "si.json", report)
    report["json"] = str(out / "si.json")
    return report
