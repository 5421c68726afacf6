"""Where a setting's value comes from: defaults < --config FILE < flags < --set."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from distml.config import TrainConfig, resolve_settings


@pytest.mark.parametrize(
    ("in_file", "flag", "assignment", "expected"),
    [
        (0.01, 0.02, "optim.lr=0.03", 0.03),  # all three: --set wins
        (0.01, 0.02, None, 0.02),  # a flag beats the file
        (0.01, None, None, 0.01),  # the file beats the default
        (None, 0.02, "optim.lr=0.03", 0.03),  # --set beats a flag
        (0.01, None, "optim.lr=0.03", 0.03),  # --set beats the file
        (None, None, None, 0.4),  # the default
    ],
)
def test_one_key_in_every_layer(tmp_path: Path, in_file, flag, assignment, expected):
    path = None
    if in_file is not None:
        path = tmp_path / "settings.json"
        path.write_text(json.dumps({"optim": {"lr": in_file}}))
    config = resolve_settings(
        TrainConfig,
        path,
        flags={"optim.lr": flag},
        assignments=[assignment] if assignment else [],
    )
    assert config.optim.lr == expected


def test_later_assignments_of_one_key_win():
    config = resolve_settings(TrainConfig, assignments=["train.seed=3", "train.seed=4"])
    assert config.train.seed == 4


def test_the_cli_run_records_the_winning_values(tmp_path: Path):
    settings = tmp_path / "settings.toml"
    settings.write_text("[optim]\nlr = 0.01\nmomentum = 0.5\n[train]\nseed = 5\nepochs = 1\n")
    run_dir = tmp_path / "run"
    small = [
        "--dataset", "synthetic", "--set", "data.synthetic_train_size=200",
        "--set", "data.synthetic_test_size=20", "--width", "0.125", "--depth", "2",
        "--batch-size", "32", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    run_cli(
        "train", *small, "--config", settings, "--lr", "0.02", "--seed", "6",
        "--set", "optim.lr=0.03", "--out", run_dir,
    )  # fmt: skip
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["optim"]["lr"] == 0.03  # file, flag and --set: --set
    assert recorded["train"]["seed"] == 6  # file and flag: the flag
    assert recorded["optim"]["momentum"] == 0.5  # file only: the file
    assert recorded["train"]["epochs"] == 1
    assert recorded["train"]["batch_size"] == 32  # a flag only
