"""Datasets in one file format, class-balanced splits, and the on-device batch pipeline.

A dataset file is a ``.safetensors`` file with ``train_images`` (uint8 N x H x W x 3),
``train_labels`` (int64 N), ``test_images``, ``test_labels`` and metadata ``classes`` (a JSON
list). CIFAR-10 is fetched with torchvision once and cached in that format; the synthetic set
is generated in memory.

Training data lives on the training device as uint8 N x 3 x H x W. Every epoch draws ONE
global permutation and one crop offset / flip per position from a generator seeded by
(seed, epoch); each rank slices its shard of every global batch. So every mode (single, dp,
ddp with any world size, with or without accumulation) sees the same global batches with
the same augmentation, and a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from distml.checkpoint import read_tensors, save_tensors
from distml.config import DataSettings, check_batch_split
from distml.errors import DistmlError

DATASET_FORMAT = "distml-dataset"
CIFAR10_CACHE = "cifar10.safetensors"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
SYNTHETIC_SEED = 20240601  # fixed: the synthetic set is the same for every run
SYNTHETIC_CLASSES = 10
IMAGE_SIZE = 32  # CIFAR-10 and the synthetic set: 32 x 32 x 3
CIFAR10_CLASSES = 10
CIFAR10_SIZES = (50_000, 10_000)  # train, test
CROP_PADDING = 4
# synthetic difficulty: a small CNN reaches ~75% test accuracy in 4 epochs on 2,000 images
SYNTHETIC_MIX = 0.9  # weight of a second, random class's pattern in each image
SYNTHETIC_NOISE = 2.0  # pixel noise, in units of the pattern's std


@dataclass(frozen=True)
class ImageDataset:
    train_images: torch.Tensor  # uint8 N x H x W x C
    train_labels: torch.Tensor  # int64 N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    name: str

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[3])


@dataclass(frozen=True)
class DatasetShape:
    """What a plan needs to know of a dataset, without its images."""

    num_classes: int
    image_size: int
    channels: int
    train_size: int
    test_size: int


# ----------------------------------------------------------------------------- file format


def write_dataset_file(path: Path, dataset: ImageDataset) -> None:
    """Write ``dataset`` in the distml format (atomically)."""
    check_dataset(dataset, str(path))
    tensors = {
        "train_images": dataset.train_images,
        "train_labels": dataset.train_labels,
        "test_images": dataset.test_images,
        "test_labels": dataset.test_labels,
    }
    metadata = {"format": DATASET_FORMAT, "classes": json.dumps(list(dataset.classes))}
    save_tensors(path, tensors, metadata)


def read_dataset_file(path: Path) -> ImageDataset:
    tensors, meta = read_tensors(path, "dataset file")
    try:
        classes = json.loads(meta["classes"])
        assert isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    except (KeyError, ValueError, AssertionError):
        raise DistmlError(
            f"dataset file {path} has no valid 'classes' metadata (a JSON list of class "
            "names). See the README section 'Your own dataset' for the format."
        ) from None
    missing = [
        k
        for k in ("train_images", "train_labels", "test_images", "test_labels")
        if k not in tensors
    ]
    if missing:
        raise DistmlError(
            f"dataset file {path} lacks the tensors {', '.join(missing)}. A distml dataset "
            "holds train_images, train_labels, test_images and test_labels."
        )
    dataset = ImageDataset(
        tensors["train_images"],
        tensors["train_labels"],
        tensors["test_images"],
        tensors["test_labels"],
        classes,
        str(path),
    )
    check_dataset(dataset, str(path))
    return dataset


def check_dataset(dataset: ImageDataset, where: str) -> None:
    """Shapes, dtypes and label ranges; a problem is a DistmlError naming the tensor."""
    problems = []
    for split in ("train", "test"):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            problems.append(
                f"{split}_images must be uint8 N x H x W x 3 (or x 1), got "
                f"{str(images.dtype).removeprefix('torch.')} {tuple(images.shape)}"
            )
        elif images.shape[1] != images.shape[2]:
            problems.append(f"{split}_images must be square, got {tuple(images.shape[1:3])}")
        if labels.dtype != torch.int64 or labels.ndim != 1:
            problems.append(
                f"{split}_labels must be int64 of shape (N,), got "
                f"{str(labels.dtype).removeprefix('torch.')} {tuple(labels.shape)}"
            )
        elif images.ndim == 4 and labels.shape[0] != images.shape[0]:
            problems.append(
                f"{split}_labels has {labels.shape[0]} entries for {images.shape[0]} images"
            )
        elif labels.numel() and (labels.min() < 0 or labels.max() >= len(dataset.classes)):
            problems.append(
                f"{split}_labels must lie in 0..{len(dataset.classes) - 1} "
                f"({len(dataset.classes)} classes)"
            )
        elif labels.numel() == 0:
            problems.append(f"{split} split is empty")
    if not problems and dataset.train_images.shape[1:] != dataset.test_images.shape[1:]:
        problems.append("train and test images differ in shape")
    if len(dataset.classes) < 2:
        problems.append("a classification dataset needs at least 2 classes")
    if problems:
        raise DistmlError(f"dataset {where} is not usable: " + "; ".join(problems) + ".")


# ----------------------------------------------------------------------------- sources


def load_dataset(settings: DataSettings) -> ImageDataset:
    """The dataset the settings name: ``cifar10``, ``synthetic`` or a dataset file."""
    if settings.dataset == "cifar10":
        return load_cifar10(settings.data_dir)
    if settings.dataset == "synthetic":
        return make_synthetic(settings.synthetic_train_size, settings.synthetic_test_size)
    return read_dataset_file(Path(settings.dataset))


def dataset_shape(settings: DataSettings) -> DatasetShape:
    """The shape of the dataset the settings name, without downloading or generating it (a
    dataset file is read and checked)."""
    if settings.dataset == "cifar10":
        return DatasetShape(CIFAR10_CLASSES, IMAGE_SIZE, 3, *CIFAR10_SIZES)
    if settings.dataset == "synthetic":
        sizes = (settings.synthetic_train_size, settings.synthetic_test_size)
        return DatasetShape(SYNTHETIC_CLASSES, IMAGE_SIZE, 3, *sizes)
    data = read_dataset_file(Path(settings.dataset))
    sizes = (len(data.train_labels), len(data.test_labels))
    return DatasetShape(len(data.classes), data.image_size, data.channels, *sizes)


def load_cifar10(data_dir: Path) -> ImageDataset:
    """CIFAR-10 from the cache file, else from torchvision (downloading once) into the cache.
    A failed download removes what it created, so no empty or half-filled folder is left."""
    data_dir = Path(data_dir)
    check_data_dir(data_dir)
    cache = data_dir / CIFAR10_CACHE
    if cache.exists():  # named like a fresh download, so reports say "cifar10" every time
        return dataclasses.replace(read_dataset_file(cache), name="cifar10")
    created = outermost_missing(data_dir)
    existing = set() if created is not None else set(data_dir.iterdir())
    try:
        from torchvision.datasets import CIFAR10

        train = CIFAR10(str(data_dir), train=True, download=True)
        test = CIFAR10(str(data_dir), train=False, download=True)
    except BaseException as exc:  # torchvision raises URLError, RuntimeError, OSError, ...
        remove_created(data_dir, created, existing)
        if not isinstance(exc, Exception):
            raise
        raise DistmlError(
            f"CIFAR-10 is not in {data_dir} and could not be downloaded ({type(exc).__name__}: "
            f"{exc}). Offline, put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) into {data_dir}/, or "
            f"a distml cache file at {cache}, or point --data-dir at the folder that holds one."
        ) from None
    dataset = ImageDataset(
        torch.from_numpy(train.data).contiguous(),
        torch.tensor(train.targets, dtype=torch.int64),
        torch.from_numpy(test.data).contiguous(),
        torch.tensor(test.targets, dtype=torch.int64),
        list(train.classes),
        "cifar10",
    )
    write_dataset_file(cache, dataset)
    return dataset


def check_data_dir(data_dir: Path) -> None:
    """The data folder, or its nearest existing parent, must be a folder, not a file."""
    for folder in (data_dir, *data_dir.parents):
        if not folder.exists():
            continue
        if folder.is_dir():
            return
        inside = "" if folder == data_dir else f" lies inside {folder}, which"
        raise DistmlError(
            f"--data-dir {data_dir}{inside} is a file, not a folder. Give the folder that "
            f"holds (or is to hold) the datasets, e.g. --data-dir data (the setting "
            "data.data_dir)."
        )


def outermost_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None if
    ``folder`` exists): what creating ``folder`` would create."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def remove_created(data_dir: Path, created: Path | None, existing: set[Path]) -> None:
    """Undo a failed download: remove the folders it created, or in a folder that existed,
    the entries that were not there before (a partial archive, a half-extracted folder)."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for entry in set(data_dir.iterdir()) - existing:
        # best effort: what could not be removed must not hide why the download failed
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def make_synthetic(
    train_size: int, test_size: int, num_classes: int = SYNTHETIC_CLASSES
) -> ImageDataset:
    """A deterministic, learnable, CIFAR-shaped set: each class is a smooth colour pattern
    (a few random plane waves), seen shifted, rescaled, mixed with another class's pattern
    and noised, so a CNN must learn shapes rather than a single pixel."""
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    size = IMAGE_SIZE
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"))
    prototypes = []
    for _ in range(num_classes):
        pattern = torch.zeros(3, size, size)
        for _ in range(3):
            angle = torch.rand(1, generator=gen) * math.pi
            freq = 1 + torch.rand(1, generator=gen) * 3
            phase = torch.rand(1, generator=gen) * 2 * math.pi
            colour = torch.randn(3, 1, 1, generator=gen)
            direction = torch.cat([torch.cos(angle), torch.sin(angle)]).view(2, 1, 1)
            wave = torch.sin((grid * direction).sum(0) * freq * 2 * math.pi / size + phase)
            pattern += colour * wave
        prototypes.append(pattern / pattern.std())
    prototypes_t = torch.stack(prototypes)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(count) % num_classes
        labels = labels[torch.randperm(count, generator=gen)]
        other = torch.randint(0, num_classes, (count,), generator=gen)
        images = prototypes_t[labels] + SYNTHETIC_MIX * prototypes_t[other]
        images = images * (0.6 + 0.6 * torch.rand(count, 1, 1, 1, generator=gen))
        images = images + 0.5 * torch.randn(count, 3, 1, 1, generator=gen)  # colour cast
        shifts = torch.randint(-4, 5, (count, 2), generator=gen)
        for i in range(count):
            images[i] = torch.roll(images[i], shifts=tuple(shifts[i].tolist()), dims=(1, 2))
        images = images + SYNTHETIC_NOISE * torch.randn(images.shape, generator=gen)
        pixels = (128 + 48 * images).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous(), labels.to(torch.int64)

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    classes = [f"pattern{k}" for k in range(num_classes)]
    return ImageDataset(train_images, train_labels, test_images, test_labels, classes, "synthetic")


# ----------------------------------------------------------------------------- splits


def balanced_indices(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` indices with equal per-class counts (+-1; classes too small give what they
    have and the rest is spread over the others), drawn with ``seed``. Sorted."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    available = {c: int((labels == c).sum()) for c in classes}
    take = dict.fromkeys(classes, 0)
    remaining = count
    while remaining > 0:
        open_classes = [c for c in classes if take[c] < available[c]]
        if not open_classes:
            break
        order = torch.randperm(len(open_classes), generator=gen).tolist()
        share, extra = divmod(remaining, len(open_classes))
        for rank, i in enumerate(order):
            c = open_classes[i]
            want = share + (1 if rank < extra else 0)
            got = min(want, available[c] - take[c])
            take[c] += got
            remaining -= got
    chosen = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=gen)[: take[c]]])
    return torch.cat(chosen).sort().values


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): exactly round(N * val_fraction) validation samples,
    class-balanced. Both sorted."""
    n_val = round(len(labels) * val_fraction)
    val = balanced_indices(labels, n_val, seed) if n_val else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


@dataclass(frozen=True)
class Splits:
    """The three splits of a run, on the CPU, images N x H x W x C uint8."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def make_splits(dataset: ImageDataset, val_fraction: float, seed: int) -> Splits:
    train_idx, val_idx = stratified_split(dataset.train_labels, val_fraction, seed)
    return Splits(
        dataset.train_images[train_idx],
        dataset.train_labels[train_idx],
        dataset.train_images[val_idx],
        dataset.train_labels[val_idx],
        dataset.test_images,
        dataset.test_labels,
    )


def channel_stats(images: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 N x H x W x C images."""
    total = torch.zeros(images.shape[3], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        pixels = chunk.reshape(-1, images.shape[3]).to(torch.float64) / 255
        total += pixels.sum(0)
        total_sq += (pixels * pixels).sum(0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return {"mean": mean.tolist(), "std": std.tolist()}


# ----------------------------------------------------------------------------- device batches


class Normalize:
    """uint8 N x C x H x W on any device -> normalised float32."""

    def __init__(self, stats: dict[str, list[float]], device: torch.device):
        mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device) * 255
        std = torch.tensor(stats["std"], dtype=torch.float32, device=device) * 255
        self.scale = (1 / std).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.float(), self.scale)


def to_device_nchw(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def random_crop_flip(
    images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Batched random crop (zero padding, like torchvision's RandomCrop(padding=4)) and
    horizontal flip of uint8 B x C x H x W images; shifts B x 2 in [0, 2 * padding]."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = shifts[:, 0:1] + torch.arange(height, device=images.device)  # B x H
    cols = shifts[:, 1:2] + torch.arange(width, device=images.device)  # B x W
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reverses the column order
    b = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
    c = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return padded[b, c, rows.view(batch, 1, height, 1), cols.view(batch, 1, 1, width)]


class TrainBatches:
    """The training split on the device; yields, per optimizer step, this rank's
    micro-batches of the step's global batch. Full global batches only (the remainder of
    an epoch is dropped), so every mode sees the same batches."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        normalize: Normalize,
        batch_size: int,
        accum_steps: int,
        rank: int,
        world_size: int,
        augment: bool,
        seed: int,
        device: torch.device,
        channels_last: bool = False,
    ):
        check_batch_split(batch_size, world_size, accum_steps, DistmlError)
        if len(labels) < batch_size:
            raise DistmlError(
                f"the training split has {len(labels)} images, fewer than one batch of "
                f"{batch_size}; lower --batch-size or use more data."
            )
        self.images = to_device_nchw(images, device)
        self.labels = labels.to(device)
        self.normalize = normalize
        self.batch_size = batch_size
        self.micro_size = batch_size // (world_size * accum_steps)
        self.accum_steps = accum_steps
        self.rank = rank
        self.world_size = world_size
        self.augment = augment
        self.seed = seed
        self.device = device
        self.channels_last = channels_last

    @property
    def steps_per_epoch(self) -> int:
        return len(self.labels) // self.batch_size

    def epoch(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        gen = epoch_generator(self.seed, epoch)
        count = len(self.labels)
        order = torch.randperm(count, generator=gen).to(self.device)
        shifts = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=gen)
        flips = torch.rand(count, generator=gen) < 0.5
        shifts, flips = shifts.to(self.device), flips.to(self.device)
        shard = self.batch_size // self.world_size
        for step in range(start_step, self.steps_per_epoch):
            first = step * self.batch_size + self.rank * shard
            micro = []
            for k in range(self.accum_steps):
                lo = first + k * self.micro_size
                positions = slice(lo, lo + self.micro_size)
                micro.append(self.make_batch(order[positions], shifts[positions], flips[positions]))
            yield micro

    def make_batch(
        self, index: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images[index]
        if self.augment:
            images = random_crop_flip(images, shifts, flips, CROP_PADDING)
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[index]


def shard_range(count: int, rank: int, world_size: int) -> range:
    """Contiguous, nearly equal shards (sizes differ by at most one)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def eval_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    normalize: Normalize,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of an evaluation split (uint8 N x C x H x W, already on the device:
    see ``to_device_nchw``), in order, normalised, no augmentation."""
    shard = shard_range(len(labels), rank, world_size)
    for lo in range(shard.start, shard.stop, batch_size):
        hi = min(lo + batch_size, shard.stop)
        x = normalize(images[lo:hi])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, labels[lo:hi].to(images.device, non_blocking=True)
