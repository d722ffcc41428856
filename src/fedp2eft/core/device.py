"""Where models and batches live: a CUDA GPU when one is visible, the CPU otherwise.

The config key ``device`` takes ``auto`` (GPU if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

The config key ``precision`` says how the forward passes of training and evaluation compute: ``bf16`` runs them
under bfloat16 autocast (matmuls and attention in bf16, parameters, gradients, optimizer state and losses in
float32: mixed precision), ``fp32`` in plain float32, and ``auto`` picks bf16 where the hardware multiplies bf16
matrices natively (a CUDA GPU that supports it; an x86 CPU with AVX512-BF16 or AMX, where a bf16 matmul runs at
about 2.3x float32's rate: docs/method.md, "Precision") and fp32 elsewhere, where bf16 would be emulated and slower.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedp2eft.errors import FedP2EFTError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "bf16", "fp32")
NATIVE_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86 CPU flags (/proc/cpuinfo) of hardware bf16 dot products
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


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent or says none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (module docstring)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


def resolve_precision(setting: str, device: torch.device | str = "auto") -> str:
    """``bf16`` or ``fp32``: what a ``precision:`` setting means on ``device`` (a torch device or a ``device:``
    setting, resolved only for ``auto``, which picks bf16 where it is native)."""
    value = str(setting).strip().lower()
    if value not in PRECISIONS:
        raise FedP2EFTError(f"precision: {setting} is not a known precision; use one of {', '.join(PRECISIONS)}")
    if value == "auto":
        return "bf16" if native_bf16(device if isinstance(device, torch.device) else resolve_device(device)) else "fp32"
    return value


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` for precision ``bf16``; no autocast for ``fp32`` (plain float32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision {precision!r} must be resolved to bf16 or fp32 first (resolve_precision)")
