from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distml.config import DataSettings
from distml.data import (
    ImageDataset,
    Normalize,
    TrainBatches,
    balanced_indices,
    channel_stats,
    eval_batches,
    load_dataset,
    make_synthetic,
    random_crop_flip,
    read_dataset_file,
    shard_range,
    stratified_split,
    to_device_nchw,
    write_dataset_file,
)
from distml.errors import DistmlError


def test_synthetic_is_deterministic_and_cifar_shaped():
    a = make_synthetic(100, 30)
    b = make_synthetic(100, 30)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape == (100, 32, 32, 3) and a.train_images.dtype == torch.uint8
    assert a.train_labels.dtype == torch.int64 and len(a.classes) == 10
    assert torch.bincount(a.train_labels).tolist() == [10] * 10


@pytest.mark.parametrize(("count", "fraction"), [(1000, 0.1), (1003, 0.1), (997, 0.25), (50, 0.5)])
def test_split_is_exact_and_class_balanced(count: int, fraction: float):
    labels = torch.arange(count) % 10
    train, val = stratified_split(labels, fraction, seed=3)
    assert len(val) == round(count * fraction)
    assert len(train) + len(val) == count
    assert not set(train.tolist()) & set(val.tolist())
    per_class = torch.bincount(labels[val], minlength=10)
    assert per_class.max() - per_class.min() <= 1


def test_split_is_seeded():
    labels = torch.arange(500) % 10
    assert torch.equal(stratified_split(labels, 0.1, 1)[1], stratified_split(labels, 0.1, 1)[1])
    assert not torch.equal(stratified_split(labels, 0.1, 1)[1], stratified_split(labels, 0.1, 2)[1])


def test_balanced_indices_with_a_small_class():
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    chosen = balanced_indices(labels, 30, seed=0)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert sum(counts) == 30 and counts[0] == 3 and abs(counts[1] - counts[2]) <= 1


def reference_crop_flip(image, shift, flip, padding=4):
    padded = F.pad(image, (padding,) * 4)
    dy, dx = shift.tolist()
    out = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
    return out.flip(2) if flip else out


def test_batched_crop_and_flip_match_a_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen)
    shifts = torch.randint(0, 9, (16, 2), generator=gen)
    flips = torch.rand(16, generator=gen) < 0.5
    out = random_crop_flip(images, shifts, flips, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(16):
        assert torch.equal(out[i], reference_crop_flip(images[i], shifts[i], bool(flips[i])))


def batches_for(world: int, rank: int, accum: int, dataset: ImageDataset, augment: bool = True):
    stats = channel_stats(dataset.train_images)
    device = torch.device("cpu")
    return TrainBatches(
        dataset.train_images,
        dataset.train_labels,
        normalize=Normalize(stats, device),
        batch_size=16,
        accum_steps=accum,
        rank=rank,
        world_size=world,
        augment=augment,
        seed=5,
        device=device,
    )


def test_rank_shards_and_micro_batches_tile_the_global_batch():
    dataset = make_synthetic(100, 10)
    single = list(batches_for(1, 0, 1, dataset).epoch(1))
    ranks = [list(batches_for(2, r, 2, dataset).epoch(1)) for r in range(2)]
    assert len(single) == 100 // 16  # full batches only
    for step, (global_batch,) in enumerate(single):
        parts = [mb for r in range(2) for mb in ranks[r][step]]
        assert all(len(y) == 4 for _, y in parts)
        assert torch.equal(torch.cat([x for x, _ in parts]), global_batch[0])
        assert torch.equal(torch.cat([y for _, y in parts]), global_batch[1])


def test_epochs_differ_and_repeat():
    dataset = make_synthetic(64, 10)
    loader = batches_for(1, 0, 1, dataset)
    first = [b[0][1] for b in loader.epoch(1)]
    again = [b[0][1] for b in loader.epoch(1)]
    other = [b[0][1] for b in loader.epoch(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_normalisation_uses_training_stats():
    dataset = make_synthetic(200, 10)
    stats = channel_stats(dataset.train_images)
    x = Normalize(stats, torch.device("cpu"))(to_device_nchw(dataset.train_images, "cpu"))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3


def test_eval_shards_cover_the_split_once():
    assert [len(shard_range(11, r, 3)) for r in range(3)] == [4, 4, 3]
    dataset = make_synthetic(20, 11)
    images = to_device_nchw(dataset.test_images, "cpu")
    norm = Normalize(channel_stats(dataset.train_images), torch.device("cpu"))
    seen = [
        y
        for r in range(3)
        for _, y in eval_batches(
            images, dataset.test_labels, normalize=norm, batch_size=2, rank=r, world_size=3
        )
    ]
    assert torch.equal(torch.cat(seen), dataset.test_labels)


def test_dataset_file_round_trip(tmp_path: Path):
    dataset = make_synthetic(40, 20)
    path = tmp_path / "mine.safetensors"
    write_dataset_file(path, dataset)
    back = load_dataset(DataSettings(dataset=str(path)))
    assert back.classes == dataset.classes
    assert torch.equal(back.train_images, dataset.train_images)
    assert torch.equal(back.test_labels, dataset.test_labels)


def test_readme_numpy_recipe(tmp_path: Path):
    """The README shows how to write a dataset from numpy; keep that snippet working."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path = tmp_path / "from_numpy.safetensors"
    save_file(
        {
            "train_images": rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
            "train_labels": rng.integers(0, 3, 50).astype(np.int64),
            "test_images": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
            "test_labels": rng.integers(0, 3, 20).astype(np.int64),
        },
        str(path),
        metadata={"classes": json.dumps(["cat", "dog", "bird"])},
    )
    assert read_dataset_file(path).classes == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_images": torch.zeros(4, 32, 32, 3, dtype=torch.float32)}, "must be uint8"),
        ({"train_labels": torch.zeros(7, dtype=torch.int64)}, "7 entries for 4 images"),
        ({"train_labels": torch.full((4,), 12, dtype=torch.int64)}, "must lie in 0..9"),
        ({"test_labels": torch.zeros(2, dtype=torch.int32)}, "must be int64"),
    ],
)
def test_bad_dataset_tensors_are_named(tmp_path: Path, change, message):
    from distml.checkpoint import save_tensors

    tensors = {
        "train_images": torch.zeros(4, 32, 32, 3, dtype=torch.uint8),
        "train_labels": torch.zeros(4, dtype=torch.int64),
        "test_images": torch.zeros(2, 32, 32, 3, dtype=torch.uint8),
        "test_labels": torch.zeros(2, dtype=torch.int64),
    } | change
    path = tmp_path / "bad.safetensors"
    save_tensors(path, tensors, {"classes": '["a","b","c","d","e","f","g","h","i","j"]'})
    with pytest.raises(DistmlError, match=message):
        read_dataset_file(path)


def test_missing_and_damaged_dataset_files(tmp_path: Path):
    with pytest.raises(DistmlError, match="does not exist"):
        read_dataset_file(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all" * 3)
    with pytest.raises(DistmlError, match="cannot be read as safetensors"):
        read_dataset_file(junk)


def test_cifar10_offline_says_where_to_put_the_archive(tmp_path: Path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DistmlError) as err:
        load_dataset(DataSettings(dataset="cifar10", data_dir=tmp_path))
    assert "cifar-10-python.tar.gz" in str(err.value) and str(tmp_path) in str(err.value)
