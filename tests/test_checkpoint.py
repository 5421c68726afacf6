from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distml.checkpoint import (
    Checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    read_tensors,
    save_checkpoint,
)
from distml.errors import DistmlError
from distml.files import atomic_write_text
from distml.models import ModelSpec, build_model

SPEC = ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=4)


def make_checkpoint(path: Path) -> torch.nn.Module:
    model = build_model(SPEC)
    meta = Checkpoint(
        spec=SPEC,
        state={},
        classes=[str(i) for i in range(10)],
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3},
        settings={"train": {"seed": 1}},
        epoch=4,
        metrics={"val_accuracy": 0.5},
    )
    save_checkpoint(path, model, meta)
    return model


def test_round_trip(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    model = make_checkpoint(path)
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 4 and ckpt.metrics["val_accuracy"] == 0.5
    assert ckpt.settings == {"train": {"seed": 1}}
    rebuilt = model_from_checkpoint(ckpt)
    for (k, a), (_, b) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    path = tmp_path / "keep.txt"
    atomic_write_text(path, "old")

    class Boom(Exception):
        pass

    from distml.files import atomic_write

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, failing)
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_missing_truncated_foreign_and_damaged(tmp_path: Path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DistmlError) as err:
        load_checkpoint(missing)
    assert str(err.value) == f"checkpoint {missing} does not exist. Check the path."

    good = tmp_path / "good.safetensors"
    make_checkpoint(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DistmlError, match="damaged, truncated"):
        load_checkpoint(truncated)

    pickle_like = tmp_path / "model.pt"
    pickle_like.write_bytes(b"\x80\x04\x95 not safetensors")
    with pytest.raises(DistmlError, match="cannot be read as safetensors"):
        load_checkpoint(pickle_like)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(DistmlError) as err:
        load_checkpoint(foreign)
    assert str(err.value) == (
        f"checkpoint {foreign} is a safetensors file but not a distml checkpoint (its metadata "
        "has no distml model spec). Use a file written by `distml train` (best.safetensors, "
        "last.safetensors or --save)."
    )

    with pytest.raises(DistmlError) as err:
        load_checkpoint(tmp_path)
    assert str(err.value) == f"checkpoint {tmp_path} is not a file."

    damaged = tmp_path / "damaged.safetensors"
    save_file(
        {"weight": torch.zeros(3)},
        str(damaged),
        metadata={"format": "distml-checkpoint", "model_spec": "{not json"},
    )
    with pytest.raises(DistmlError, match="damaged distml metadata"):
        load_checkpoint(damaged)


def damaged_copy(tmp_path: Path, change: dict[str, str | None], extra_tensor: bool = False) -> Path:
    """A good checkpoint written again with its metadata changed (None: a key removed)."""
    good = tmp_path / "good.safetensors"
    make_checkpoint(good)
    tensors, meta = read_tensors(good, "checkpoint")
    meta |= change
    tensors |= {"extra.weight": torch.zeros(2)} if extra_tensor else {}
    path = tmp_path / "damaged.safetensors"
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
    return path


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"classes": None}, "KeyError: 'classes'"),
        ({"normalization": None}, "KeyError: 'normalization'"),
        ({"classes": '{"a": 1}'},
         "ValueError: metadata 'classes' must be a JSON list, not {'a': 1}"),
        ({"normalization": "null"},  # null where an object belongs is damage
         "ValueError: metadata 'normalization' must be a JSON dict, not None"),
        ({"extra": "[1, 2]"}, "ValueError: metadata 'extra' must be a JSON dict, not [1, 2]"),
    ],
)  # fmt: skip
def test_damaged_metadata_names_the_field(tmp_path: Path, change, why):
    path = damaged_copy(tmp_path, change)
    with pytest.raises(DistmlError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {path} has damaged distml metadata ({why}). Write it again with "
        "`distml train`."
    )


def test_tensors_that_do_not_fit_the_spec(tmp_path: Path):
    wider = SPEC.model_copy(update={"width": 0.25}).model_dump_json()
    other = damaged_copy(tmp_path, {"model_spec": wider})
    with pytest.raises(DistmlError, match="do not fit its own model spec"):
        model_from_checkpoint(load_checkpoint(other))


def test_a_tensor_the_model_does_not_have_is_refused(tmp_path: Path):
    path = damaged_copy(tmp_path, {}, extra_tensor=True)
    with pytest.raises(DistmlError) as err:
        model_from_checkpoint(load_checkpoint(path))
    assert str(err.value) == (
        f"checkpoint {path}: its tensors do not fit its own model spec (Unexpected key(s) in "
        'state_dict: "extra.weight".). The file was changed by another tool or is damaged.'
    )


def test_written_files_get_the_usual_permissions(tmp_path: Path):
    import os
    import stat

    path = tmp_path / "m.safetensors"
    make_checkpoint(path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_newer_format_is_refused_and_the_own_format_is_written(tmp_path: Path):
    from distml import __version__
    from distml.checkpoint import CHECKPOINT_VERSION

    good = tmp_path / "good.safetensors"
    make_checkpoint(good)
    _, meta = read_tensors(good, "checkpoint")
    assert (meta["format"], meta["format_version"]) == ("distml-checkpoint", "1")
    assert CHECKPOINT_VERSION == 1
    path = damaged_copy(tmp_path, {"format_version": "2"})
    with pytest.raises(DistmlError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        f"checkpoint {path} has format version 2, newer than this distml ({__version__}) reads; "
        "upgrade distml."
    )
    # a file from before the format version, which did not say which distml wrote it either
    older = load_checkpoint(
        damaged_copy(tmp_path, {"format_version": None, "distml_version": None})
    )
    assert older.distml_version == "unknown"


def test_a_file_with_only_the_required_metadata_loads_with_the_defaults(tmp_path: Path):
    """The oldest checkpoints carry the model, classes and normalisation alone: the optional
    fields (settings, epoch, metrics, extra, versions) are absent, not damaged."""
    optional = ("settings", "epoch", "metrics", "extra", "format_version", "distml_version")
    path = damaged_copy(tmp_path, dict.fromkeys(optional))
    assert set(read_tensors(path, "checkpoint")[1]) == {
        "format",
        "model_spec",
        "classes",
        "normalization",
    }
    read = load_checkpoint(path)
    assert (read.settings, read.epoch, read.metrics, read.extra) == ({}, 0, {}, {})
    assert (read.distml_version, read.seed) == ("unknown", 0)
    # the good file said seed 1, epoch 4, val_accuracy 0.5: none of it is made up here
    assert (read.classes, read.normalization["std"]) == ([str(i) for i in range(10)], [0.25] * 3)


def test_settings_metrics_and_extra_that_json_cannot_hold_are_written_as_text(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, build_model(SPEC), Checkpoint(
        spec=SPEC, state={}, classes=[str(i) for i in range(10)], normalization={},
        settings={"data": {"data_dir": Path("data/cifar")}},
        metrics={"device": torch.device("cpu")}, extra={"origin": Path("best.safetensors")},
    ))  # fmt: skip
    ckpt = load_checkpoint(path)
    assert ckpt.settings == {"data": {"data_dir": "data/cifar"}}
    assert ckpt.metrics == {"device": "cpu"}
    assert ckpt.extra == {"origin": "best.safetensors"}
