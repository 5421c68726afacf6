"""The training state --resume reads back (state.safetensors): everything in it survives a
save and a load, so a resumed run takes exactly the step it would have taken."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distml.checkpoint import TrainingState, load_training_state, save_training_state
from distml.errors import DistmlError


def trained_pieces() -> tuple[
    torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def test_every_part_round_trips(tmp_path: Path):
    model, optimizer, scheduler = trained_pieces()
    optim_state = optimizer.state_dict()
    optim_state["state"][1]["visits"] = 3  # some optimizers keep plain numbers, too
    best = {k: v + 1 for k, v in model.state_dict().items()}
    written = TrainingState(
        model=model.state_dict(),
        best=best,
        optimizer=optim_state,
        scheduler=scheduler.state_dict(),
        scaler={"scale": 1024.0, "growth_tracker": 2},
        rng={"cpu.0": torch.get_rng_state(), "cpu.1": torch.get_rng_state() + 1},
        loop={"epoch": 2, "step": 7, "best_val": 0.5, "history": [{"epoch": 1}]},
        world_size=2,
    )
    save_training_state(tmp_path / "state.safetensors", written)
    read = load_training_state(tmp_path / "state.safetensors")

    assert read.model.keys() == written.model.keys()
    assert all(torch.equal(read.model[k], v) for k, v in written.model.items())
    assert read.best is not None and read.best.keys() == best.keys()
    assert all(torch.equal(read.best[k], v) for k, v in best.items())
    assert read.rng.keys() == {"cpu.0", "cpu.1"}
    assert all(torch.equal(read.rng[k], v) for k, v in written.rng.items())
    assert read.scheduler == scheduler.state_dict()
    assert read.scaler == {"scale": 1024.0, "growth_tracker": 2}
    assert read.loop == written.loop
    assert read.world_size == 2
    # JSON keeps the groups' values; tuples (Adam's betas) come back as lists
    assert read.optimizer["param_groups"] == json.loads(json.dumps(optim_state["param_groups"]))
    assert read.optimizer["state"].keys() == optim_state["state"].keys()
    for index, entries in optim_state["state"].items():
        assert read.optimizer["state"][index].keys() == entries.keys()
        for key, value in entries.items():
            got = read.optimizer["state"][index][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value


def test_a_resumed_optimizer_takes_the_same_next_step(tmp_path: Path):
    model, optimizer, scheduler = trained_pieces()
    state = TrainingState(
        model=model.state_dict(), best=None, optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), scaler=None, rng={}, loop={}, world_size=1,
    )  # fmt: skip
    save_training_state(tmp_path / "state.safetensors", state)
    read = load_training_state(tmp_path / "state.safetensors")
    assert read.best is None and read.scaler is None

    resumed, resumed_optimizer, resumed_scheduler = trained_pieces()
    resumed.load_state_dict(read.model)
    resumed_optimizer.load_state_dict(read.optimizer)
    resumed_scheduler.load_state_dict(read.scheduler)
    batch = torch.randn(5, 3)
    for net, opt in ((model, optimizer), (resumed, resumed_optimizer)):
        net(batch).square().mean().backward()
        opt.step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_files_that_are_not_a_training_state(tmp_path: Path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "other"})
    with pytest.raises(DistmlError) as caught:
        load_training_state(foreign)
    assert str(caught.value) == f"{foreign} is not a distml training state (state.safetensors)."
    partial = tmp_path / "partial.safetensors"
    save_file({"x": torch.zeros(1)}, str(partial), metadata={"format": "distml-train-state"})
    with pytest.raises(DistmlError) as caught:
        load_training_state(partial)
    assert str(caught.value).startswith(f"training state {partial} is damaged (KeyError: ")
    assert str(caught.value).endswith("the run cannot be resumed from it.")


def test_restored_optimizer_state_takes_the_parameters_memory_layout():
    # a saved state comes back contiguous; CUDA's fused optimizers refuse a momentum buffer
    # whose strides differ from its channels-last parameter's (seen on an H100 at resume)
    from distml.train import match_param_layout

    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    for slots in saved["state"].values():
        slots["momentum_buffer"] = slots["momentum_buffer"].contiguous().clone()
    restored = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(saved)
    buffer = restored.state[conv.weight]["momentum_buffer"]
    assert buffer.stride() != conv.weight.stride()  # the layout the CUDA kernel refused
    match_param_layout(restored)
    aligned = restored.state[conv.weight]["momentum_buffer"]
    assert aligned.stride() == conv.weight.stride()
    assert torch.equal(aligned, buffer)  # same values, new layout
