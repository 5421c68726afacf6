"""A run normalises its images with the statistics of its training split alone: the
validation images must not leak into them."""

from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from distml.checkpoint import load_checkpoint
from distml.data import make_splits, make_synthetic


def population_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    pixels = images.to(torch.float64).reshape(-1, images.shape[-1]) / 255
    return pixels.mean(0).tolist(), pixels.std(0, unbiased=False).tolist()


def test_normalisation_is_that_of_the_training_split_alone(tmp_path: Path):
    run = ["--epochs", "1", "--set", "data.val_fraction=0.3", "--seed", "5"]
    run_cli("train", *TINY, *run, "--out", tmp_path / "run")
    stored = load_checkpoint(tmp_path / "run" / "best.safetensors").normalization
    dataset = make_synthetic(1000, 201)
    train_images = make_splits(dataset, 0.3, seed=5).train_images
    mean, std = population_stats(train_images)
    assert stored["mean"] == pytest.approx(mean, abs=1e-9)
    assert stored["std"] == pytest.approx(std, abs=1e-9)
    # the training and validation images together give other statistics: no leak
    leaked_mean, _ = population_stats(dataset.train_images)
    assert max(abs(a - b) for a, b in zip(leaked_mean, mean, strict=True)) > 1e-6
