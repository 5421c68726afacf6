"""The overfitting verdict in summary.json: each of its conditions, flipped alone, changes it.

Overfitting is reported when the validation loss ends more than 10% above its minimum, at
least 2 epochs after that minimum, while the training loss kept falling; or when training
accuracy ends more than 10 points above validation accuracy.
"""

from typing import Any

import pytest

from distml.metrics import overfitting_verdict


def curve(
    val_losses: list[float],
    *,
    last_train_loss: float = 0.5,
    train_accuracy: float = 0.61237,
    val_accuracy: float = 0.55,
) -> list[dict[str, Any]]:
    """Epoch rows: training loss 1.0 on every epoch but the last, and the given accuracies."""
    rows = [
        {
            "epoch": epoch,
            "train_loss": 1.0,
            "train_accuracy": train_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        for epoch, val_loss in enumerate(val_losses, 1)
    ]
    rows[-1]["train_loss"] = last_train_loss
    return rows


# minimum 0.625 at epoch 2, last 1.00003 at epoch 5: 60.0048% above the minimum, 3 epochs later
RISING = [0.8, 0.625, 0.7, 0.9, 1.00003]


def test_rising_validation_loss_with_falling_training_loss_is_overfitting():
    verdict = overfitting_verdict(curve(RISING))
    assert verdict["detected"] is True
    assert verdict["val_loss_min_epoch"] == 2
    assert verdict["val_loss_rise"] == 0.6  # rounded to 4 decimals
    assert verdict["gap_points"] == 6.24  # 6.237 points, rounded to 2 decimals
    assert "60%" in verdict["verdict"] and "epoch 2 of 5" in verdict["verdict"]


@pytest.mark.parametrize(
    ("flipped", "rows"),
    [
        # the rise exactly 10%, not more (0.6875 / 0.625 = 1.1 exactly in binary)
        ("rise", curve([0.8, 0.625, 0.65, 0.66, 0.6875])),
        # the minimum only 1 epoch before the end
        ("epochs after the minimum", curve([0.8, 0.7, 0.7, 0.625, 0.75])),
        # the training loss did not fall below its value at the minimum
        ("training loss", curve(RISING, last_train_loss=1.0)),
    ],
)
def test_each_loss_condition_alone_clears_the_verdict(flipped: str, rows: list[dict[str, Any]]):
    verdict = overfitting_verdict(rows)
    assert verdict["detected"] is False, flipped
    # whatever the words, the verdict gives the numbers it judged
    minimum = min(rows, key=lambda row: row["val_loss"])["epoch"]
    assert f"epoch {minimum} of 5" in verdict["verdict"], flipped
    assert f"{verdict['gap_points']:.1f}" in verdict["verdict"], flipped
    if flipped == "training loss":
        assert "60%" in verdict["verdict"]


def test_the_minimum_exactly_two_epochs_back_counts():
    assert overfitting_verdict(curve([0.8, 0.7, 0.625, 0.7, 0.75]))["detected"] is True


def test_accuracy_gap_alone_is_overfitting_above_ten_points():
    flat = [0.8, 0.7, 0.65, 0.64, 0.63]  # the validation loss still falling
    wide = overfitting_verdict(curve(flat, train_accuracy=0.9, val_accuracy=0.75))
    assert wide["detected"] is True and wide["gap_points"] == pytest.approx(15.0)
    assert "15.0" in wide["verdict"]
    # 0.31 - 0.21 is exactly 10 points in floating point: not more than 10
    edge = overfitting_verdict(curve(flat, train_accuracy=0.31, val_accuracy=0.21))
    assert edge["detected"] is False and edge["gap_points"] == 10.0
    assert overfitting_verdict(curve(flat))["detected"] is False


def test_only_epochs_with_a_validation_loss_count():
    rows = [*curve(RISING), {"epoch": 6, "train_loss": 0.1, "val_loss": None}]
    assert overfitting_verdict(rows)["val_loss_min_epoch"] == 2
    assert overfitting_verdict(rows)["detected"] is True
    no_val = [{**row, "val_loss": None} for row in curve(RISING)]
    assert overfitting_verdict(no_val)["detected"] is None
    assert "no validation set" in overfitting_verdict(no_val)["verdict"]
    assert overfitting_verdict([])["detected"] is None


# Every branch of the verdict, word for word: the sentence a report quotes. The rises are
# chosen so that a wrong factor changes the printed percentage (9.45% prints as 9%).
WITHIN = [1.2, 1.0, 1.05, 1.08, 1.0945]  # minimum 1.0 at epoch 2, ends 9.45% above it
HIGH_GAP = {"train_accuracy": 0.9, "val_accuracy": 0.55}  # 35.0 points


@pytest.mark.parametrize(
    ("rows", "text"),
    [
        (
            curve(RISING),
            "Overfitting: validation loss rose 60% above its minimum (lowest at epoch 2 of 5) "
            "while the training loss kept falling; train/validation accuracy gap 6.2 points.",
        ),
        (
            curve(WITHIN, **HIGH_GAP),
            "Overfitting: training accuracy is 35.0 points above validation accuracy, although "
            "the validation loss is within 10% of its minimum (9% above, lowest at epoch 2 of "
            "5).",
        ),
        (
            curve(RISING, last_train_loss=1.0, **HIGH_GAP),
            "Overfitting: training accuracy is 35.0 points above validation accuracy, and the "
            "validation loss is 60% above its minimum (lowest at epoch 2 of 5).",
        ),
        (
            curve(RISING, last_train_loss=1.0),
            "Unstable training rather than overfitting: the validation loss is 60% above its "
            "minimum (lowest at epoch 2 of 5), but the training loss rose too; "
            "train/validation accuracy gap 6.2 points.",
        ),
        (
            curve([0.8, 0.7, 0.7, 0.625, 1.00003]),
            "Possible overfitting, too early to tell: the validation loss is 60% above its "
            "minimum (lowest at epoch 4 of 5), 1 epoch(s) after it (the verdict needs 2) while "
            "the training loss fell; train/validation accuracy gap 6.2 points.",
        ),
        (
            curve(WITHIN),
            "No clear overfitting: validation loss is within 10% of its minimum (9% above, "
            "lowest at epoch 2 of 5); train/validation accuracy gap 6.2 points.",
        ),
        (
            [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": None}],
            "not assessed: the run had no validation set.",
        ),
    ],
)
def test_each_verdict_reads_exactly(rows: list[dict[str, Any]], text: str):
    assert overfitting_verdict(rows)["verdict"] == text
