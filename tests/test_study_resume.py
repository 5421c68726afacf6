"""`distml study` checks every step's settings before its first file, and a re-run of the same
command continues after the last finished step (issue 12, part 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_clean_failure, last_json, run_cli, tree_snapshot
from test_study import TINY_VGG_TOML

import distml.study
from distml.errors import DistmlError

# test_study's tiny VGG16, smaller still: one epoch on 200 images
FLAGS = ["--epochs", "1", "--head-epochs", "1", "--fraction", "0.2", "-q"]
FLAGS += ["--set", "data.synthetic_train_size=200", "--set", "data.synthetic_test_size=50"]
EARLY_STEPS = ("1-train", "2-head", "3a-si", "3b-prune")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(TINY_VGG_TOML)
    return tmp_path


LATE_PROBLEMS = [
    (["--layer", "conv1_1", "--max-features", "100"], "more than the 8 channels of conv1_1"),
    (["--fraction", "0.01"], "--fraction 0.01 of the test split (50 images) is 0 sample(s)"),
    (["--set", "model.arch=cnn", "--set", "model.depth=5", "--layer", "stage1_res1"], "residual"),
    (["--set", "model.norm=layer"], "layer norm"),
    (["--set", "data.dataset=missing.safetensors"], "missing.safetensors does not exist"),
]


@pytest.mark.parametrize(("args", "message"), LATE_PROBLEMS, ids=lambda v: " ".join(v)[:30])
def test_late_step_problems_fail_before_any_file(workdir: Path, args: list[str], message: str):
    before = tree_snapshot(workdir)
    result = run_cli("study", "--config", "study.toml", "--out", "s", *FLAGS, *args, expect=2)
    assert_clean_failure(result, message)
    assert tree_snapshot(workdir) == before and not (workdir / "s").exists()


def test_failure_in_step_1_leaves_no_study_folder(workdir: Path):
    # a batch larger than the training split is found by the training step itself
    args = ["--set", "train.batch_size=512", *FLAGS]
    result = run_cli("study", "--config", "study.toml", "--out", "s", *args, expect=2)
    assert "Traceback" not in result.output
    assert not (workdir / "s").exists()


def stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_study_resumes_after_its_last_finished_step(workdir: Path, monkeypatch):
    command = ["study", "--config", "study.toml", "--out", "s", *FLAGS]
    out = workdir / "s"

    def interrupted(settings, **kwargs):
        (settings.out / "half-made.txt").parent.mkdir(parents=True)
        (settings.out / "half-made.txt").write_text("a selection that never finished")
        raise DistmlError("simulated failure in step 3c")

    with monkeypatch.context() as patch:
        patch.setattr(distml.study, "select_checkpoint_features", interrupted)
        result = run_cli(*command, "--max-features", "2", expect=2)
    assert "simulated failure in step 3c" in result.stderr
    assert all(distml.study.step_finished(out, step) for step in EARLY_STEPS)
    assert (out / "3c-select" / "half-made.txt").exists() and not (out / "report.json").exists()
    early = {step: stamps(out / step) for step in EARLY_STEPS}

    # a setting a finished step used cannot change: refused, nothing touched
    before = tree_snapshot(out)
    refused = run_cli(*command, "--max-features", "2", "--layer-tolerance", "0.5", expect=2)
    assert_clean_failure(refused, "layer_tolerance was 0.01, now 0.5", "finished step 3b-prune")
    assert tree_snapshot(out) == before

    # one only the unfinished steps use may: the study goes on from step 3c
    report = last_json(run_cli(*command, "--max-features", "3", "--json"))
    assert report["reused_steps"] == list(EARLY_STEPS)
    assert report["settings"]["max_features"] == 3
    assert len(report["select"]["selection"]["curve"]) == 3
    assert {step: stamps(out / step) for step in EARLY_STEPS} == early
    assert not (out / "3c-select" / "half-made.txt").exists()
    assert json.loads((out / "report.json").read_text()) == report
    assert "were finished by an earlier run" in (out / "report.md").read_text()

    # the same command on a finished study does nothing
    finished = stamps(out)
    again = last_json(run_cli(*command, "--max-features", "3", "--json"))
    assert again == report and stamps(out) == finished

    # a lost last result: only that step is redone
    (out / "4-si-3c-select" / "si.json").unlink()
    redone = last_json(run_cli(*command, "--max-features", "3", "--json"))
    assert redone["reused_steps"] == [s for s in distml.study.STEPS if s != "4-si-3c-select"]
    after = stamps(out)
    for name, stamp in finished.items():
        if not name.startswith(("4-si-3c-select", "report.", "study.json")):
            assert after[name] == stamp, name
    assert redone["si"]["3c-select"]["layers"] == report["si"]["3c-select"]["layers"]
