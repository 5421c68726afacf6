"""The training loop itself (``train.train_epoch``) and its schedule (``train.lr_factor``),
driven directly on a tiny model: no CLI, no files, a second per test.

The loop is compared with a plain PyTorch loop written here from scratch (forward, mean
cross-entropy, backward, ``optimizer.step()``, ``zero_grad``, ``scheduler.step()``) on the
same batches: the weights after an epoch, the per-step losses the loop reports and its running
totals must agree. The schedule's expected values are written from the README's formulas.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import pytest
import torch

from distml.config import TrainConfig
from distml.dist import RunContext
from distml.errors import TrainingDiverged
from distml.train import (
    CHECK_EVERY,
    HostSync,
    LoopState,
    NonFiniteWatch,
    lr_factor,
    prepare,
    train_epoch,
)

CPU = RunContext("single", 0, 0, 1, torch.device("cpu"), None)


def config(**train) -> TrainConfig:
    """400 training images (500, 20% held out), a tiny CNN without BatchNorm (so micro-batches
    and whole batches give the same gradients), plain SGD with a linear schedule."""
    settings = {"batch_size": 40, "epochs": 2, "seed": 3, "device": "cpu", "label_smoothing": 0}
    settings.update(train)
    return TrainConfig.model_validate(
        {
            "data": {
                "dataset": "synthetic",
                "synthetic_train_size": 500,
                "synthetic_test_size": 10,
                "val_fraction": 0.2,
            },
            "model": {"width": 0.125, "depth": 2, "norm": "none"},
            "optim": {
                "optimizer": "sgd",
                "lr": 0.05,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "scheduler": "onecycle",
                "warmup_fraction": 0.25,
            },
            "train": settings,
        }
    )


@dataclass
class Stop:
    """A stop flag that is raised once the optimizer has taken `after` steps."""

    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    after: int | None = None

    @property
    def signum(self) -> int:
        if self.after is None or self.scheduler is None:
            return 0
        return 2 if self.scheduler.last_epoch >= self.after else 0


@dataclass
class Task:
    """Records what the loop reports to the progress bar."""

    advances: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    def advance(self, count: int, status: str = "") -> None:
        self.advances.append(count)
        self.statuses.append(status)


class Watch(NonFiniteWatch):
    """The real non-finite watch, recording the per-step losses it is shown."""

    def __init__(self, patience: int = 3):
        super().__init__(patience)
        self.seen: list[float] = []

    def check(self, losses: list[float], epoch: int, first_step: int) -> None:
        assert first_step == len(self.seen), "each step is checked once, in order"
        self.seen += losses
        super().check(losses, epoch, first_step)


def run_epoch(session, loop, cfg, *, stop=None, watch=None, task=None) -> bool:
    return train_epoch(session, loop, cfg, CPU, watch or Watch(), stop or Stop(), task or Task())


def reference_epoch(session, cfg, epoch: int) -> tuple[list[float], int, torch.Tensor]:
    """Plain PyTorch on a copy of the session's model, optimizer state and schedule: returns
    the per-step mean losses, the correct predictions and the final weights, flattened."""
    model = copy.deepcopy(session.bare)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
        weight_decay=cfg.optim.weight_decay,
    )
    steps = session.batches.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps))
    # where the session stands: momentum buffers, the schedule's step and rate
    optimizer.load_state_dict(copy.deepcopy(session.optimizer.state_dict()))
    scheduler.load_state_dict(session.scheduler.state_dict())
    assert scheduler.last_epoch == (epoch - 1) * steps
    model.train()
    losses, correct = [], 0
    for micro_batches in session.batches.epoch(epoch):
        images = torch.cat([x for x, _ in micro_batches])
        labels = torch.cat([y for _, y in micro_batches])
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        correct += int((logits.argmax(1) == labels).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    return losses, correct, flat(model)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- one epoch


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_an_epoch_equals_plain_pytorch_on_the_same_batches(accum_steps):
    cfg = config(accum_steps=accum_steps)
    session = prepare(cfg, CPU, None)
    assert session.batches.steps_per_epoch == 10
    expected_losses, expected_correct, expected_weights = reference_epoch(session, cfg, epoch=1)

    loop, watch, task = LoopState(), Watch(), Task()
    assert run_epoch(session, loop, cfg, watch=watch, task=task) is True

    assert torch.allclose(flat(session.bare), expected_weights, atol=1e-5, rtol=1e-4)
    # the watch sees each optimizer step's mean loss (accumulated micro-batches summed)
    assert watch.seen == pytest.approx(expected_losses, rel=1e-4)
    assert loop.step == 10
    loss_sum, correct, seen = loop.totals
    assert seen == 400
    assert loss_sum / seen == pytest.approx(sum(expected_losses) / 10, rel=1e-4)
    assert correct == expected_correct
    # the schedule moved once per optimizer step
    assert session.scheduler.last_epoch == 10
    assert session.optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.optim.lr * lr_factor(10, cfg, 10)
    )
    # the gradients are released after the last step
    assert all(p.grad is None for p in session.params)
    assert loop.seconds > 0


def test_the_second_epoch_continues_the_schedule_and_the_data_order():
    cfg = config()
    session = prepare(cfg, CPU, None)
    loop = LoopState()
    run_epoch(session, loop, cfg)
    loop.epoch, loop.step, loop.totals = 2, 0, [0.0, 0.0, 0.0]
    expected_losses, expected_correct, expected_weights = reference_epoch(session, cfg, epoch=2)
    watch = Watch()
    run_epoch(session, loop, cfg, watch=watch)
    assert watch.seen == pytest.approx(expected_losses, rel=1e-4)
    assert torch.allclose(flat(session.bare), expected_weights, atol=1e-5, rtol=1e-4)
    assert session.scheduler.last_epoch == 20
    assert loop.totals[1:] == [expected_correct, 400]  # this epoch's images only


def test_progress_advances_by_every_step_with_the_running_totals():
    cfg = config()
    session = prepare(cfg, CPU, None)
    task = Task()
    loop = LoopState()
    run_epoch(session, loop, cfg, task=task)
    # 10 steps < CHECK_EVERY: one sync, at the end of the epoch
    assert CHECK_EVERY > 10
    assert task.advances == [10]
    loss = loop.totals[0] / loop.totals[2]
    accuracy = loop.totals[1] / loop.totals[2]
    assert task.statuses == [f"loss {loss:.3f} acc {accuracy:.1%}"]


def test_the_loop_syncs_every_check_every_steps_and_at_the_end():
    cfg = config(batch_size=8)  # 50 steps: syncs after 25 and 50
    session = prepare(cfg, CPU, None)
    task, watch = Task(), Watch()
    run_epoch(session, LoopState(), cfg, task=task, watch=watch)
    assert CHECK_EVERY == 25
    assert task.advances == [25, 25]
    assert len(watch.seen) == 50


def test_a_stop_ends_the_epoch_after_the_step_in_progress_and_resuming_finishes_it_exactly():
    cfg = config()
    whole = prepare(cfg, CPU, None)
    run_epoch(whole, LoopState(), cfg)

    session = prepare(cfg, CPU, None)
    loop, watch = LoopState(), Watch()
    finished = run_epoch(session, loop, cfg, stop=Stop(session.scheduler, after=4), watch=watch)
    assert finished is False
    assert loop.step == 4 and session.scheduler.last_epoch == 4
    assert loop.totals[2] == 4 * 40
    assert len(watch.seen) == 4

    # the same loop state continues at step 4 (as --resume does) and ends where `whole` did
    assert run_epoch(session, loop, cfg, watch=watch) is True
    assert loop.step == 10 and loop.totals[2] == 400
    assert torch.allclose(flat(session.bare), flat(whole.bare), atol=1e-6)


def test_a_stop_at_the_last_step_still_counts_as_a_finished_epoch():
    cfg = config()
    session = prepare(cfg, CPU, None)
    loop = LoopState()
    assert run_epoch(session, loop, cfg, stop=Stop(session.scheduler, after=10)) is True
    assert loop.step == 10


def test_non_finite_losses_stop_the_run_after_the_patience():
    cfg = config()
    session = prepare(cfg, CPU, None)
    with torch.no_grad():
        for p in session.params:
            p.fill_(float("nan"))
    loop = LoopState()
    with pytest.raises(
        TrainingDiverged, match=r"for 3 consecutive steps \(up to step 3 of epoch 1\)"
    ):
        run_epoch(session, loop, cfg, watch=Watch(patience=3))


def test_non_finite_run_is_kept_in_the_loop_state():
    cfg = config()
    session = prepare(cfg, CPU, None)
    loop = LoopState()
    watch = Watch(patience=1000)
    watch.run = 7  # a run of non-finite steps carried over from earlier; finite steps reset it
    run_epoch(session, loop, cfg, watch=watch)
    assert loop.nonfinite_run == 0


def test_frozen_features_keep_their_batchnorm_statistics():
    with_bn = config().model_dump()
    with_bn["model"]["norm"] = "batch"
    cfg = TrainConfig.model_validate(with_bn)
    session = prepare(cfg, CPU, None)
    # the loop reads only the flag (a real run also needs --init, which is not the point here)
    frozen = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"freeze_features": True})}
    )
    before = {k: v.clone() for k, v in session.bare.features.state_dict().items()}
    run_epoch(session, LoopState(), frozen)
    after = session.bare.features.state_dict()
    assert any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before if "running" in k)
    # without the flag the statistics move
    run_epoch(session, LoopState(), cfg)
    moved = session.bare.features.state_dict()
    assert any(not torch.equal(before[k], moved[k]) for k in before if "running_mean" in k)


# ----------------------------------------------------------------------------- the schedule


def schedule(scheduler: str, epochs: int = 10, **optim) -> TrainConfig:
    return TrainConfig.model_validate(
        {"train": {"epochs": epochs}, "optim": {"scheduler": scheduler, **optim}}
    )


def test_step_schedule_decays_every_step_size_epochs():
    cfg = schedule("step", step_size=3, gamma=0.5)
    steps = 5  # per epoch
    factors = [lr_factor(s, cfg, steps) for s in range(50)]
    # epochs 1-3 (steps 0-14) at 1, epochs 4-6 at 0.5, 7-9 at 0.25, 10 at 0.125
    assert factors == [1.0] * 15 + [0.5] * 15 + [0.25] * 15 + [0.125] * 5


def test_cosine_schedule_from_one_to_zero_and_flat_past_the_end():
    cfg = schedule("cosine", epochs=4)
    total = 4 * 25
    for s in (0, 1, 25, 50, 73, 99, 100):
        assert lr_factor(s, cfg, 25) == pytest.approx(0.5 * (1 + math.cos(math.pi * s / total)))
    assert lr_factor(0, cfg, 25) == 1.0
    assert lr_factor(50, cfg, 25) == pytest.approx(0.5)
    assert lr_factor(100, cfg, 25) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(150, cfg, 25) == pytest.approx(0.0, abs=1e-12)  # extra steps stay at 0


@pytest.mark.parametrize(
    ("fraction", "total", "warm"),
    [(0.25, 40, 10), (0.3, 15, 4), (0.1, 5, 1), (0.01, 10, 1), (0.5, 9, 4), (0.8, 5, 4)],
)
def test_onecycle_warms_up_linearly_then_decays_linearly_to_zero(fraction, total, warm):
    # warm = round(fraction * total), at least 1: 4.5 rounds to 4 (banker's), 0.1 -> 1
    cfg = schedule("onecycle", epochs=total, warmup_fraction=fraction)
    factors = [lr_factor(s, cfg, 1) for s in range(total + 3)]
    expected = [(s + 1) / warm if s < warm else (total - s) / (total - warm) for s in range(total)]
    assert factors[:total] == pytest.approx(expected)
    assert max(factors) == 1.0 and factors.index(1.0) == warm - 1
    assert factors[total:] == [0.0, 0.0, 0.0]  # never negative past the end


def test_onecycle_with_the_whole_run_as_warm_up():
    cfg = schedule("onecycle", epochs=4, warmup_fraction=0.9)  # round(3.6) = all 4 steps
    assert [lr_factor(s, cfg, 1) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 0.0, 0.0]


def test_no_schedule_keeps_the_rate():
    cfg = schedule("none")
    assert {lr_factor(s, cfg, 7) for s in range(0, 200, 13)} == {1.0}


def test_the_non_finite_watch_counts_consecutive_steps_across_calls_and_names_the_step():
    nan = float("nan")
    watch = NonFiniteWatch(patience=3)
    watch.check([0.5, nan, nan], epoch=3, first_step=10)  # a run of 2: not yet
    assert watch.run == 2
    with pytest.raises(TrainingDiverged) as err:
        watch.check([float("inf"), 0.1], epoch=3, first_step=13)  # the 3rd is step 14
    assert str(err.value) == (
        "the training loss was not finite for 3 consecutive steps (up to step 14 of epoch 3). "
        "The run stopped; the last good checkpoint is kept. Lower --lr, add warm-up, or use "
        "--precision bf16-mixed / 32."
    )
    fresh = NonFiniteWatch(patience=2)
    fresh.check([nan, 1.0, nan], epoch=1, first_step=0)  # a finite step resets the count
    assert fresh.run == 1


def test_a_resumed_epochs_totals_are_carried_by_rank_0_alone_and_counted_exactly():
    """Every sync sums the totals over the ranks; a resumed epoch's earlier totals (in the
    loop state every rank loads) must enter that sum once, from rank 0. Counts stay exact
    past 2**24 images (float32 would round 16,777,217 down)."""
    loop = LoopState(step=4, totals=[2.5, 30.0, 16_777_217.0])
    for rank, expected in ((0, [2.5, 30.0, 16_777_217.0]), (1, [0.0, 0.0, 0.0])):
        ctx = RunContext("ddp", rank, rank, 2, torch.device("cpu"), "gloo")
        sync = HostSync(ctx, loop, NonFiniteWatch(3), Stop(), Task(), steps=10)
        assert sync.totals.tolist() == expected


class RecordsNoSync(torch.nn.Module):
    """DDP's ``no_sync()`` around a model: records, per forward pass, whether it ran inside
    ``no_sync`` (DDP then skips the gradient all-reduce of that backward pass)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.inside, self.calls = net, False, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.inside)
        return self.net(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


@pytest.mark.parametrize(("mode", "accum_steps"), [("ddp", 3), ("ddp", 1), ("dp", 2)])
def test_ddp_all_reduces_the_gradients_once_per_optimizer_step(mode: str, accum_steps: int):
    """With accumulation, DDP's all-reduce runs on the last micro-step alone (the sum of the
    micro-steps' gradients is reduced once); other modes have no all-reduce to skip."""
    cfg = config(accum_steps=accum_steps, batch_size=48)
    session = prepare(cfg, CPU, None)
    session.net = RecordsNoSync(session.net)
    ctx = RunContext(mode, 0, 0, 1, torch.device("cpu"), "gloo" if mode == "ddp" else None)
    train_epoch(session, LoopState(), cfg, ctx, Watch(), Stop(), Task())
    per_step = [True] * (accum_steps - 1) + [False] if mode == "ddp" else [False] * accum_steps
    assert session.net.calls == per_step * session.batches.steps_per_epoch


def test_an_epochs_training_seconds_add_to_those_before_a_resume():
    """A resumed epoch reports the training time of both sessions (the loop state carries
    the first session's seconds), and never more than the wall time the loop took."""
    cfg = config()
    session = prepare(cfg, CPU, None)
    loop = LoopState(seconds=100.0)
    started = time.perf_counter()
    run_epoch(session, loop, cfg)
    assert 100.0 < loop.seconds <= 100.0 + (time.perf_counter() - started)
