"""distml sweep end to end on tiny runs: report, skipped and failed runs, interruption and a
re-run that keeps finished runs, dry runs that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import last_json, run_cli

from distml import launch
from distml.errors import Interrupted

TINY_PLAN = """
description = "tiny"
[set]
"data.dataset" = "synthetic"
"data.synthetic_train_size" = 400
"data.synthetic_test_size" = 100
"model.width" = 0.125
"model.depth" = 4
"train.batch_size" = 32
"train.epochs" = 1
"train.device" = "cpu"
"train.label_smoothing" = 0.0
[grid]
"optim.lr" = [0.05, 0.1]
"""


def plan_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(TINY_PLAN + extra)
    return path


def test_sweep_runs_compares_and_records_skips_and_failures(tmp_path: Path) -> None:
    extra = """
[[variants]]
name = "ok"
[[variants]]
name = "dp"
set = { "dist.mode" = "dp" }
[[variants]]
name = "broken"
set = { "model.init" = "missing.safetensors" }
"""
    out = tmp_path / "out"
    result = last_json(run_cli("sweep", plan_file(tmp_path, extra), "--out", out, "--json", "-q"))
    status = {o["name"]: o["status"] for o in result["outcomes"]}
    assert status == {
        "ok-lr-0.05": "finished",
        "ok-lr-0.1": "finished",
        "dp-lr-0.05": "skipped",
        "dp-lr-0.1": "skipped",
        "broken-lr-0.05": "failed",
        "broken-lr-0.1": "failed",
    }
    failed = next(o for o in result["outcomes"] if o["name"] == "broken-lr-0.05")
    assert "missing.safetensors" in failed["message"]
    # the finished runs are normal run folders with their own settings
    config = json.loads((out / "ok-lr-0.1" / "config.json").read_text())
    assert config["optim"]["lr"] == 0.1
    assert (out / "ok-lr-0.1" / "summary.json").is_file()
    # the comparison covers the finished runs and names the ones left out, with the reason
    report = (out / "report.md").read_text()
    assert "ok-lr-0.05" in report and "ok-lr-0.1" in report
    assert "DataParallel needs at least 2 GPUs" in report
    assert "missing.safetensors" in report
    assert sorted(result["compare"]["runs"][i]["label"] for i in range(2)) == [
        "ok-lr-0.05",
        "ok-lr-0.1",
    ]


def test_interrupted_sweep_continues_without_retraining(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_start = launch.start_training
    calls: list[str] = []

    def stop_on_second(config, *, show_progress=True):
        calls.append(config.output.dir.name)
        if len(calls) == 2:
            raise Interrupted("SIGINT received: the training state is saved.")
        return real_start(config, show_progress=show_progress)

    monkeypatch.setattr(launch, "start_training", stop_on_second)
    stopped = run_cli("sweep", plan_file(tmp_path), "--out", out, "-q", expect=130)
    assert "continue it with the same command" in stopped.output
    first = out / "lr-0.05" / "best.safetensors"
    stamp = first.stat().st_mtime_ns
    record = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["finished"]

    monkeypatch.setattr(launch, "start_training", real_start)
    again = last_json(run_cli("sweep", plan_file(tmp_path), "--out", out, "--json", "-q"))
    assert [o["status"] for o in again["outcomes"]] == ["already-finished", "finished"]
    assert first.stat().st_mtime_ns == stamp  # the finished run was not trained again
    assert (out / "report.md").is_file()


def test_dry_run_validates_everything_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = last_json(run_cli("sweep", plan_file(tmp_path), "--out", out, "--dry-run", "--json"))
    assert [r["name"] for r in result["runs"]] == ["lr-0.05", "lr-0.1"]
    assert result["runs"][1]["settings"]["optim"]["lr"] == 0.1
    assert not out.exists()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ('"train.epochs" = [1, 0]', "run ep-0"),  # a refused value in a later run
        ('"train.epoch" = [1]', "did you mean 'train.epochs'"),
        ('"train.epochs" = []', "is empty"),
    ],
)
def test_bad_plans_exit_2_before_anything_trains(tmp_path: Path, grid: str, message: str) -> None:
    plan = tmp_path / "bad.toml"
    plan.write_text(TINY_PLAN.replace('"optim.lr" = [0.05, 0.1]', grid))
    out = tmp_path / "out"
    result = run_cli("sweep", plan, "--out", out, expect=2)
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_changed_plan_does_not_mix_with_its_old_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_cli("sweep", plan_file(tmp_path), "--out", out, "-q")
    result = run_cli(
        "sweep", plan_file(tmp_path), "--out", out, "--set", "train.seed=3", "-q", expect=2
    )
    assert "holds a run with other settings" in result.output
