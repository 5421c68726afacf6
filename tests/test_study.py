"""`distml study` end to end on a tiny VGG16 (synthetic data), and its early refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json, run_cli, tree_snapshot

TINY_VGG_TOML = """
[model]
arch = "vgg16"
width = 0.125
norm = "batch"

[data]
dataset = "synthetic"
synthetic_train_size = 1000
synthetic_test_size = 200

[optim]
lr = 0.05
scheduler = "cosine"

[train]
epochs = 50
batch_size = 32
label_smoothing = 0.0
device = "cpu"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_VGG_TOML)
    return path


def test_study_runs_part_b_and_writes_one_report(config: Path, tmp_path: Path):
    out = tmp_path / "study"
    flags = ["--epochs", "1", "--head-epochs", "1", "--fraction", "0.2", "--max-features", "3"]
    report = last_json(run_cli("study", "--config", config, "--out", out, *flags, "--json", "-q"))
    assert report == json.loads((out / "report.json").read_text())
    steps = [m["step"] for m in report["models"]]
    assert steps == ["1-train", "2-head", "3b-prune", "3c-select"]
    for model in report["models"]:
        correct = model["test_accuracy"] * 200  # a fraction of the 200 test images
        assert correct == pytest.approx(round(correct), abs=1e-9) and model["epochs_run"] == 1
        assert Path(model["curves"]).is_file() and Path(model["checkpoint"]).is_file()
    first, head = report["models"][0], report["models"][1]
    assert head["trainable_parameters"] < head["parameters"] == first["parameters"]

    # SI per layer of every model (train and test); frozen features measure the same
    assert set(report["si"]) == {"1-train", "2-head", "3b-prune", "3c-select"}
    assert len(report["si"]["1-train"]["layers"]) == 18
    assert report["si"]["2-head"]["layers"] == report["si"]["1-train"]["layers"]
    pruned_layers = report["prune"]["kept_layers"]
    assert len(report["si"]["3b-prune"]["layers"]) == pruned_layers
    for result in report["si"].values():
        assert Path(result["plot"]).is_file()
        assert set(result["layers"][0]["center_si"]) == {"train", "test"}

    # compression: parameters and accuracy before/after each step, chained
    prune, select = report["prune"], report["select"]
    assert prune["test_accuracy"]["before"] == first["test_accuracy"]
    assert select["test_accuracy"]["before"] == prune["test_accuracy"]["after"]
    assert select["parameters"]["before"] == prune["parameters"]["after"]
    assert select["parameters"]["after"]["total"] < prune["parameters"]["after"]["total"]
    assert len(select["selection"]["curve"]) == 3
    assert Path(prune["plot"]).is_file() and Path(select["plot"]).is_file()

    text = (out / "report.md").read_text()
    for heading in ("## Models", "## Compression", "## SI and Center SI per layer"):
        assert heading in text
    assert "(1-train/curves.png)" in text and "(3c-select/selection.png)" in text
    assert "| prune | kept" in text and "| select-features | kept" in text


def test_study_refuses_before_training(config: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "used" / "1-train").mkdir(parents=True)
    before = tree_snapshot(tmp_path)
    cases = [
        (["--out", "used"], "already holds a study"),
        (["--out", "new", "--set", "model.norm=group"], "group norm"),
        (["--out", "new", "--layer", "conv9_1"], "--layer 'conv9_1' is not a layer"),
        (["--out", "new", "--fraction", "0"], "fraction (--fraction)"),
        (["--out", "new", "--head-epochs", "0"], "head.epochs (--head-epochs) must be >= 1"),
    ]
    for args, message in cases:
        result = run_cli("study", "--config", config, *args, "-q", expect=2)
        assert message in result.stderr and "Traceback" not in result.output, result.stderr
    assert tree_snapshot(tmp_path) == before and not (tmp_path / "new").exists()
