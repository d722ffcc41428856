"""Trained artifacts (the PS generator, FedL2P's meta-nets) as one safetensors file each: the weights plus a JSON
header in the file's metadata that says what the weights are for (docs/method.md, "PS generator").

One piece of code writes and reads them all, so every artifact is written atomically (a run killed mid-write
leaves the old file or none, never half a file) and a wrong or foreign file is refused with the same kind of
message: what the file is not, and how to get the right one."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedp2eft.errors import FedP2EFTError

HEADER_PREFIX = "fedp2eft_"


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of artifact: the metadata key its JSON header lives under, what to call it in messages
    ("PS generator") and how a user gets one ("train one with `fedp2eft train-psg`")."""

    header_key: str
    what: str
    how_to_get: str


def save_artifact(path: str | Path, state: dict[str, torch.Tensor], kind: ArtifactKind, header: dict) -> None:
    """Write ``state`` with ``header`` (JSON) under ``kind.header_key``, atomically: a temporary file in the same
    folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={kind.header_key: json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_artifact(path: str | Path, kind: ArtifactKind) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and the tensors of an artifact of ``kind``; a missing file, a file that is not safetensors or one
    without this kind's header raises a :class:`FedP2EFTError` that says how to get the right file."""
    path = Path(path)
    if not path.is_file():
        raise FedP2EFTError(f"no {kind.what} at {path}; {kind.how_to_get} or fix the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise FedP2EFTError(f"{path} is not a safetensors file, so not a fedp2eft {kind.what} ({error}); "
                            f"{kind.how_to_get}") from None
    if kind.header_key not in metadata:
        others = sorted(key for key in metadata if key.startswith(HEADER_PREFIX))
        found = f"; it carries a '{others[0]}' header instead" if others else ""
        raise FedP2EFTError(f"{path} is a safetensors file but not a fedp2eft {kind.what} (no header){found}; "
                            f"{kind.how_to_get}")
    return json.loads(metadata[kind.header_key]), load_file(str(path))
