"""``distml lr-find``: the learning-rate range test (Leslie Smith 2015; as in fastai and
Lightning).

The learning rate grows exponentially from ``start_lr`` to ``end_lr`` over ``steps`` optimizer
steps of a fresh model; the loss of each step is smoothed with an exponential moving average
(``beta``, bias-corrected) and the test stops early once the smoothed loss exceeds
``stop_factor`` times its best value (or is not finite).

Suggestion rule (documented, tested): the learning rate where the smoothed loss falls
fastest, i.e. the most negative slope of smoothed loss against log10(lr), ignoring the first
``skip_start`` points (their average is still settling) and the last point (Lightning's rule).
Nothing is written to any run folder or checkpoint: the model lives only in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The learning rate of step ``step`` (0-based) of an exponential ramp over ``steps``."""
    if steps == 1:
        return start_lr
    return start_lr * (end_lr / start_lr) ** (step / (steps - 1))


def smoothed(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average of the losses (as fastai's recorder)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def should_stop(smooth_loss: float, best: float, stop_factor: float) -> bool:
    """Stop once the smoothed loss diverges: above ``stop_factor`` x its best, or not finite."""
    return not math.isfinite(smooth_loss) or smooth_loss > stop_factor * best


def steepest_index(lrs: Sequence[float], smooth: Sequence[float], skip_start: int) -> int | None:
    """Index of the most negative slope d(loss)/d(log10 lr), skipping the first ``skip_start``
    points and the last; None when too few points remain."""
    first = min(skip_start, max(0, len(lrs) - 3))
    best_index, best_slope = None, 0.0
    for i in range(first, len(lrs) - 1):
        run = math.log10(lrs[i + 1]) - math.log10(lrs[i])
        slope = (smooth[i + 1] - smooth[i]) / run
        if slope < best_slope:
            best_index, best_slope = i, slope
    return best_index


@dataclass
class RangeTest:
    """What the range test recorded: one entry per optimizer step taken."""

    lrs: list[float]
    losses: list[float]
    smooth: list[float]
    stopped_early: bool
    suggestion_index: int | None

    @property
    def suggested_lr(self) -> float | None:
        return None if self.suggestion_index is None else self.lrs[self.suggestion_index]

    def as_dict(self) -> dict[str, object]:
        return {
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed_losses": self.smooth,
            "stopped_early": self.stopped_early,
            "suggested_lr": self.suggested_lr,
            "suggestion_index": self.suggestion_index,
            "rule": "steepest descent of the smoothed loss against log10(lr)",
        }
