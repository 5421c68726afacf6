"""Issue 12, classes 2 and 3: nothing that is not ours is overwritten (one --overwrite rule
for every path the user names), and operating-system and data problems are messages that
name the path, before any work, leaving the file system as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, assert_clean_failure, run_cli, train_json, tree_snapshot


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished one-epoch run that also wrote its best checkpoint to --save."""
    root = tmp_path_factory.mktemp("saved")
    save = root / "model.safetensors"
    train_json(*TINY, "--epochs", "1", "--out", root / "run", "--save", save)
    return root / "run", save


# ----------------------------------------------------------------------------- overwrite


def test_save_never_replaces_an_existing_file_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    out = tmp_path / "run"
    result = run_cli("train", *TINY, "--out", out, "--save", target, expect=2)
    assert_clean_failure(result, f"--save {target} already exists", "--overwrite")
    assert target.read_text() == "my notes"
    assert not out.exists()  # refused before training, not after
    train_json(*TINY, "--epochs", "1", "--out", out, "--save", target, "--overwrite")
    assert target.read_bytes()[:8] != b"my notes"  # replaced by the checkpoint


def test_a_replayed_config_cannot_overwrite_the_original_checkpoint(
    saved_run: tuple[Path, Path],
) -> None:
    run, _ = saved_run
    before = tree_snapshot(run.parent)
    result = run_cli("train", "--config", run / "config.json", "--quiet", expect=2)
    assert_clean_failure(result, "already")
    assert tree_snapshot(run.parent) == before


def test_results_folders_follow_one_rule(saved_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = saved_run
    best = run / "best.safetensors"
    for command in (["eval"], ["si", "--fraction", "0.05"]):
        out = tmp_path / command[0]
        run_cli(*command, best, "--out", out, "--device", "cpu", "-q")
        written = tree_snapshot(out)
        again = run_cli(*command, best, "--out", out, "--device", "cpu", "-q", expect=2)
        assert_clean_failure(again, f"--out {out} already holds results", "--overwrite")
        assert tree_snapshot(out) == written
        run_cli(*command, best, "--out", out, "--device", "cpu", "-q", "--overwrite")


@pytest.mark.parametrize("name", ["", "../../escape", "a/b", "..", " "])
def test_run_names_are_plain_folder_names(tmp_path: Path, name: str) -> None:
    root = tmp_path / "runs"
    result = run_cli("train", *TINY, "--set", f"output.root={root}", "--name", name, expect=2)
    assert_clean_failure(result, "plain folder name")
    assert not root.exists() and not (tmp_path / "escape").exists()


# ----------------------------------------------------------------------------- OS and data


def test_an_output_path_through_a_file_is_refused_before_work(tmp_path: Path) -> None:
    blocker = tmp_path / "afile.txt"
    blocker.write_text("x")
    result = run_cli("train", *TINY, "--out", blocker / "run", expect=2)
    assert_clean_failure(result, f"{blocker} is a file")
    result = run_cli("train", *TINY, "--out", tmp_path / "r", "--save", blocker / "m.st", expect=2)
    assert_clean_failure(result, f"{blocker} is a file")
    assert not (tmp_path / "r").exists()
    assert blocker.read_text() == "x"


def test_a_read_only_output_folder_is_refused_before_work(tmp_path: Path, monkeypatch) -> None:
    # root ignores permission bits, so the check's answer is simulated: os.access is what
    # reports a read-only file system or a missing permission
    import distml.files

    monkeypatch.setattr(distml.files.os, "access", lambda path, mode: False)
    out = tmp_path / "run"
    result = run_cli("train", *TINY, "--out", out, expect=2)
    assert_clean_failure(result, "is not writable", "read-only file system")
    assert not out.exists()


def test_an_os_error_during_work_is_a_message_not_a_traceback(tmp_path: Path, monkeypatch):
    import distml.launch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "state"))

    monkeypatch.setattr(distml.launch, "fit", disk_full)
    result = run_cli("train", *TINY, "--out", tmp_path / "run", expect=2)
    assert_clean_failure(result, "No space left on device", "free space")


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_integers_out_of_range_are_settings_errors(tmp_path: Path, seed: str) -> None:
    result = run_cli("train", *TINY, "--seed", seed, "--out", tmp_path / "r", expect=2)
    assert_clean_failure(result, "train.seed")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("field", ["settings", "normalization", "classes"])
def test_a_checkpoint_with_null_metadata_is_damaged_not_a_crash(
    saved_run: tuple[Path, Path], tmp_path: Path, field: str
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, save = saved_run
    with safe_open(str(save), "pt") as handle:
        metadata = dict(handle.metadata())
    metadata[field] = "null"
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(str(save)), str(broken), metadata=metadata)
    result = run_cli("eval", broken, "--out", tmp_path / "e", expect=2)
    assert_clean_failure(result, "damaged distml metadata", repr(field))
    assert not (tmp_path / "e").exists()


def test_resume_with_an_edited_config_that_no_longer_fits_the_state(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_json(*TINY, "--epochs", "2", "--out", run)
    (run / "summary.json").unlink()  # as if stopped after its second epoch
    config = json.loads((run / "config.json").read_text())
    config["model"]["width"] = 0.25  # another network than the saved state holds
    (run / "config.json").write_text(json.dumps(config))
    before = tree_snapshot(run)
    result = run_cli("train", "--resume", run, expect=2)
    assert_clean_failure(result, str(run))
    assert tree_snapshot(run) == before


def test_resume_without_state_after_finished_epochs_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_json(*TINY, "--epochs", "2", "--out", run)
    (run / "summary.json").unlink()
    (run / "state.safetensors").unlink()
    result = run_cli("train", "--resume", run, expect=2)
    assert_clean_failure(result, "finished 2 epoch(s)", "--init")
