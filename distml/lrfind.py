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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distml.config import LrFindSettings
from distml.progress import Reporter


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


# ----------------------------------------------------------------------------- the test run


def range_test(settings: LrFindSettings, *, show_progress: bool = True) -> RangeTest:
    """Train a fresh model (single process) with the ramped learning rate and record the
    losses; the model and its optimizer live only in memory."""
    from distml.launch import local_context, torch_settings
    from distml.train import prepare

    config = settings.training
    ctx = local_context(config)
    with torch_settings(config, ctx.device):
        session = prepare(config, ctx, None)
        session.net.train()
        lrs: list[float] = []
        losses: list[float] = []
        smooth: list[float] = []
        best, stopped = math.inf, False
        with Reporter(show_progress).task("lr range test", settings.steps) as task:
            for step, images, labels in batch_stream(session, settings.steps):
                lr = lr_at(step, settings.steps, settings.start_lr, settings.end_lr)
                for group in session.optimizer.param_groups:
                    group["lr"] = lr
                with session.autocast:
                    loss = session.criterion(session.net(images), labels)
                session.scaler.scale(loss).backward()
                session.scaler.step(session.optimizer)
                session.scaler.update()
                session.optimizer.zero_grad(set_to_none=True)
                lrs.append(lr)
                losses.append(float(loss.detach()))  # a host sync per step: the rule needs it
                smooth = smoothed(losses, settings.beta)
                best = min(best, smooth[-1])
                task.advance(1, status=f"lr {lr:.2e} loss {smooth[-1]:.3f}")
                if should_stop(smooth[-1], best, settings.stop_factor):
                    stopped = True
                    break
    index = steepest_index(lrs, smooth, settings.skip_start)
    return RangeTest(lrs, losses, smooth, stopped, index)


def batch_stream(session: Any, steps: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``steps`` training batches (the whole batch of each step; the test takes no
    accumulation), running through as many epochs as it needs."""
    step, epoch = 0, 1
    while True:
        for micro_batches in session.batches.epoch(epoch, 0):
            images, labels = zip(*micro_batches, strict=True)
            yield step, torch.cat(images), torch.cat(labels)
            step += 1
            if step == steps:
                return
        epoch += 1


def find_lr(settings: LrFindSettings, *, show_progress: bool = True) -> dict[str, Any]:
    """Run the range test; write lr_find.json and lr_find.png into the output folder."""
    from distml.dist import device_name, resolve_device
    from distml.files import atomic_write_json, check_out_dir
    from distml.plots import plot_lr_find

    out = settings.out_dir()
    check_out_dir(out, overwrite=settings.overwrite)
    test = range_test(settings, show_progress=show_progress)
    result: dict[str, Any] = {
        "model": settings.training.model.arch,
        "optimizer": settings.training.optim.optimizer,
        "batch_size": settings.training.train.batch_size,
        "device_name": device_name(resolve_device(settings.training.train.device)),
        "start_lr": settings.start_lr,
        "end_lr": settings.end_lr,
        "steps_planned": settings.steps,
        "steps_run": len(test.lrs),
        **test.as_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_lr_find(test.lrs, test.losses, test.smooth, test.suggestion_index, out / "lr_find.png")
    result["plot"] = str(out / "lr_find.png")
    result["json"] = str(out / "lr_find.json")
    atomic_write_json(out / "lr_find.json", result)
    return result
