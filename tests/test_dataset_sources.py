"""Where a run's images come from: dataset files (every message word for word), the shape a
plan reads without loading the images, and CIFAR-10 through torchvision (a fake one here:
nothing is downloaded), with the cleanup after a failed download."""

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from distml.checkpoint import read_tensors, save_tensors
from distml.config import DataSettings
from distml.data import (
    CIFAR10_CACHE,
    DatasetShape,
    ImageDataset,
    check_dataset,
    dataset_shape,
    load_cifar10,
    load_dataset,
    make_synthetic,
    read_dataset_file,
    write_dataset_file,
)
from distml.errors import DistmlError

TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


def tiny(classes: int = 2, **change: torch.Tensor) -> ImageDataset:
    """4 train and 2 test images of 8 x 8 x 3, labels 0 and 1; ``change`` replaces tensors."""
    tensors = {
        "train_images": torch.zeros(4, 8, 8, 3, dtype=torch.uint8),
        "train_labels": torch.tensor([0, 1, 0, 1]),
        "test_images": torch.zeros(2, 8, 8, 3, dtype=torch.uint8),
        "test_labels": torch.tensor([1, 0]),
    } | change
    return ImageDataset(**tensors, classes=[f"c{k}" for k in range(classes)], name="tiny")


U8 = torch.uint8
# tensors are made inside the test, not at import: a mutation run forks its workers from a
# process that imported this module, and a fork after torch ran can hang
BAD_DATASETS = [
    (
        lambda: {"train_images": torch.zeros(4, 8, 8, 3)},
        "train_images must be uint8 N x H x W x 3 (or x 1), got float32 (4, 8, 8, 3)",
    ),
    (
        lambda: {"test_images": torch.zeros(2, 8, 8, 2, dtype=U8)},
        "test_images must be uint8 N x H x W x 3 (or x 1), got uint8 (2, 8, 8, 2)",
    ),
    (
        lambda: {"train_images": torch.zeros(4, 8, 8, 3, 1, dtype=U8)},
        "train_images must be uint8 N x H x W x 3 (or x 1), got uint8 (4, 8, 8, 3, 1)",
    ),
    (
        lambda: {"train_images": torch.zeros(4, 8, 6, 3, dtype=U8)},
        "train_images must be square, got (8, 6)",
    ),
    (
        lambda: {"train_labels": torch.zeros(4, dtype=torch.int32)},
        "train_labels must be int64 of shape (N,), got int32 (4,)",
    ),
    (
        lambda: {"test_labels": torch.zeros(2, 1, dtype=torch.int64)},
        "test_labels must be int64 of shape (N,), got int64 (2, 1)",
    ),
    (lambda: {"train_labels": torch.tensor([0, 1, 0])}, "train_labels has 3 entries for 4 images"),
    (
        lambda: {"train_labels": torch.tensor([0, 1, 2, 1])},
        "train_labels must lie in 0..1 (2 classes)",
    ),
    (lambda: {"test_labels": torch.tensor([-1, 0])}, "test_labels must lie in 0..1 (2 classes)"),
    (
        lambda: {
            "test_images": torch.zeros(0, 8, 8, 3, dtype=U8),
            "test_labels": torch.zeros(0, dtype=torch.int64),
        },
        "test split is empty",
    ),
    (
        lambda: {"test_images": torch.zeros(2, 6, 6, 3, dtype=U8)},
        "train and test images differ in shape",
    ),
    (
        # a problem of their own hides the shapes' difference (which would only repeat it)
        lambda: {
            "test_images": torch.zeros(2, 6, 6, 3, dtype=U8),
            "test_labels": torch.tensor([0]),
        },
        "test_labels has 1 entries for 2 images",
    ),
    (
        lambda: {"train_labels": torch.zeros(4), "test_images": torch.zeros(2, 8, 9, 3, dtype=U8)},
        # every problem, the train split's first
        "train_labels must be int64 of shape (N,), got float32 (4,); test_images must be square, "
        "got (8, 9)",
    ),
]


@pytest.mark.parametrize(("change", "problems"), BAD_DATASETS, ids=[p for _, p in BAD_DATASETS])
def test_every_problem_of_a_dataset_is_named_word_for_word(change, problems):
    with pytest.raises(DistmlError) as err:
        check_dataset(tiny(**change()), "mine.safetensors")
    assert str(err.value) == f"dataset mine.safetensors is not usable: {problems}."


def test_one_class_is_refused_and_two_classes_one_channel_and_single_images_are_fine():
    with pytest.raises(DistmlError) as err:
        check_dataset(tiny(classes=1, train_labels=torch.zeros(4, dtype=torch.int64),
                           test_labels=torch.zeros(2, dtype=torch.int64)), "x")  # fmt: skip
    assert str(err.value) == (
        "dataset x is not usable: a classification dataset needs at least 2 classes."
    )
    grey = {"train_images": torch.zeros(4, 8, 8, 1, dtype=U8),
            "test_images": torch.zeros(2, 8, 8, 1, dtype=U8)}  # fmt: skip
    check_dataset(tiny(**grey), "grey")
    one = {"test_images": torch.zeros(1, 8, 8, 3, dtype=U8), "test_labels": torch.tensor([1])}
    check_dataset(tiny(**one), "one test image")  # a split of one image is not empty


def refusal(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """Write a safetensors file and return why read_dataset_file refuses it."""
    save_tensors(path, tensors, meta)
    with pytest.raises(DistmlError) as err:
        read_dataset_file(path)
    return str(err.value)


def test_a_bad_dataset_is_named_by_its_path_when_written_and_read(tmp_path: Path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(DistmlError) as err:
        write_dataset_file(path, tiny(train_labels=torch.tensor([0, 1, 0])))
    assert str(err.value) == (
        f"dataset {path} is not usable: train_labels has 3 entries for 4 images."
    )
    assert not path.exists()
    good = tiny()
    tensors = {k: getattr(good, k) for k in TENSORS} | {"test_labels": torch.tensor([1, 5])}
    assert refusal(path, tensors, {"classes": '["a", "b"]'}) == (
        f"dataset {path} is not usable: test_labels must lie in 0..1 (2 classes)."
    )


def test_a_written_dataset_file_records_its_format_and_classes(tmp_path: Path):
    path = tmp_path / "mine.safetensors"
    write_dataset_file(path, tiny())
    tensors, meta = read_tensors(path, "dataset file")
    assert meta == {"format": "distml-dataset", "classes": '["c0", "c1"]'}
    assert sorted(tensors) == sorted(TENSORS)
    back = read_dataset_file(path)
    assert (back.classes, back.name) == (["c0", "c1"], str(path))
    for key in TENSORS:
        assert torch.equal(getattr(back, key), getattr(tiny(), key)), key


@pytest.mark.parametrize(
    "classes", [None, "not json", '{"a": 1}', '"ab"', '["a", 2]', "[1, 2]"], ids=str
)
def test_dataset_file_without_valid_classes(tmp_path: Path, classes: str | None):
    good = tiny()
    path = tmp_path / "noclasses.safetensors"
    meta = {} if classes is None else {"classes": classes}
    assert refusal(path, {k: getattr(good, k) for k in TENSORS}, meta) == (
        f"dataset file {path} has no valid 'classes' metadata (a JSON list of class names). "
        "See the README section 'Your own dataset' for the format."
    )


def test_dataset_file_missing_tensors(tmp_path: Path):
    good = tiny()
    path = tmp_path / "partial.safetensors"
    tensors = {"train_images": good.train_images, "test_images": good.test_images}
    assert refusal(path, tensors, {"classes": '["a", "b"]'}) == (
        f"dataset file {path} lacks the tensors train_labels, test_labels. A distml dataset "
        "holds train_images, train_labels, test_images and test_labels."
    )


def test_missing_and_damaged_dataset_files(tmp_path: Path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DistmlError) as err:
        read_dataset_file(missing)
    assert str(err.value) == f"dataset file {missing} does not exist. Check the path."
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all" * 3)
    with pytest.raises(DistmlError) as err:
        read_dataset_file(junk)
    assert str(err.value).startswith(f"dataset file {junk} cannot be read as safetensors (")


def test_the_shape_of_each_source_without_loading_it(tmp_path: Path):
    cifar = dataset_shape(DataSettings(dataset="cifar10", data_dir=tmp_path / "absent"))
    assert cifar == DatasetShape(10, 32, 3, 50_000, 10_000)
    assert not (tmp_path / "absent").exists()  # nothing downloaded or created
    synthetic = DataSettings(dataset="synthetic", synthetic_train_size=300, synthetic_test_size=70)
    assert dataset_shape(synthetic) == DatasetShape(10, 32, 3, 300, 70)
    path = tmp_path / "grey.safetensors"
    write_dataset_file(path, tiny(classes=3, train_images=torch.zeros(4, 8, 8, 1, dtype=U8),
                                  test_images=torch.zeros(2, 8, 8, 1, dtype=U8)))  # fmt: skip
    assert dataset_shape(DataSettings(dataset=str(path))) == DatasetShape(3, 8, 1, 4, 2)


def test_load_dataset_reads_the_source_its_settings_name(tmp_path: Path):
    synthetic = load_dataset(
        DataSettings(dataset="synthetic", synthetic_train_size=30, synthetic_test_size=20)
    )
    reference = make_synthetic(30, 20)
    assert (len(synthetic.train_labels), len(synthetic.test_labels)) == (30, 20)
    assert torch.equal(synthetic.train_images, reference.train_images)
    assert torch.equal(synthetic.test_labels, reference.test_labels)
    assert synthetic.name == "synthetic"
    path = tmp_path / "mine.safetensors"
    write_dataset_file(path, tiny())
    from_file = load_dataset(DataSettings(dataset=str(path)))
    assert torch.equal(from_file.test_labels, tiny().test_labels)


# ----------------------------------------------------------------------------- CIFAR-10


class FakeCIFAR10:
    """torchvision.datasets.CIFAR10's interface (data, targets, classes), recording its calls;
    ``fail`` makes the next construction raise after writing what a broken download leaves."""

    calls: ClassVar[list[tuple[str, bool, bool]]] = []
    fail: ClassVar[BaseException | None] = None

    def __init__(self, root: str, train: bool = True, download: bool = False):
        type(self).calls.append((root, train, download))
        if type(self).fail is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"half an archive")
            (Path(root) / "cifar-10-batches-py").mkdir(exist_ok=True)
            for name in ("data_batch_1", "locked", "test_batch"):
                (Path(root) / "cifar-10-batches-py" / name).write_bytes(b"x")
            (Path(root) / "locked").write_bytes(b"x")
            raise type(self).fail
        count = 6 if train else 4
        rng = np.random.default_rng(1 if train else 2)
        self.data = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, count)]
        self.classes = [f"class{k}" for k in range(10)]


@pytest.fixture
def fake_cifar(monkeypatch: pytest.MonkeyPatch) -> type[FakeCIFAR10]:
    import torchvision.datasets

    monkeypatch.setattr(FakeCIFAR10, "calls", [])
    monkeypatch.setattr(FakeCIFAR10, "fail", None)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    return FakeCIFAR10


def test_cifar10_is_downloaded_once_and_then_read_from_its_cache(tmp_path: Path, fake_cifar):
    data_dir = tmp_path / "data"
    first = load_dataset(DataSettings(dataset="cifar10", data_dir=data_dir))
    assert fake_cifar.calls == [(str(data_dir), True, True), (str(data_dir), False, True)]
    train, test = FakeCIFAR10(str(data_dir), train=True), FakeCIFAR10(str(data_dir), train=False)
    assert torch.equal(first.train_images, torch.from_numpy(train.data))
    assert torch.equal(first.test_images, torch.from_numpy(test.data))
    assert first.train_labels.tolist() == train.targets
    assert first.test_labels.tolist() == test.targets
    assert first.train_labels.dtype == first.test_labels.dtype == torch.int64
    assert first.classes == train.classes
    assert first.name == "cifar10"

    fake_cifar.fail = AssertionError("the cache must be read, not torchvision")
    again = load_cifar10(data_dir)
    assert torch.equal(again.train_images, first.train_images)
    assert torch.equal(again.test_labels, first.test_labels)
    assert again.classes == first.classes
    assert again.name == "cifar10"  # the same name in eval's report on every run
    assert read_tensors(data_dir / CIFAR10_CACHE, "cache")[1]["format"] == "distml-dataset"


def test_a_failed_download_says_what_to_do_and_removes_the_folders_it_made(
    tmp_path: Path, fake_cifar
):
    fake_cifar.fail = OSError("network is unreachable")
    data_dir = tmp_path / "new" / "cifar"
    with pytest.raises(DistmlError) as err:
        load_cifar10(data_dir)
    assert str(err.value) == (
        f"CIFAR-10 is not in {data_dir} and could not be downloaded (OSError: network is "
        f"unreachable). Offline, put cifar-10-python.tar.gz (from "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) into {data_dir}/, or a "
        f"distml cache file at {data_dir / CIFAR10_CACHE}, or point --data-dir at the folder "
        "that holds one."
    )
    assert list(tmp_path.iterdir()) == []  # "new" was made by the download: gone


def test_a_failed_download_into_an_existing_folder_removes_only_what_it_added(
    tmp_path: Path, fake_cifar, monkeypatch: pytest.MonkeyPatch
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("mine")
    (data_dir / "other").mkdir()
    (data_dir / "other" / "keep.bin").write_bytes(b"mine too")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("not the download's")

    class LeavesALink(FakeCIFAR10):
        def __init__(self, root: str, train: bool = True, download: bool = False):
            (Path(root) / "link").symlink_to(outside, target_is_directory=True)
            super().__init__(root, train, download)

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", LeavesALink)
    fake_cifar.fail = RuntimeError("File not found or corrupted.")
    with pytest.raises(DistmlError, match=r"\(RuntimeError: File not found or corrupted.\)"):
        load_cifar10(data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["notes.txt", "other"]
    assert (data_dir / "other" / "keep.bin").read_bytes() == b"mine too"
    assert (outside / "precious").read_text() == "not the download's"  # the link, not its target


@pytest.fixture
def locked_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files named "locked" cannot be deleted (another process holds them, a read-only
    share): os.unlink refuses them, as it would as a user without the right."""
    import os

    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "existing folder"])
def test_what_cannot_be_removed_after_a_failed_download_does_not_hide_why(
    tmp_path: Path, fake_cifar, locked_files, existing: bool
):
    fake_cifar.fail = OSError("network is unreachable")
    data_dir = tmp_path / "data"
    if existing:
        data_dir.mkdir()
        (data_dir / "mine.txt").write_text("mine")
    with pytest.raises(DistmlError, match=r"could not be downloaded \(OSError: network is"):
        load_cifar10(data_dir)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    kept = ["data/mine.txt"] if existing else []
    # everything else the download wrote is gone
    assert left == sorted(["data/cifar-10-batches-py/locked", "data/locked", *kept])


def test_an_interrupted_download_cleans_up_and_stays_an_interrupt(tmp_path: Path, fake_cifar):
    fake_cifar.fail = KeyboardInterrupt()
    data_dir = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        load_cifar10(data_dir)
    assert not data_dir.exists()


@pytest.mark.parametrize("inside", [False, True], ids=["the folder", "a parent"])
def test_a_data_dir_that_is_a_file(tmp_path: Path, fake_cifar, inside: bool):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    data_dir = afile / "cifar" if inside else afile
    with pytest.raises(DistmlError) as err:
        load_cifar10(data_dir)
    where = f"{data_dir} lies inside {afile}, which" if inside else f"{data_dir}"
    assert str(err.value) == (
        f"--data-dir {where} is a file, not a folder. Give the folder that holds (or is to "
        "hold) the datasets, e.g. --data-dir data (the setting data.data_dir)."
    )
    assert fake_cifar.calls == []
    assert afile.read_text() == "not a folder"


def test_the_synthetic_set_is_the_same_in_every_version():
    """The synthetic set is fixed (not seeded by the run), so results on it compare across
    runs and versions. Pinned here from the code of 2026-11-23: its labels exactly, its pixels
    by a position-weighted sum (to one part in a million: a CPU whose vector sin rounds
    differently may move a few pixels by one; any change to the recipe moves millions)."""
    data = make_synthetic(50, 20)
    assert data.classes == [f"pattern{k}" for k in range(10)]
    assert (data.name, data.train_images.shape, data.test_images.shape) == (
        "synthetic", (50, 32, 32, 3), (20, 32, 32, 3),
    )  # fmt: skip
    assert data.train_labels.bincount().tolist() == [5] * 10
    assert data.test_labels.bincount().tolist() == [2] * 10
    assert data.train_labels[:10].tolist() == [7, 5, 4, 7, 2, 1, 6, 3, 3, 4]
    assert data.test_labels[:10].tolist() == [2, 5, 7, 4, 0, 5, 8, 1, 7, 1]
    weights = torch.arange(1, 32 * 32 * 3 + 1, dtype=torch.int64)
    sums = [int((x.reshape(len(x), -1).long() * weights).sum()) for x in
            (data.train_images, data.test_images)]  # fmt: skip
    assert sums == pytest.approx([30_062_244_135, 12_398_924_381], rel=1e-6)
