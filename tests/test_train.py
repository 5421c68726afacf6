import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXACT, TINY, assert_plot, last_json, run_cli, train_json
from safetensors.torch import load_file

from distml.config import TrainConfig
from distml.metrics import METRIC_COLUMNS, overfitting_verdict


def test_a_short_synthetic_run_learns_and_writes_its_report(tiny_run):
    run = Path(tiny_run["run_dir"])
    for name in (
        "config.json",
        "metrics.csv",
        "summary.json",
        "curves.png",
        "best.safetensors",
        "last.safetensors",
    ):
        assert (run / name).is_file(), name
    assert tiny_run["test_accuracy"] > 0.35  # chance is 0.1
    assert tiny_run["epochs_run"] == 3 and 1 <= tiny_run["best_epoch"] <= 3
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == METRIC_COLUMNS and len(rows) == 3
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "test_accuracy",
        "test_loss",
        "best_val_accuracy",
        "best_epoch",
        "train_accuracy",
        "epochs_run",
        "total_seconds",
        "device_name",
        "mode",
        "world_size",
        "precision",
        "parameters",
        "overfitting",
    ):
        assert key in summary, key
    assert summary["overfitting"]["verdict"].endswith("points.")
    assert summary["device_name"].startswith("CPU")


def test_config_json_repeats_the_run(tiny_run, tmp_path: Path):
    config = TrainConfig.model_validate_json(
        (Path(tiny_run["run_dir"]) / "config.json").read_text()
    )
    assert config.train.epochs == 3 and config.model.width == 0.125
    # the saved config names its run directory, so a repeat needs a new --out
    again = train_json(
        "--config",
        Path(tiny_run["run_dir"]) / "config.json",
        "--out",
        tmp_path / "again",
        "--quiet",
    )
    assert again["test_accuracy"] == tiny_run["test_accuracy"]


def test_eval_reproduces_the_summary(tiny_run, tmp_path: Path):
    best = Path(tiny_run["run_dir"]) / "best.safetensors"
    result = last_json(
        run_cli("eval", best, "--device", "cpu", "--json", "--quiet", "--out", tmp_path / "ev")
    )
    assert result["accuracy"] == tiny_run["test_accuracy"]
    assert result["count"] == tiny_run["test_images"] == 201
    assert result["loss"] == pytest.approx(tiny_run["test_loss"], rel=1e-6)
    assert sum(map(sum, result["confusion_matrix"])) == 201
    assert set(result["per_class_accuracy"]) == {f"pattern{k}" for k in range(10)}
    assert_plot(tmp_path / "ev" / "confusion.png")
    assert (tmp_path / "ev" / "eval.json").is_file()


def test_eval_other_splits_and_human_output(tiny_run, tmp_path: Path):
    best = Path(tiny_run["run_dir"]) / "best.safetensors"
    result = run_cli("eval", best, "--split", "val", "--device", "cpu", "--out", tmp_path / "v")
    assert "val accuracy" in result.stdout and "per class" in result.stdout
    val = json.loads((tmp_path / "v" / "eval.json").read_text())
    assert val["count"] == 100  # exactly 10% of 1000
    assert val["accuracy"] == pytest.approx(tiny_run["best_val_accuracy"])


def test_save_writes_the_best_checkpoint(tmp_path: Path):
    target = tmp_path / "models" / "mine.safetensors"
    summary = train_json(*TINY, "--epochs", "1", "--out", tmp_path / "run", "--save", target)
    assert target.is_file()
    assert summary["checkpoints"]["saved"] == str(target)


def weights(run_dir: str, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / name))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_accumulation_reproduces_the_full_batch(tmp_path: Path):
    common = [*TINY, *EXACT, "--batch-size", "64", "--epochs", "1"]
    full = train_json(*common, "--out", tmp_path / "full")
    accum = train_json(*common, "--accum-steps", "4", "--out", tmp_path / "accum")
    assert accum["micro_batch_per_rank"] == 16
    assert_same_weights(weights(full["run_dir"]), weights(accum["run_dir"]))


def test_early_stopping_stops(tmp_path: Path):
    # a learning rate too small to change predictions: no better val accuracy after epoch 1
    summary = train_json(
        *TINY,
        *EXACT,
        "--lr",
        "1e-9",
        "--epochs",
        "6",
        "--early-stop",
        "1",
        "--out",
        tmp_path / "es",
    )
    assert summary["stopped_early"] and summary["epochs_run"] == 2 and summary["best_epoch"] == 1


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_runs(tmp_path: Path, precision: str):
    summary = train_json(*TINY, "--epochs", "1", "--precision", precision, "--out", tmp_path / "p")
    assert summary["precision"] == precision
    assert 0 <= summary["test_loss"] < 10


def test_amp_is_fp16(tmp_path: Path):
    summary = train_json(*TINY, "--epochs", "1", "--amp", "--out", tmp_path / "amp")
    assert summary["precision"] == "16-mixed"
    assert any("bf16-mixed is the fast choice on the CPU" in n for n in summary["notes"])


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop"])
def test_other_optimizers_and_schedules(tmp_path: Path, optimizer: str):
    summary = train_json(
        *TINY,
        "--epochs",
        "1",
        "--optimizer",
        optimizer,
        "--lr",
        "0.001",
        "--scheduler",
        "cosine",
        "--out",
        tmp_path / optimizer,
    )
    assert summary["test_accuracy"] > 0.1


def test_transfer_with_frozen_features(tiny_run, tmp_path: Path):
    init = Path(tiny_run["run_dir"]) / "best.safetensors"
    summary = train_json(
        *TINY,
        "--epochs",
        "1",
        "--init",
        init,
        "--freeze-features",
        "--set",
        "model.head_hidden=[16]",
        "--out",
        tmp_path / "head",
    )
    before, after = load_file(str(init)), weights(summary["run_dir"])
    for key in before:
        if key.startswith("features."):
            assert torch.equal(before[key], after[key]), key  # frozen, BN statistics too
    assert "head.fc1.weight" in after and "head.fc1.weight" not in before
    assert summary["trainable_parameters"] < summary["parameters"]


def test_overfitting_verdict():
    def row(epoch, train_loss, val_loss, train_acc, val_acc):
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "train_accuracy": train_acc,
            "val_accuracy": val_acc,
        }

    rising = [
        row(1, 1.0, 0.9, 0.6, 0.6),
        row(2, 0.6, 0.7, 0.8, 0.75),
        row(3, 0.3, 0.8, 0.9, 0.76),
        row(4, 0.1, 0.95, 0.98, 0.75),
    ]
    verdict = overfitting_verdict(rising)
    assert verdict["detected"] and verdict["val_loss_min_epoch"] == 2
    assert "rose" in verdict["verdict"]
    gap = [row(1, 1.0, 0.9, 0.6, 0.55), row(2, 0.4, 0.8, 0.9, 0.7)]
    assert overfitting_verdict(gap)["detected"]
    assert overfitting_verdict(gap)["verdict"].startswith(
        "Overfitting: training accuracy is 20.0 points above validation accuracy"
    )
    healthy = [row(1, 1.0, 0.9, 0.6, 0.62), row(2, 0.7, 0.6, 0.75, 0.76)]
    assert overfitting_verdict(healthy)["detected"] is False
    assert overfitting_verdict([{**healthy[0], "val_loss": None}])["detected"] is None


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "distml", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("distml ")


def test_dp_without_two_gpus_says_so_and_runs(tmp_path: Path):
    summary = train_json(*TINY, "--epochs", "1", "--mode", "dp", "--out", tmp_path / "dp")
    assert summary["mode"] == "dp" and summary["world_size"] == 1
    assert "used one device" in summary["notes"][0]
