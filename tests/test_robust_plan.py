"""Issue 12, class 1: everything that can be checked is checked before any file is written,
and a start that fails before its first durable result leaves nothing that blocks a retry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_clean_failure, run_cli, train_json

from distml.data import ImageDataset, make_synthetic, write_dataset_file


def small_images_dataset(path: Path, size: int) -> Path:
    """A distml dataset file of ``size`` x ``size`` images (the synthetic set, cropped)."""
    full = make_synthetic(200, 50)
    write_dataset_file(
        path,
        ImageDataset(
            full.train_images[:, :size, :size].contiguous(),
            full.train_labels,
            full.test_images[:, :size, :size].contiguous(),
            full.test_labels,
            full.classes,
            "small",
        ),
    )
    return path


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        # 1000 images minus the 10% validation split leave 900
        (["--batch-size", "1024"], ["--batch-size 1024 is larger than the 900 training images"]),
        (["--set", "dist.rdzv_endpoint=node0"], ["rdzv_endpoint must be HOST:PORT"]),
        (["--mode", "ddp", "--rdzv-endpoint", "host:99999"], ["port from 1 to 65535"]),
        (["--nproc", "2"], ["nproc only apply to mode ddp"]),
        (["--mode", "dp", "--backend", "gloo"], ["backend only apply to mode ddp"]),
    ],
)
def test_bad_plans_fail_before_the_run_folder_exists(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "run"
    result = run_cli("train", *TINY, *args, "--out", out, expect=2)
    assert_clean_failure(result, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(("model", "size"), [("vgg16", 16), ("cnn", 4)])
def test_a_model_too_deep_for_the_images_fails_before_any_file(
    tmp_path: Path, model: str, size: int
) -> None:
    data = small_images_dataset(tmp_path / "small.safetensors", size)
    out = tmp_path / "run"
    args = [*TINY, "--dataset", data, "--model", model, "--out", out]
    result = run_cli("train", *args, expect=2)
    assert_clean_failure(result, f"cannot take the dataset's {size}x{size} images")
    assert not out.exists()


def test_a_failed_start_leaves_no_folder_and_a_retry_works(tmp_path: Path, monkeypatch) -> None:
    import distml.launch

    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash before the first epoch ended")

    monkeypatch.setattr(distml.launch, "fit", broken)
    with pytest.raises(AssertionError, match="exit code 1"):
        run_cli("train", *TINY, "--out", out)
    assert not out.exists()  # no lone config.json left behind
    monkeypatch.undo()
    summary = train_json(*TINY, "--epochs", "1", "--out", out)
    assert summary["epochs_run"] == 1


def test_a_lone_config_from_an_old_failed_start_does_not_block(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what older versions left after a failed start
    summary = train_json(*TINY, "--epochs", "1", "--out", out)
    assert summary["epochs_run"] == 1
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 1


def test_a_run_with_a_finished_epoch_is_never_reused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_json(*TINY, "--epochs", "1", "--out", out)
    before = (out / "metrics.csv").read_bytes()
    result = run_cli("train", *TINY, "--out", out, expect=2)
    assert_clean_failure(result, "already holds a run", f"--resume {out}", "--name")
    assert (out / "metrics.csv").read_bytes() == before


def test_model_plan_check_builds_nothing_real(tmp_path: Path) -> None:
    # the meta-device check must not leave meta tensors as a default for later work
    train_json(*TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert torch.empty(1).device.type == "cpu"
