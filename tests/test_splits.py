"""The validation split a run holds out: its size, its balance, its seed."""

import pytest
import torch

from distml.data import ImageDataset, balanced_indices, make_splits


def numbered_dataset(count: int, classes: int = 10) -> ImageDataset:
    """Image i is filled with the value i and labelled i % classes: a split can be traced."""
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 2, 2, 3)
    labels = torch.arange(count) % classes
    return ImageDataset(
        train_images=images.contiguous(),
        train_labels=labels,
        test_images=images[:7].contiguous(),
        test_labels=labels[:7],
        classes=[f"c{i}" for i in range(classes)],
        name="numbered",
    )


# N * fraction with a fractional part of .5 and above: round, not truncate.
@pytest.mark.parametrize(
    ("count", "fraction", "val_size"),
    [
        (150, 0.1, 15),  # 10 classes x 15 images: 1.5 validation images per class
        (157, 0.1, 16),  # 15.7
        (150, 0.3, 45),  # 44.99999999999999 in floating point
        (155, 0.3, 46),  # 46.5: to the even neighbour, as Python rounds
        (199, 0.5, 100),  # 99.5
        (10, 0.1, 1),  # a single validation image
        (40, 0.0, 0),
    ],
)
def test_split_sizes_round_to_the_nearest_image(count: int, fraction: float, val_size: int):
    dataset = numbered_dataset(count)
    splits = make_splits(dataset, fraction, seed=4)
    val_ids = splits.val_images[:, 0, 0, 0].tolist()
    train_ids = splits.train_images[:, 0, 0, 0].tolist()
    assert len(val_ids) == val_size and len(train_ids) == count - val_size
    assert sorted(val_ids + train_ids) == list(range(count))  # each image in one split
    # every image keeps its own label
    assert splits.val_labels.tolist() == [i % 10 for i in val_ids]
    assert splits.train_labels.tolist() == [i % 10 for i in train_ids]
    per_class = torch.bincount(splits.val_labels, minlength=10)
    assert int(per_class.max() - per_class.min()) <= 1
    assert torch.equal(splits.test_images, dataset.test_images)
    assert torch.equal(splits.test_labels, dataset.test_labels)


def test_split_depends_on_the_seed_only():
    dataset = numbered_dataset(200)
    first = make_splits(dataset, 0.25, seed=1).val_images[:, 0, 0, 0].tolist()
    assert make_splits(dataset, 0.25, seed=1).val_images[:, 0, 0, 0].tolist() == first
    assert make_splits(dataset, 0.25, seed=2).val_images[:, 0, 0, 0].tolist() != first


def test_split_names_its_images_and_labels():
    splits = make_splits(numbered_dataset(60), 0.25, seed=0)
    for name in ("train", "val", "test"):
        images, labels = splits.split(name)
        assert images is getattr(splits, f"{name}_images")
        assert labels is getattr(splits, f"{name}_labels")


def test_a_class_that_runs_out_is_topped_up_by_the_others():
    """Classes of 7, 1 and 20 images, 18 wanted: 6 each is asked first, the class of 1 gives
    its one, the 5 left go to the other two until the class of 7 runs out too."""
    labels = torch.tensor([0] * 7 + [1] * 1 + [2] * 20)
    chosen = balanced_indices(labels, 18, seed=0)
    assert len(chosen) == len(set(chosen.tolist())) == 18
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [7, 1, 10]
    everything = balanced_indices(labels, 40, seed=0)  # more than there is: all of it
    assert everything.tolist() == list(range(28))


def test_which_classes_get_one_more_depends_on_the_seed_alone():
    labels = torch.arange(100) % 10
    picks = []
    for global_seed in (0, 1, 2):
        torch.manual_seed(global_seed)  # the global generator plays no part
        picks.append(torch.bincount(labels[balanced_indices(labels, 13, seed=5)]).tolist())
    assert picks[0] == picks[1] == picks[2]
    assert sorted(picks[0]) == [1] * 7 + [2] * 3
