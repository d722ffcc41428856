"""Where models and batches live: a CUDA GPU when one is visible, the CPU otherwise.

The config key ``device`` takes ``auto`` (GPU if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. On a GPU
that supports bfloat16 the forward passes of training and evaluation run under bf16 autocast; on the CPU
nothing changes (no autocast), so CPU results stay bit-identical to a run without this module.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from fedp2eft.errors import FedP2EFTError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")


def is_device_name(setting: str) -> bool:
    """Whether ``setting`` is spelled as one of DEVICE_CHOICES (whether that device exists is not checked)."""
    value = str(setting).strip().lower()
    return value in ("auto", "cpu") or CUDA_DEVICE.fullmatch(value) is not None


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device a ``device:`` setting names; a GPU that is asked for but absent is an error."""
    value = str(setting).strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    match = CUDA_DEVICE.fullmatch(value)
    if match is None:
        raise FedP2EFTError(f"device: {setting} is not a known device; use one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise FedP2EFTError(
            f"device: {setting} was requested but no CUDA GPU is visible; use device: auto or cpu"
        )
    if match.group(1) is not None:
        index = int(match.group(1))
        if index >= torch.cuda.device_count():
            raise FedP2EFTError(
                f"device: {setting} was requested but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); use device: auto or another index"
            )
        return torch.device("cuda", index)
    return torch.device("cuda")


def visible_gpus() -> int:
    """How many CUDA GPUs this process can use (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor on ``device`` (other values as they are); tensors already there are not copied."""
    return {key: value.to(device) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it; no autocast anywhere else (so CPU numerics never change)."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
