"""The fixed choices of settings, declared once for the settings models and the CLI.

No pydantic or torch import here: ``distml --help`` and shell completion read these.
"""

from typing import Literal

Arch = Literal["cnn", "vgg16"]
Norm = Literal["batch", "group", "layer", "instance", "none"]
Pool = Literal["max", "avg"]
Activation = Literal["relu", "gelu", "silu", "leaky_relu"]
Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Scheduler = Literal["step", "cosine", "onecycle", "none"]
Precision = Literal["32", "16-mixed", "bf16-mixed"]
DeviceChoice = Literal["auto", "cuda", "cpu"]
Mode = Literal["single", "dp", "ddp"]
Backend = Literal["nccl", "gloo"]
Criterion = Literal["si", "center-si"]
SplitName = Literal["train", "val", "test"]
