import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distml.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint
from distml.errors import DistmlError
from distml.files import atomic_write_text
from distml.models import ModelSpec, build_model


def make_checkpoint(path: Path) -> torch.nn.Module:
    spec = ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=4)
    model = build_model(spec)
    meta = Checkpoint(
        spec=spec,
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
    with pytest.raises(DistmlError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")

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
    with pytest.raises(DistmlError, match="not a distml checkpoint"):
        load_checkpoint(foreign)

    damaged = tmp_path / "damaged.safetensors"
    save_file(
        {"weight": torch.zeros(3)},
        str(damaged),
        metadata={"format": "distml-checkpoint", "model_spec": "{not json"},
    )
    with pytest.raises(DistmlError, match="damaged distml metadata"):
        load_checkpoint(damaged)


def test_tensors_that_do_not_fit_the_spec(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    make_checkpoint(path)
    ckpt = load_checkpoint(path)
    spec_json = ckpt.spec.model_copy(update={"width": 0.25}).model_dump_json()
    tensors = ckpt.state
    meta = {
        "format": "distml-checkpoint",
        "model_spec": spec_json,
        "classes": json.dumps(ckpt.classes),
        "normalization": json.dumps(ckpt.normalization),
    }
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata=meta)
    with pytest.raises(DistmlError, match="do not fit its own model spec"):
        model_from_checkpoint(load_checkpoint(other))


def test_written_files_get_the_usual_permissions(tmp_path: Path):
    import os
    import stat

    path = tmp_path / "m.safetensors"
    make_checkpoint(path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
