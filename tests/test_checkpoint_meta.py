"""Every metadata field of a checkpoint survives a save and a load (what eval, si, prune
and train --init read back)."""

from pathlib import Path

import torch

from distml import __version__
from distml.checkpoint import (
    Checkpoint,
    bare_model,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from distml.files import atomic_write_json
from distml.models import ModelSpec, build_model


def test_every_metadata_field_round_trips(tmp_path: Path):
    spec = ModelSpec(arch="cnn", num_classes=3, width=0.25, depth=2, norm="group", dropout=0.3)
    model = build_model(spec)
    written = Checkpoint(
        spec=spec,
        state={},
        classes=["cat", "dog", "émeu"],
        normalization={"mean": [0.125, 0.5, 0.875], "std": [0.25, 0.0625, 0.3]},
        settings={"train": {"seed": 7, "epochs": 3}, "data": {"dataset": "synthetic"}},
        epoch=12,
        metrics={"val_accuracy": 0.625, "val_loss": 1.5, "test_accuracy": None},
        extra={"pruned": {"features.0": [1, 3]}, "note": "kept"},
    )
    path = tmp_path / "deep" / "model.safetensors"
    save_checkpoint(path, model, written)
    read = load_checkpoint(path)

    assert read.spec == spec
    assert read.classes == ["cat", "dog", "émeu"]
    assert read.normalization == {"mean": [0.125, 0.5, 0.875], "std": [0.25, 0.0625, 0.3]}
    assert read.settings == {"train": {"seed": 7, "epochs": 3}, "data": {"dataset": "synthetic"}}
    assert read.epoch == 12
    assert read.metrics == {"val_accuracy": 0.625, "val_loss": 1.5, "test_accuracy": None}
    assert read.extra == {"pruned": {"features.0": [1, 3]}, "note": "kept"}
    assert read.distml_version == __version__
    assert read.path == path
    assert read.seed == 7
    assert read.train_setting("epochs", 0) == 3 and read.train_setting("absent", "x") == "x"
    rebuilt = model_from_checkpoint(read)
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


def test_defaults_of_a_minimal_checkpoint(tmp_path: Path):
    spec = ModelSpec(arch="cnn", num_classes=2, width=0.125, depth=1)
    minimal = Checkpoint(spec=spec, state={}, classes=["a", "b"], normalization={})
    save_checkpoint(tmp_path / "m.safetensors", build_model(spec), minimal)
    read = load_checkpoint(tmp_path / "m.safetensors")
    assert (read.settings, read.epoch, read.metrics, read.extra) == ({}, 0, {}, {})
    assert read.seed == 0


def test_wrapped_models_save_the_bare_weights(tmp_path: Path):
    """A dp or compiled run's checkpoint loads into a plain model: no wrapper prefixes."""
    spec = ModelSpec(arch="cnn", num_classes=2, width=0.125, depth=1)
    model = build_model(spec)
    meta = Checkpoint(spec=spec, state={}, classes=["a", "b"], normalization={})
    wrapped = torch.compile(torch.nn.DataParallel(model))
    assert bare_model(wrapped) is model
    save_checkpoint(tmp_path / "m.safetensors", wrapped, meta)
    read = load_checkpoint(tmp_path / "m.safetensors")
    assert read.state.keys() == model.state_dict().keys()
    model_from_checkpoint(read)  # loads strictly


def test_json_reports_are_indented_and_end_with_a_newline(tmp_path: Path):
    """summary.json and the other reports: readable, and paths written as text."""
    path = tmp_path / "new" / "summary.json"
    atomic_write_json(path, {"run_dir": Path("runs/a"), "accuracy": [0.5]})
    assert path.read_text(encoding="utf-8") == (
        '{\n  "run_dir": "runs/a",\n  "accuracy": [\n    0.5\n  ]\n}\n'
    )
