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
    optim_state["state"][1]["step.count"] = torch.tensor(3.0)  # a key with a dot in it
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


def test_capture_and_restore_carry_every_part_into_fresh_objects(tmp_path: Path):
    from distml.train import LoopState

    model, optimizer, scheduler = trained_pieces()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    loop = LoopState(epoch=3, step=4, best_epoch=2, best_val=0.7)
    best = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    rng = {"cpu.0": torch.get_rng_state()}
    state = TrainingState.capture(
        model=model, best=best, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        loop=loop, rng=rng, world_size=3,
    )  # fmt: skip
    assert state.model.keys() == model.state_dict().keys()
    assert state.best is best and state.rng is rng and state.world_size == 3
    assert state.loop == loop.state_dict() and state.loop["epoch"] == 3
    assert state.scaler is not None and state.scaler["scale"] == 512.0
    save_training_state(tmp_path / "state.safetensors", state)
    read = load_training_state(tmp_path / "state.safetensors")

    _, fresh_optimizer, fresh_scheduler = trained_pieces()
    fresh_optimizer.param_groups[0]["lr"] = 99.0
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    read.restore(optimizer=fresh_optimizer, scheduler=fresh_scheduler, scaler=fresh_scaler)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scaler.get_scale() == 512.0
    restored = LoopState()
    restored.load_state_dict(read.loop)
    assert restored == loop


def test_a_disabled_scaler_is_stored_as_none_and_left_alone_at_restore():
    model, optimizer, scheduler = trained_pieces()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainingState.capture(
        model=model, best=None, optimizer=optimizer, scheduler=scheduler, scaler=disabled,
        loop=scheduler, rng={}, world_size=1,
    )  # fmt: skip
    assert state.scaler is None and state.best is None

    class Refuses:
        def load_state_dict(self, state_dict):
            raise AssertionError("a disabled scaler's state must not be loaded")

    state.restore(optimizer=optimizer, scheduler=scheduler, scaler=Refuses())


def test_each_rank_restores_its_own_cpu_random_state():
    torch.manual_seed(1)
    rank0 = torch.get_rng_state()
    torch.manual_seed(2)
    rank1 = torch.get_rng_state()
    expected = torch.rand(3)  # what rank 1's state draws next
    state = TrainingState(
        model={}, best=None, optimizer={}, scheduler={}, scaler=None,
        rng={"cpu.0": rank0, "cpu.1": rank1, "cuda.1": torch.zeros(1)}, loop={}, world_size=2,
    )  # fmt: skip
    torch.manual_seed(99)
    state.restore_rng(1, torch.device("cpu"))  # the CUDA state is not touched on a CPU run
    assert torch.equal(torch.rand(3), expected)
    state.restore_rng(0, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rank0)


def test_local_random_states_on_the_cpu_are_the_cpu_generator_alone():
    from distml.checkpoint import local_rng_states

    torch.manual_seed(5)
    states = local_rng_states(torch.device("cpu"), replicas=[1, 2])
    assert states.keys() == {"cpu"}
    assert torch.equal(states["cpu"], torch.get_rng_state())


class FakeCudaRng:
    """torch.cuda's RNG calls, recorded: the GPU branches run on a machine without a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.set: list[tuple[list[float], object]] = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    @staticmethod
    def get_rng_state(device: object) -> torch.Tensor:
        index = device.index if isinstance(device, torch.device) else device
        return torch.tensor([float(index)])  # a state that names the GPU it came from

    def set_rng_state(self, state: torch.Tensor, device: object) -> None:
        self.set.append((state.tolist(), device))


def test_local_random_states_on_a_gpu_name_its_own_gpu_and_each_dataparallel_replica(
    monkeypatch: pytest.MonkeyPatch,
):
    from distml.checkpoint import local_rng_states

    FakeCudaRng(monkeypatch)
    states = local_rng_states(torch.device("cuda", 3), replicas=[4, 5])
    assert list(states) == ["cpu", "cuda", "cuda-replica4", "cuda-replica5"]
    assert torch.equal(states["cpu"], torch.get_rng_state())
    assert [states[k].item() for k in list(states)[1:]] == [3.0, 4.0, 5.0]
    assert list(local_rng_states(torch.device("cuda", 0))) == ["cpu", "cuda"]


def test_each_rank_restores_its_own_gpu_and_replica_states_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
):
    cuda = FakeCudaRng(monkeypatch)
    torch.manual_seed(7)
    cpu1 = torch.get_rng_state()
    state = TrainingState(
        model={}, best=None, optimizer={}, scheduler={}, scaler=None,
        rng={
            "cpu.0": torch.get_rng_state(), "cuda.0": torch.tensor([10.0]),
            "cpu.1": cpu1, "cuda.1": torch.tensor([11.0]),
            "cuda-replica2.1": torch.tensor([12.0]), "cuda-replica3.0": torch.tensor([13.0]),
        },
        loop={}, world_size=2,
    )  # fmt: skip
    state.restore_rng(1, torch.device("cpu"))  # a CPU run leaves every GPU alone
    assert cuda.set == []
    torch.manual_seed(99)
    device = torch.device("cuda", 1)
    state.restore_rng(1, device)
    assert cuda.set == [([11.0], device), ([12.0], 2)]  # rank 1's GPU, then its replica GPU 2
    assert torch.equal(torch.get_rng_state(), cpu1)


def test_a_state_sent_as_bytes_reads_like_the_file(tmp_path: Path):
    from distml.checkpoint import training_state_from_bytes

    model, optimizer, scheduler = trained_pieces()
    path = tmp_path / "state.safetensors"
    save_training_state(path, TrainingState(
        model=model.state_dict(), best=None, optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), scaler=None, rng={"cpu.0": torch.get_rng_state()},
        loop={"epoch": 2}, world_size=2,
    ))  # fmt: skip
    from_file = load_training_state(path)
    sent = training_state_from_bytes(path.read_bytes(), path)
    assert sent.loop == from_file.loop == {"epoch": 2} and sent.world_size == 2
    assert sent.scheduler == from_file.scheduler
    assert all(torch.equal(sent.model[k], v) for k, v in from_file.model.items())
    assert torch.equal(sent.rng["cpu.0"], from_file.rng["cpu.0"])
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(DistmlError) as caught:
        training_state_from_bytes(foreign.read_bytes(), path)
    assert str(caught.value) == f"{path} is not a distml training state (state.safetensors)."
    with pytest.raises(DistmlError) as caught:
        training_state_from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}", path)
    assert str(caught.value).startswith(f"training state {path} cannot be read as safetensors (")
    assert str(caught.value).endswith("the run cannot be resumed from it.")


def test_the_state_file_records_its_format_and_the_distml_version(tmp_path: Path):
    from safetensors import safe_open

    from distml import __version__
    from distml.checkpoint import CHECKPOINT_VERSION

    model, optimizer, scheduler = trained_pieces()
    path = tmp_path / "state.safetensors"
    save_training_state(path, TrainingState(
        model=model.state_dict(), best=None, optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), scaler=None, rng={}, loop={}, world_size=1,
    ))  # fmt: skip
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "distml-train-state"
    assert meta["format_version"] == str(CHECKPOINT_VERSION)
    assert meta["distml_version"] == __version__


def test_a_missing_state_file_is_named(tmp_path: Path):
    with pytest.raises(DistmlError) as caught:
        load_training_state(tmp_path / "nope.safetensors")
    assert str(caught.value) == (
        f"training state {tmp_path / 'nope.safetensors'} does not exist. Check the path."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # torch: a heading line ending in ":", the offending keys on the next lines
        ('Error(s) in loading state_dict for Classifier:\n\tMissing key(s): "fc.weight".\n\t'
         'Unexpected key(s): "x".\n\tsize mismatch for "y".',
         'Missing key(s): "fc.weight".; Unexpected key(s): "x".'),
        # pydantic: "1 validation error for ..." is a heading even without a colon
        ("1 validation error for ModelSpec\nwidth\n  Input should be > 0",
         "width; Input should be > 0"),
        ("one line that ends with a colon:", "one line that ends with a colon:"),
        ("a heading:\nthe key", "the key"),  # two lines: the heading still goes
        ("first\nsecond\nthird", "first; second"),
        ("  \n padded \n", "padded"),
        ("", "ValueError"),
    ],
)  # fmt: skip
def test_error_lines_keeps_the_lines_that_say_what_is_wrong(text: str, expected: str):
    from distml.checkpoint import error_lines

    assert error_lines(ValueError(text)) == expected
