"""Bad input ends with exit code 2, a message naming the problem, no traceback, and no
existing file changed."""

from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, tree_snapshot
from safetensors.torch import save_file


def assert_clean_failure(result, *fragments: str) -> None:
    assert "Traceback" not in result.output
    assert result.stderr.startswith("distml: error: ")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def workdir(tmp_path: Path, tiny_run, monkeypatch) -> Path:
    """A folder with a finished run and a few damaged or foreign files, as the current
    directory."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file

    shutil.copytree(tiny_run["run_dir"], tmp_path / "run")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 20)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "typo.toml").write_text("[train]\nepohcs = 3\n[modle]\narch = 'cnn'\n")
    # a dataset whose images are float32, and one whose images are not square
    float_images = {
        "train_images": torch.zeros(8, 32, 32, 3),
        "train_labels": torch.zeros(8, dtype=torch.int64),
        "test_images": torch.zeros(4, 32, 32, 3, dtype=torch.uint8),
        "test_labels": torch.zeros(4, dtype=torch.int64),
    }
    classes = {"classes": json.dumps([f"c{i}" for i in range(10)])}
    save_file(float_images, str(tmp_path / "float.safetensors"), metadata=classes)
    oblong = float_images | {"train_images": torch.zeros(8, 32, 24, 3, dtype=torch.uint8)}
    save_file(oblong, str(tmp_path / "oblong.safetensors"), metadata=classes)
    # a checkpoint whose spec names another architecture than its tensors
    best = tmp_path / "run" / "best.safetensors"
    with safe_open(str(best), "pt") as handle:
        meta = handle.metadata()
    spec = json.loads(meta["model_spec"]) | {"arch": "vgg16"}
    meta["model_spec"] = json.dumps(spec)
    save_file(load_file(str(best)), str(tmp_path / "otherarch.safetensors"), metadata=meta)
    monkeypatch.chdir(tmp_path)
    return tmp_path


TRAIN_CASES = [
    (["--epochs", "0"], ["train.epochs (--epochs)"]),
    (["--lr", "-0.1"], ["optim.lr (--lr)"]),
    (["--val-fraction", "1.5"], ["data.val_fraction (--val-fraction)"]),
    (["--set", "train.epohcs=3"], ["did you mean train.epochs"]),
    (["--set", "nonsense"], ["--set expects dotted.key=value"]),
    (["--batch-size", "30", "--accum-steps", "4"], ["not divisible by accum_steps"]),
    (["--config", "missing.toml"], ["missing.toml does not exist"]),
    (["--dataset", "missing.safetensors"], ["missing.safetensors does not exist"]),
    (["--dataset", "junk.safetensors"], ["cannot be read as safetensors"]),
    (["--dataset", "foreign.safetensors"], ["no valid 'classes' metadata"]),
    (["--out", "notes.txt"], ["is a file"]),
    (["--out", "run"], ["already holds a run"]),
    (["--save", "run"], ["is a directory"]),
    (["--init", "junk.safetensors"], ["cannot be read as safetensors"]),
    (["--init", "foreign.safetensors"], ["not a distml checkpoint"]),
    (["--device", "cuda"], ["no CUDA GPU is visible"]),
    (["--mode", "ddp", "--backend", "nccl"], ["nccl backend needs CUDA"]),
    (["--mode", "ddp", "--nproc", "2", "--batch-size", "33"], ["cannot be split evenly"]),
    (["--amp", "--precision", "bf16-mixed"], ["--amp means --precision 16-mixed"]),
    (["--config", "typo.toml"], ["did you mean train.epochs", "modle: unknown setting"]),
    (["--dataset", "float.safetensors"], ["train_images must be uint8"]),
    (["--dataset", "oblong.safetensors"], ["must be square"]),
    (["--init", "otherarch.safetensors"], ["do not fit its own model spec"]),
    (["--init", "run/best.safetensors", "--dataset", "oblong.safetensors"], ["must be square"]),
]


@pytest.mark.parametrize(("args", "fragments"), TRAIN_CASES, ids=lambda v: " ".join(v)[:40])
def test_bad_train_input(workdir: Path, monkeypatch, args, fragments):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    before = tree_snapshot(workdir)
    result = run_cli("train", *TINY, *args, expect=2)  # a repeated flag: the last one wins
    assert_clean_failure(result, *fragments)
    assert tree_snapshot(workdir) == before


def test_bad_config_file_content(workdir: Path):
    (workdir / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")
    result = run_cli("train", "--config", "bad.yaml", expect=2)
    assert_clean_failure(result, "bad.yaml cannot be parsed")


def test_unknown_choice_is_a_usage_error(workdir: Path):
    result = run_cli("train", "--norm", "weird", expect=2)
    assert "weird" in result.output and "Traceback" not in result.output


EVAL_CASES = [
    (["missing.safetensors"], ["does not exist"]),
    (["junk.safetensors"], ["cannot be read as safetensors"]),
    (["foreign.safetensors"], ["not a distml checkpoint"]),
    (["run/best.safetensors", "--dataset", "junk.safetensors"], ["cannot be read"]),
    (["run/best.safetensors", "--batch-size", "0"], ["batch_size (--batch-size)"]),
    (["run/best.safetensors", "--out", "notes.txt"], ["is a file"]),
    (["otherarch.safetensors"], ["do not fit its own model spec"]),
    (["run/best.safetensors", "--dataset", "float.safetensors"], ["must be uint8"]),
]


@pytest.mark.parametrize(("args", "fragments"), EVAL_CASES, ids=lambda v: " ".join(v)[:40])
def test_bad_eval_input(workdir: Path, args, fragments):
    before = tree_snapshot(workdir)
    result = run_cli("eval", *args, "--device", "cpu", "--quiet", expect=2)
    assert_clean_failure(result, *fragments)
    assert tree_snapshot(workdir) == before


def test_eval_on_data_with_other_classes(workdir: Path):
    from distml.data import make_synthetic, write_dataset_file

    other = make_synthetic(40, 20)
    other = other.__class__(
        other.train_images,
        other.train_labels,
        other.test_images,
        other.test_labels,
        [f"c{i}" for i in range(10)],
        "x",
    )
    write_dataset_file(workdir / "other.safetensors", other)
    result = run_cli(
        "eval",
        "run/best.safetensors",
        "--dataset",
        "other.safetensors",
        "--device",
        "cpu",
        expect=2,
    )
    assert_clean_failure(result, "was trained on 10 classes", "same classes")


def test_truncated_checkpoint(workdir: Path):
    data = (workdir / "run" / "best.safetensors").read_bytes()
    (workdir / "cut.safetensors").write_bytes(data[: len(data) // 3])
    result = run_cli("eval", "cut.safetensors", "--device", "cpu", expect=2)
    assert_clean_failure(result, "damaged, truncated")
