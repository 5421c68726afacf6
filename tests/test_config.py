import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from distml.config import (
    CompareBackendsSettings,
    EvalSettings,
    HeadSettings,
    SelectSettings,
    SiSettings,
    StudySettings,
    TrainConfig,
    find_field,
    holds_text,
    known_keys,
    parse_assignment,
    read_config_file,
    resolve_settings,
)
from distml.errors import SettingsError


def test_defaults_are_valid_and_documented_values():
    config = TrainConfig()
    assert config.data.val_fraction == 0.1
    assert config.model.arch == "cnn" and config.model.depth == 8
    assert config.dist.mode == "single"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("train.epochs", 0, "train.epochs"),
        ("optim.lr", -1.0, "optim.lr"),
        ("data.val_fraction", 1.0, "data.val_fraction"),
        ("model.norm", "batchy", "model.norm"),
        ("train.precision", "fp8", "train.precision"),
        ("optim.optimizer", "lion", "optim.optimizer"),
        ("data.dataset", "imagenet", "dataset must be one of"),
    ],
)
def test_bad_values_name_the_field(key, value, fragment):
    with pytest.raises(SettingsError) as err:
        resolve_settings(TrainConfig, flags={key: value})
    assert fragment in str(err.value)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(SettingsError, match=r"did you mean model\.width"):
        resolve_settings(TrainConfig, assignments=["model.widht=2"])


def test_batch_must_divide_into_micro_steps():
    with pytest.raises(SettingsError, match="not divisible by accum_steps"):
        resolve_settings(TrainConfig, flags={"train.batch_size": 30, "train.accum_steps": 4})


def test_every_error_is_listed_at_once():
    with pytest.raises(SettingsError) as err:
        resolve_settings(TrainConfig, flags={"train.epochs": 0, "optim.lr": 0})
    assert "train.epochs" in str(err.value) and "optim.lr" in str(err.value)


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_precedence_defaults_file_flags_set(tmp_path: Path, suffix: str):
    body = {
        ".toml": "[train]\nepochs = 5\nbatch_size = 64\n[optim]\nlr = 0.05\n",
        ".yaml": "train:\n  epochs: 5\n  batch_size: 64\noptim:\n  lr: 0.05\n",
        ".json": json.dumps({"train": {"epochs": 5, "batch_size": 64}, "optim": {"lr": 0.05}}),
    }[suffix]
    path = tmp_path / f"settings{suffix}"
    path.write_text(body)
    config = resolve_settings(
        TrainConfig,
        path,
        flags={"train.batch_size": 128, "optim.lr": None},  # None = flag not given
        assignments=["train.epochs=7"],
    )
    assert config.train.epochs == 7  # --set beats the file
    assert config.train.batch_size == 128  # a flag beats the file
    assert config.optim.lr == 0.05  # the file beats the default
    assert config.train.seed == 0  # default


def test_resolved_config_round_trips(tmp_path: Path):
    config = resolve_settings(TrainConfig, flags={"model.arch": "vgg16", "train.epochs": 3})
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    assert resolve_settings(TrainConfig, path) == config


def test_broken_config_files(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = ")
    with pytest.raises(SettingsError, match="cannot be parsed"):
        read_config_file(bad)
    with pytest.raises(SettingsError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    other = tmp_path / "settings.ini"
    other.write_text("x=1")
    with pytest.raises(SettingsError, match="unknown type"):
        read_config_file(other)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(SettingsError, match="mapping"):
        read_config_file(listing)


def test_set_values_are_json_or_strings():
    assert parse_assignment("train.epochs=3") == ("train.epochs", 3)
    assert parse_assignment("model.head_hidden=[256, 128]") == ("model.head_hidden", [256, 128])
    assert parse_assignment("data.dataset=cifar10") == ("data.dataset", "cifar10")
    assert parse_assignment("train.deterministic=true") == ("train.deterministic", True)
    with pytest.raises(SettingsError):
        parse_assignment("no-equals-sign")


def test_set_reads_the_value_as_the_field_type():
    # a text field keeps digits as text (bug 6: output.name=2024 was refused as a number)
    settings = resolve_settings(TrainConfig, assignments=["output.name=2024"])
    assert settings.output.name == "2024"
    assert parse_assignment('output.name="my run"', TrainConfig) == ("output.name", "my run")
    assert parse_assignment("output.name=null", TrainConfig) == ("output.name", None)
    # a text choice that looks like a number, and numbers, lists and switches as before
    assert resolve_settings(TrainConfig, assignments=["train.precision=32"]).train.precision == "32"
    settings = resolve_settings(
        TrainConfig,
        assignments=["train.epochs=3", "model.head_hidden=[64]", "train.deterministic=true"],
    )
    assert (settings.train.epochs, settings.model.head_hidden) == (3, [64])
    assert settings.train.deterministic is True


def test_set_wins_over_flags_for_text_fields():
    settings = resolve_settings(
        TrainConfig, flags={"output.name": "from-flag"}, assignments=["output.name=007"]
    )
    assert settings.output.name == "007"


def test_set_without_a_model_reads_json_or_keeps_the_text():
    assert parse_assignment(" name = 2024 ") == ("name", 2024)
    assert parse_assignment("name=2024x") == ("name", "2024x")


@pytest.mark.parametrize(
    ("annotation", "text"),
    [
        (str, True),
        (Path, True),
        (Path | None, True),
        (Literal["16", "32"], True),
        (Literal["a", "b"] | None, True),
        (int, False),
        (int | None, False),
        (str | int, False),
        (Literal[16, 32], False),
        (list[str], False),
    ],
)
def test_holds_text_is_true_for_text_fields_only(annotation, text):
    assert holds_text(annotation) is text


class Inner(BaseModel):
    x: int = 1


class Mid(BaseModel):
    inner: Inner = Field(default_factory=Inner)


class Outer(BaseModel):
    mid: Mid = Field(default_factory=lambda: Mid(inner=Inner(x=5)))


def test_find_field_gives_each_field_and_the_default_it_has_there():
    field, default = find_field(TrainConfig, "train.epochs")
    assert field is TrainConfig.model_fields["train"].annotation.model_fields["epochs"]
    assert default == TrainConfig().train.epochs
    # a section's own default wins over its class's: the study's heads train 30 epochs
    assert HeadSettings().epochs == 0
    assert find_field(StudySettings, "head.epochs")[1] == 30
    # two sections deep, and a default made by a factory
    assert find_field(CompareBackendsSettings, "training.optim.lr")[1] == TrainConfig().optim.lr
    assert find_field(SiSettings, "splits")[1] == ["train", "test"]
    assert find_field(TrainConfig, "model")[1] == TrainConfig().model
    # a required section: the default of its class
    assert find_field(StudySettings, "training.train.seed")[1] == TrainConfig().train.seed
    # a default set two sections up wins too
    assert find_field(Outer, "mid.inner.x")[1] == 5
    for missing in ["train.nope", "nope.epochs", "train.epochs.x", "optim.lr.x.y"]:
        assert find_field(TrainConfig, missing) is None


def test_every_setting_has_a_description():
    missing = [
        f"{model.__name__}.{key}"
        for model in (TrainConfig, EvalSettings, SiSettings, SelectSettings, StudySettings)
        for key in known_keys(model)
        if not find_field(model, key)[0].description
    ]
    assert missing == []


def test_cross_section_rules():
    with pytest.raises(SettingsError, match="early_stop needs a validation set"):
        resolve_settings(TrainConfig, flags={"train.early_stop": 3, "data.val_fraction": 0})
    with pytest.raises(SettingsError, match="freeze_features needs init"):
        resolve_settings(TrainConfig, flags={"model.freeze_features": True})
    with pytest.raises(SettingsError, match="nccl backend needs CUDA"):
        flags = {"dist.mode": "ddp", "dist.backend": "nccl", "train.device": "cpu"}
        resolve_settings(TrainConfig, flags=flags)
    with pytest.raises(SettingsError, match="backend, sync_bn only apply to mode ddp"):
        resolve_settings(TrainConfig, flags={"dist.backend": "gloo", "dist.sync_bn": True})


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.toml")))
def test_shipped_recipes_are_valid(path: Path):
    config = resolve_settings(TrainConfig, path)
    assert config.train.epochs >= 1
