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


def batches_for(
    world: int,
    rank: int,
    accum: int,
    dataset: ImageDataset,
    augment: bool = True,
    channels_last: bool | None = None,
):
    """TrainBatches on the CPU; ``channels_last`` left out means TrainBatches' own default."""
    stats = channel_stats(dataset.train_images)
    device = torch.device("cpu")
    layout = {} if channels_last is None else {"channels_last": channels_last}
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
        **layout,
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


def marker_dataset(count: int) -> ImageDataset:
    """``count`` black images with one white pixel at row 10, column 5."""
    images = torch.zeros(count, 32, 32, 3, dtype=torch.uint8)
    images[:, 10, 5, :] = 255
    labels = torch.arange(count) % 10
    return ImageDataset(images, labels, images[:2], labels[:2], [str(k) for k in range(10)], "m")


def marker_positions(loader: TrainBatches) -> set[tuple[int, int]]:
    positions = set()
    for ((x, _),) in loader.epoch(0):
        for image in x:
            rows, cols = torch.nonzero(image[0] > 0.5, as_tuple=True)
            assert len(rows) == 1  # the pixel moves, it is never cropped away or doubled
            positions.add((int(rows[0]), int(cols[0])))
    return positions


def test_crops_shift_by_up_to_the_padding_each_way_and_half_the_images_flip():
    """Like torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip: every offset from
    -4 to +4 on each axis occurs, and a flipped image mirrors its columns."""
    dataset = marker_dataset(288)
    plain = marker_positions(batches_for(1, 0, 1, dataset, augment=False))
    assert plain == {(10, 5)}
    moved = marker_positions(batches_for(1, 0, 1, dataset))
    rows = {r for r, _ in moved}
    assert rows == set(range(6, 15))  # row 10 shifted by -4..+4
    unflipped = {c for _, c in moved if c < 16}
    flipped = {c for _, c in moved if c >= 16}
    assert unflipped == set(range(1, 10))  # column 5 shifted by -4..+4
    assert flipped == {31 - c for c in range(1, 10)}  # the same, mirrored


def test_batches_come_as_the_model_wants_them():
    dataset = make_synthetic(32, 10)
    (x, y), *_ = next(batches_for(1, 0, 1, dataset).epoch(0))  # NCHW unless asked
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and x.is_contiguous()
    assert y.dtype == torch.int64
    (x, _), *_ = next(batches_for(1, 0, 1, dataset, channels_last=True).epoch(0))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_a_training_split_smaller_than_one_batch_or_a_batch_that_does_not_split():
    assert batches_for(1, 0, 1, make_synthetic(16, 10)).steps_per_epoch == 1
    with pytest.raises(DistmlError) as err:
        batches_for(1, 0, 1, make_synthetic(15, 10))
    assert str(err.value) == (
        "the training split has 15 images, fewer than one batch of 16; lower --batch-size or "
        "use more data."
    )
    with pytest.raises(DistmlError, match="batch size 16 cannot be split evenly over 3 rank"):
        batches_for(3, 0, 1, make_synthetic(48, 10))


def test_eval_batches_without_ranks_are_the_whole_split_in_order_normalised():
    dataset = make_synthetic(20, 11)
    images = to_device_nchw(dataset.test_images, "cpu")
    norm = Normalize(channel_stats(dataset.train_images), torch.device("cpu"))
    batches = list(eval_batches(images, dataset.test_labels, normalize=norm, batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 3]
    assert torch.equal(torch.cat([x for x, _ in batches]), norm(images))
    assert torch.equal(torch.cat([y for _, y in batches]), dataset.test_labels)
    assert all(x.is_contiguous() for x, _ in batches)
    last = list(eval_batches(images, dataset.test_labels, normalize=norm, batch_size=4,
                             rank=1, world_size=2, channels_last=True))  # fmt: skip
    assert torch.equal(torch.cat([y for _, y in last]), dataset.test_labels[6:])
    assert torch.equal(torch.cat([x for x, _ in last]), norm(images[6:]))
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in last)


def test_an_epoch_started_mid_way_yields_the_rest_of_the_same_epoch():
    """--resume from a mid-epoch save: the steps left, with the same images and crops."""
    loader = batches_for(1, 0, 1, make_synthetic(96, 10))
    whole = list(loader.epoch(3))
    rest = list(loader.epoch(3, start_step=4))
    assert len(whole) == 6 and len(rest) == 2
    for (a,), (b,) in zip(whole[4:], rest, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_channel_stats_over_many_chunks_match_float64_numpy():
    """More images than one 4,096-image chunk, not square: every chunk counts, and the
    variance is computed in float64 (float32 loses digits on a full CIFAR-10)."""
    import numpy as np

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (9000, 2, 3, 3), dtype=np.uint8)
    images[:4096] //= 2  # the first chunk differs from the rest
    stats = channel_stats(torch.from_numpy(images))
    pixels = images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-9)
