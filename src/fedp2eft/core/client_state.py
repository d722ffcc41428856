"""A client's own state on the client's disk: one safetensors file per round in which the client trained.

Engine-free, so the federated side (which writes it after every local step) and the personalization side
(which builds the client's personal base model from it) read the same files. A file is written atomically, and
the state of the last round the server *accepted* is kept until a newer one is accepted, so a run resumed after a
crash continues from exactly the state the server's checkpoint assumes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedp2eft.errors import FedP2EFTError

_ROUND_FILE = re.compile(r"round-(\d{5})\.safetensors")


class ClientStateStore:
    """The state files of client ``client_index`` under ``root`` (a SuperNode's ``state-dir``)."""

    def __init__(self, root: str | Path, client_index: int) -> None:
        self.folder = Path(root) / f"client-{client_index:05d}"

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:05d}.safetensors"

    def save(self, server_round: int, state: dict[str, torch.Tensor]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(server_round)
        tmp = final.with_name(final.name + ".tmp")
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, str(tmp))
        os.replace(tmp, final)
        return final

    def load(self, server_round: int) -> dict[str, torch.Tensor]:
        path = self.path(server_round)
        if not path.exists():
            raise FedP2EFTError(
                f"client state of round {server_round} is missing: {path} does not exist. The run's checkpoint "
                "expects it; point the client at the state-dir it used before (SuperNode --node-config "
                "'state-dir=...', or the run folder's 'clients' in simulation), or restart the run from round 0")
        return load_file(str(path))

    def rounds(self) -> list[int]:
        if not self.folder.exists():
            return []
        return sorted(int(match.group(1)) for path in self.folder.iterdir()
                      if (match := _ROUND_FILE.fullmatch(path.name)))

    def prune(self, keep_from: int) -> None:
        """Drop the files of rounds before ``keep_from`` (the last accepted round): no resume can need them."""
        for server_round in self.rounds():
            if server_round < keep_from:
                self.path(server_round).unlink()
