"""Messages that say the right thing (issue 12, part 4): each bad input ends with exit code
2, no traceback, a message naming the real problem, and the file system as it was."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import pytest
from conftest import TINY, assert_clean_failure, assert_plot, run_cli, tree_snapshot

from distml.metrics import OVERFIT_LOSS_RISE, overfitting_verdict


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("not a folder")
    return tmp_path


# ----------------------------------------------------------------------------- data folder


@pytest.mark.parametrize("data_dir", ["afile.txt", "afile.txt/cifar"])
def test_data_dir_that_is_a_file(workdir: Path, data_dir: str):
    before = tree_snapshot(workdir)
    result = run_cli("train", *TINY, "--dataset", "cifar10", "--data-dir", data_dir, expect=2)
    assert_clean_failure(result, f"--data-dir {data_dir}", "is a file, not a folder")
    assert "FileExistsError" not in result.stderr and "could not be downloaded" not in result.stderr
    assert tree_snapshot(workdir) == before and sorted(workdir.iterdir()) == [workdir / "afile.txt"]


@pytest.fixture
def failing_download(monkeypatch) -> None:
    """Offline: the download creates its folder and a partial archive, then fails."""
    import torchvision.datasets.cifar

    def download(url: str, root: str, filename: str, md5: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"first bytes of the archive")
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", download)


@pytest.mark.usefixtures("failing_download")
def test_failed_download_leaves_no_data_folder(workdir: Path):
    before = tree_snapshot(workdir)
    result = run_cli("train", *TINY, "--dataset", "cifar10", "--data-dir", "data/cifar", expect=2)
    assert_clean_failure(result, "could not be downloaded (URLError", "cifar-10-python.tar.gz")
    assert not (workdir / "data").exists()
    assert tree_snapshot(workdir) == before


@pytest.mark.usefixtures("failing_download")
def test_failed_download_keeps_what_the_folder_held(workdir: Path):
    (workdir / "data").mkdir()
    (workdir / "data" / "mine.txt").write_text("keep me")
    before = tree_snapshot(workdir)
    result = run_cli("train", *TINY, "--dataset", "cifar10", "--data-dir", "data", expect=2)
    assert_clean_failure(result, "could not be downloaded")
    assert sorted(p.name for p in (workdir / "data").iterdir()) == ["mine.txt"]
    assert tree_snapshot(workdir) == before


# ----------------------------------------------------------------------------- settings

NON_FINITE_CASES = [
    (["--lr", "nan"], "optim.lr (--lr): must be a finite number (got nan)"),
    (["--lr", "inf"], "optim.lr (--lr): must be a finite number (got inf)"),
    (["--set", "optim.momentum=-Infinity"], "optim.momentum (--momentum): must be a finite"),
    (["--set", "data.val_fraction=NaN"], "must be a finite number (got nan)"),
]


@pytest.mark.parametrize(("args", "message"), NON_FINITE_CASES, ids=lambda v: " ".join(v))
def test_non_finite_numbers(workdir: Path, args: list[str], message: str):
    before = tree_snapshot(workdir)
    result = run_cli("train", *TINY, *args, expect=2)
    assert_clean_failure(result, message)
    assert "should be" not in result.stderr.lower()
    assert tree_snapshot(workdir) == before


def test_non_finite_number_in_a_config_file(workdir: Path):
    (workdir / "nan.toml").write_text("[optim]\nweight_decay = nan\n")
    result = run_cli("train", *TINY, "--config", "nan.toml", expect=2)
    assert_clean_failure(result, "optim.weight_decay", "must be a finite number (got nan)")


def test_non_finite_study_setting(workdir: Path):
    (workdir / "study.toml").write_text('[data]\ndataset = "synthetic"\n')
    before = tree_snapshot(workdir)
    args = ["--config", "study.toml", "--out", "s", "--feature-tolerance", "nan", "-q"]
    result = run_cli("study", *args, expect=2)
    assert_clean_failure(result, "feature_tolerance", "must be a finite number (got nan)")
    assert tree_snapshot(workdir) == before


SET_CASES = [
    ("optim=5", "optim: this is a section, not a value; set one of its keys, e.g. optim."),
    ("model=[1]", "model: this is a section, not a value"),
    ("optim.momentum.x=1", "optim.momentum (--momentum): this is a single value, not a section"),
    ("train.epochs.x=1", "cannot set train.epochs.x: train.epochs is a single value, not a"),
]


@pytest.mark.parametrize(("assignment", "message"), SET_CASES)
def test_sections_and_values_mixed_up(workdir: Path, assignment: str, message: str):
    result = run_cli("train", *TINY, "--set", assignment, expect=2)
    assert_clean_failure(result, message)
    assert "Settings" not in result.stderr  # no internal class names
    assert not (workdir / "artifacts").exists()


CONFIG_FILE_CASES = [
    # mistyped keys get a suggestion, also across sections
    ("top.toml", "lr = 0.1\n", "lr: unknown setting; did you mean optim.lr?"),
    (
        "section.toml",
        "[trian]\nepochs = 2\n",
        "trian: unknown setting; did you mean the section train?",
    ),
    (
        "section.yaml",
        "optm:\n  lr: 0.1\n",
        "optm: unknown setting; did you mean the section optim?",
    ),
    ("key.json", '{"train": {"epohcs": 2}}', "train.epohcs: unknown setting; did you mean"),
    ("moved.toml", "[train]\nlr = 0.1\n", "train.lr: unknown setting; did you mean optim.lr?"),
    # syntax errors give the line and column
    ("bad.yaml", "optim:\n  lr: [0.1\n  x: 1\n", "but got ':' (at line 3, column 4)"),
    ("tab.yaml", "train:\n\tepochs: 1\n", "cannot start any token (at line 2, column 1)"),
    ("bad.toml", "[optim]\nlr = = 0.1\n", "Invalid value (at line 2, column 6)"),
    ("bad.json", '{"optim": {"lr": 0.1,}}', "(at line 1, column 22)"),
]


@pytest.mark.parametrize(("name", "text", "message"), CONFIG_FILE_CASES, ids=lambda v: str(v)[:20])
def test_config_file_problems(workdir: Path, name: str, text: str, message: str):
    (workdir / name).write_text(text)
    before = tree_snapshot(workdir)
    result = run_cli("train", *TINY, "--config", name, expect=2)
    assert_clean_failure(result, message)
    assert tree_snapshot(workdir) == before


# ----------------------------------------------------------------------------- outputs


def test_metrics_csv_has_plain_newlines(tiny_run):
    data = (Path(tiny_run["run_dir"]) / "metrics.csv").read_bytes()
    assert b"\r" not in data
    lines = data.decode().split("\n")
    assert lines[0].startswith("epoch,train_loss") and lines[-1] == ""
    assert len(lines) == 1 + tiny_run["epochs_run"] + 1


def test_confusion_plot_title_names_the_run(tiny_run, tmp_path: Path, monkeypatch):
    import distml.evaluate

    titles: list[str] = []
    draw = distml.evaluate.plot_confusion
    monkeypatch.setattr(
        distml.evaluate,
        "plot_confusion",
        lambda matrix, classes, path, title: (
            titles.append(title) or draw(matrix, classes, path, title)
        ),
    )
    best = Path(tiny_run["run_dir"]) / "best.safetensors"
    out = tmp_path / "eval"
    run_cli("eval", best, "--device", "cpu", "--out", out, "--quiet")
    run_name = Path(tiny_run["run_dir"]).name
    assert titles == [f"{run_name}/best.safetensors: test accuracy {titles[0].split()[-1]}"]
    assert_plot(out / "confusion.png")


# ----------------------------------------------------------------------------- overfitting


def row(epoch: int, train_loss: float, val_loss: float, train_acc: float, val_acc: float):
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
    }


VERDICT_CASES = {
    "loss rising while training loss falls": (
        [
            row(1, 1.0, 0.9, 0.6, 0.6),
            row(2, 0.6, 0.7, 0.8, 0.75),
            row(3, 0.3, 0.8, 0.85, 0.76),
            row(4, 0.1, 0.95, 0.84, 0.75),
        ],
        True,
        "Overfitting: validation loss rose 36% above its minimum (lowest at epoch 2 of 4) while",
    ),
    "wide gap, loss at its minimum": (
        [row(1, 1.0, 0.9, 0.6, 0.55), row(2, 0.4, 0.8, 0.9, 0.7)],
        True,
        "Overfitting: training accuracy is 20.0 points above validation accuracy, although the "
        "validation loss is within 10% of its minimum (0% above",
    ),
    "wide gap, loss up too": (
        [row(1, 1.0, 0.9, 0.6, 0.55), row(2, 0.4, 0.5, 0.9, 0.7), row(3, 0.3, 0.8, 0.95, 0.7)],
        True,
        "Overfitting: training accuracy is 25.0 points above validation accuracy, and the "
        "validation loss is 60% above its minimum",
    ),
    "both losses rising": (
        [
            row(1, 1.0, 0.9, 0.6, 0.6),
            row(2, 0.5, 0.3, 0.7, 0.7),
            row(3, 1.5, 0.9, 0.7, 0.65),
            row(4, 2.0, 0.92, 0.6, 0.6),
        ],
        False,
        "Unstable training rather than overfitting: the validation loss is 207% above its "
        "minimum (lowest at epoch 2 of 4), but the training loss rose too",
    ),
    "a rise of one epoch": (
        [row(1, 1.0, 0.9, 0.6, 0.6), row(2, 0.5, 0.3, 0.7, 0.7), row(3, 0.4, 0.92, 0.72, 0.7)],
        False,
        "Possible overfitting, too early to tell: the validation loss is 207% above its minimum",
    ),
    "healthy": (
        [row(1, 1.0, 0.9, 0.6, 0.62), row(2, 0.7, 0.6, 0.75, 0.76), row(3, 0.6, 0.62, 0.8, 0.78)],
        False,
        "No clear overfitting: validation loss is within 10% of its minimum (3% above, lowest "
        "at epoch 2 of 3); train/validation accuracy gap 2.0 points.",
    ),
}


@pytest.mark.parametrize("case", list(VERDICT_CASES))
def test_overfitting_verdict_words_follow_the_numbers(case: str):
    history, detected, start = VERDICT_CASES[case]
    verdict = overfitting_verdict(history)
    assert verdict["detected"] is detected
    assert verdict["verdict"].startswith(start), verdict["verdict"]
    # "at its minimum" words only where the number says so, and the reverse
    near_minimum = "within 10% of its minimum" in verdict["verdict"]
    assert near_minimum == (verdict["val_loss_rise"] <= OVERFIT_LOSS_RISE)
    assert verdict["verdict"].startswith(("Overfitting", "Possible", "Unstable")) or (
        verdict["val_loss_rise"] <= OVERFIT_LOSS_RISE
    )


def test_no_validation_set_is_not_assessed():
    verdict = overfitting_verdict([row(1, 1.0, None, 0.6, None)])  # type: ignore[arg-type]
    assert verdict["detected"] is None and "not assessed" in verdict["verdict"]
    assert json.dumps(verdict)
