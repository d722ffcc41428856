"""Personalized-FL base models (docs/method.md, "Personalized-FL bases"): FedDPA-T, FedSA-LoRA and DEPT,
engine-free.

Each keeps something on every client that is never averaged (``StatefulTask``): FedDPA-T a local LoRA, FedSA-LoRA
the B matrices of its one LoRA, DEPT the token embeddings. A client's *personal base* is the global model with its own state applied; FedP²EFT and the
baselines personalize on top of it. The state becomes an *overlay*, a few of the global model's parameters
replaced by the client's values, so one loaded model serves every client in turn (``apply_overlay``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedp2eft.core.artifacts import ArtifactKind, load_artifact, save_artifact
from fedp2eft.core.base_training import BaseModelTask, BaseTrainingConfig, _head_names
from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.client_state import ClientStateStore
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError

# The reference settings of each algorithm, applied over the run's base training settings (docs/method.md,
# "Personalized-FL bases"): FedDPA-T's LoRAs keep the run's LoRA learning rate; DEPT fine-tunes every parameter,
# so it takes the paper's full fine-tuning rate. Epochs and batch size stay the run's.
ALGORITHM_SETTINGS = {
    "feddpa-t": {"lora_rank": 8, "lora_alpha": 8.0, "lora_dropout": 0.05,
                 "target_modules": ["query|q_proj", "value|v_proj"]},
    "fedsa-lora": {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
                   "target_modules": ["query|q_proj", "value|v_proj"]},
    "dept": {"lr": 5.0e-5},
}
PFL_FILE = "pfl.json"  # beside a pFL base checkpoint: which algorithm made it and how its client states apply
SHARED_LORA_FILE = "shared_lora.safetensors"  # beside a FedSA-LoRA base: the averaged A matrices
SHARED_LORA = ArtifactKind("fedp2eft_shared_lora", "FedSA-LoRA shared A matrices",
                           "train the FedSA-LoRA base again (`base.algorithm: fedsa-lora`)")
GLOBAL, LOCAL = "global", "local"
_LORA_KEY = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.(?:local|default)\.weight")


def _adapter_names(model: nn.Module, adapter: str) -> list[str]:
    return [name for name, _ in model.named_parameters() if f".{adapter}." in name and ".lora_" in name]


class _PersonalLoRATask(BaseModelTask):
    """What the pFL bases built on PEFT LoRAs share: the LoRA from the run's settings (seeded), the task head's
    parameter names, and which parameters train. ``local_names`` (set by ``prepare``) are kept by each client,
    starting from ``initial_local``."""

    keeps_client_state = True

    def new_lora(self, base_model: nn.Module, adapters: tuple[str, ...]) -> nn.Module:
        config = self.config
        self.heads = _head_names(base_model)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=self.alpha, lora_dropout=config.lora_dropout,
                          target_modules=resolve_target_modules(base_model, config.target_modules))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = get_peft_model(base_model, lora, adapter_name=adapters[0])
            for adapter in adapters[1:]:
                model.add_adapter(adapter, lora)
        return model

    def keep_locally(self, model: nn.Module, names: list[str]) -> None:
        self.local_names = names
        parameters = dict(model.named_parameters())
        self.initial_local = {name: parameters[name].detach().to("cpu", copy=True) for name in names}

    def restore_local(self, state: dict[str, torch.Tensor] | None) -> None:
        """Put the client's kept tensors (or the initial ones, on its first round) into the model."""
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in (state or self.initial_local).items():
                parameters[name].copy_(tensor)

    def kept(self) -> dict[str, torch.Tensor]:
        parameters = dict(self.model.named_parameters())
        return {name: parameters[name].detach().to("cpu", copy=True) for name in self.local_names}

    @property
    def alpha(self) -> float:
        return self.config.lora_alpha if self.config.lora_alpha is not None else 2.0 * self.config.lora_rank

    def _head_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name, _ in model.named_parameters() if name.removeprefix("base_model.model.") in self.heads]

    @staticmethod
    def _train_only(names: list[str], model: nn.Module) -> None:
        chosen = set(names)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name in chosen


class FedDPATask(_PersonalLoRATask):
    """FedDPA-T: every client trains the global LoRA (and the task head), which is averaged; then, on top of the
    global LoRA it just trained, its local LoRA, which it keeps. Both LoRAs share rank, alpha, dropout and target
    modules (the paper's reference: rank 8, alpha 8, dropout 0.05, attention query and value)."""

    def prepare(self, base_model: nn.Module) -> nn.Module:
        model = self.new_lora(base_model, (GLOBAL, LOCAL))
        self.keep_locally(model, _adapter_names(model, LOCAL))
        model.base_model.set_adapter(GLOBAL)
        self._train_only([*_adapter_names(model, GLOBAL), *self._head_parameter_names(model)], model)
        return model

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int,
                      state: dict[str, torch.Tensor] | None = None) -> ClientUpdate:
        self.load(weights)
        global_loss = self.train_locally(client_index, server_round)
        shared = self.weights()
        self.restore_local(state)
        self.model.base_model.set_adapter([GLOBAL, LOCAL])  # forward = global LoRA merged + local LoRA
        self._train_only(self.local_names, self.model)
        try:
            local_loss = self.train_locally(client_index, server_round, phase=1)
        finally:
            self.model.base_model.set_adapter(GLOBAL)
            self._train_only(self.names, self.model)
        return ClientUpdate(shared, len(self.clients[client_index].train),
                            {"train_loss": global_loss, "local_train_loss": local_loss}, self.kept())

    def plain_model(self) -> nn.Module:
        self.model.delete_adapter(LOCAL)
        return self.model.merge_and_unload()

    def save_checkpoint(self, weights: dict[str, torch.Tensor], directory: str | Path) -> Path:
        path = super().save_checkpoint(weights, directory)
        write_pfl_metadata(path, {"algorithm": "feddpa-t", "lora_scaling": self.alpha / self.config.lora_rank,
                                  "clients": [client.client_id for client in self.clients]})
        return path


class FedSALoRATask(_PersonalLoRATask):
    """FedSA-LoRA (Guo et al., ICLR 2025): one LoRA, trained whole on every client; its A matrices (and the task
    head) are averaged, its B matrices stay on each client, since A learns what clients share and B what is
    theirs. The plain checkpoint is the base with the averaged head (B = 0 merges to nothing); the averaged A
    matrices lie beside it, and a client's personal base adds its own B times that A (``client_overlay``)."""

    def prepare(self, base_model: nn.Module) -> nn.Module:
        model = self.new_lora(base_model, ("default",))
        self.keep_locally(model, [name for name, _ in model.named_parameters() if ".lora_B." in name])
        self._train_only([*_adapter_names(model, "default"), *self._head_parameter_names(model)], model)
        return model

    def shared_names(self) -> list[str]:
        local = set(self.local_names)
        return [name for name in super().shared_names() if name not in local]

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int,
                      state: dict[str, torch.Tensor] | None = None) -> ClientUpdate:
        self.load(weights)
        self.restore_local(state)
        loss = self.train_locally(client_index, server_round)
        return ClientUpdate(self.weights(), len(self.clients[client_index].train), {"train_loss": loss},
                            self.kept())

    def plain_model(self) -> nn.Module:
        return self.model.merge_and_unload()

    def save_checkpoint(self, weights: dict[str, torch.Tensor], directory: str | Path) -> Path:
        """The base with the averaged head, and beside it the averaged A matrices; no client's B leaves it."""
        shared_lora = {name: weights[name] for name in self.names if ".lora_A." in name}
        self.restore_local(None)  # B = 0: merging adds nothing to the base weights
        path = super().save_checkpoint(weights, directory)
        save_artifact(path / SHARED_LORA_FILE, shared_lora, SHARED_LORA, {})
        write_pfl_metadata(path, {"algorithm": "fedsa-lora", "lora_scaling": self.alpha / self.config.lora_rank,
                                  "clients": [client.client_id for client in self.clients]})
        return path


class DEPTTask(BaseModelTask):
    """DEPT (the variant with client-local embeddings): full fine-tuning, every parameter averaged except the
    token embeddings, which each client keeps. A client's state holds only the embedding rows it changed (the
    tokens of its own text), which for a large multilingual vocabulary is a small part of the table."""

    keeps_client_state = True

    def prepare(self, base_model: nn.Module) -> nn.Module:
        embeddings = base_model.get_input_embeddings().weight
        self.embedding_name = next(name for name, parameter in base_model.named_parameters() if parameter is embeddings)
        self.initial_embeddings = embeddings.detach().to("cpu", copy=True)
        return base_model

    def shared_names(self) -> list[str]:
        return [name for name in super().shared_names() if name != self.embedding_name]

    def plain_model(self) -> nn.Module:
        return self.model

    def _embeddings(self) -> nn.Parameter:
        return dict(self.model.named_parameters())[self.embedding_name]

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int,
                      state: dict[str, torch.Tensor] | None = None) -> ClientUpdate:
        self.load(weights)
        embeddings = self._embeddings()
        with torch.no_grad():
            embeddings.copy_(own_embeddings(self.initial_embeddings, state))
        loss = self.train_locally(client_index, server_round)
        table = embeddings.detach().to("cpu")
        rows = (table != self.initial_embeddings).any(dim=1).nonzero().flatten()
        return ClientUpdate(self.weights(), len(self.clients[client_index].train), {"train_loss": loss},
                            {"rows": rows, "values": table[rows].clone()})

    def save_checkpoint(self, weights: dict[str, torch.Tensor], directory: str | Path) -> Path:
        """The global body with the embeddings it started from: no client's own embeddings leave the client."""
        with torch.no_grad():
            self._embeddings().copy_(self.initial_embeddings)
        path = super().save_checkpoint(weights, directory)
        write_pfl_metadata(path, {"algorithm": "dept", "clients": [client.client_id for client in self.clients]})
        return path


def own_embeddings(initial: torch.Tensor, state: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """A DEPT client's embedding table: the starting table with the rows its state holds."""
    table = initial.clone()
    if state is not None:
        table[state["rows"]] = state["values"].to(table.dtype)
    return table


def base_model_task(base_model: nn.Module, task: Task, clients: list[ClientData],
                    config: BaseTrainingConfig) -> BaseModelTask:
    """The federated task that trains the base model with ``config.algorithm``."""
    kind = {"fedavg": BaseModelTask, "feddpa-t": FedDPATask, "fedsa-lora": FedSALoRATask,
            "dept": DEPTTask}[config.algorithm]
    return kind(base_model, task, clients, config)


def write_pfl_metadata(checkpoint: Path, metadata: dict) -> None:
    (Path(checkpoint) / PFL_FILE).write_text(json.dumps(metadata, indent=1))


def read_pfl_metadata(checkpoint: str | Path) -> dict | None:
    """What made a pFL base checkpoint (None for a plain one)."""
    path = Path(checkpoint) / PFL_FILE
    return json.loads(path.read_text()) if path.exists() else None


def record_client_states(checkpoint: Path, state_dir: Path, rounds: dict[int, int]) -> None:
    """Note in a pFL base's metadata where its clients keep their states and which round's state each has
    (its last accepted update), so that a client's personal base can be rebuilt later on that client."""
    metadata = read_pfl_metadata(checkpoint)
    if metadata is None:
        raise FedP2EFTError(f"{checkpoint} is not a personalized-FL base (no {PFL_FILE})")
    relative = Path(state_dir).resolve().relative_to(Path(checkpoint).resolve().parent)
    write_pfl_metadata(checkpoint, {**metadata, "client_state_dir": f"../{relative.as_posix()}",
                                    "client_rounds": {str(client): r for client, r in sorted(rounds.items())}})


def personal_overlay(checkpoint: str | Path, metadata: dict, model: nn.Module, client_index: int,
                     client_id: str) -> dict[str, torch.Tensor] | None:
    """The overlay that turns ``model`` (the pFL base at ``checkpoint``) into the personal base of client
    ``client_index`` (whose id must be ``client_id``: another dataset's client i is someone else); None for a
    client that never trained (its state is still the initial one, which changes nothing)."""
    clients = metadata["clients"]
    if client_index >= len(clients) or clients[client_index] != client_id:
        raise FedP2EFTError(
            f"{checkpoint} was trained on other clients: its client {client_index} is "
            f"{clients[client_index] if client_index < len(clients) else 'missing'}, not {client_id}; use the "
            "dataset and dataset options of the run that trained it")
    server_round = metadata.get("client_rounds", {}).get(str(client_index), 0)
    if server_round == 0:
        return None
    store = ClientStateStore(Path(checkpoint) / metadata["client_state_dir"], client_index)
    state = store.load(server_round)
    if metadata["algorithm"] == "fedsa-lora":  # the client's B with the federation's final A
        state = {**load_artifact(Path(checkpoint) / SHARED_LORA_FILE, SHARED_LORA)[1], **state}
    return client_overlay(metadata, model, state)


def client_overlay(metadata: dict, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` (a pFL base checkpoint, loaded plain) that a client's ``state`` replaces:
    DEPT its embedding table; FedDPA-T (its local LoRA) and FedSA-LoRA (its own B with the shared A, both in
    ``state``) every LoRA module's weight with B @ A x scaling added, which is exactly the forward of the model
    the client trained with that LoRA active."""
    parameters = dict(model.named_parameters())
    if metadata["algorithm"] == "dept":
        embeddings = model.get_input_embeddings().weight
        name = next(n for n, p in parameters.items() if p is embeddings)
        return {name: own_embeddings(embeddings.detach(), state)}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise FedP2EFTError(f"unexpected tensor {key!r} in a {metadata['algorithm']} client state")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    incomplete = sorted(module for module, pair in parts.items() if set(pair) != {"A", "B"})
    if incomplete:
        raise FedP2EFTError(f"a {metadata['algorithm']} client state lacks the A or B matrix of "
                            f"{', '.join(incomplete)}")
    overlay = {}
    for module, pair in parts.items():
        weight = parameters[f"{module}.weight"]
        delta = (pair["B"].double() @ pair["A"].double()) * metadata["lora_scaling"]
        overlay[f"{module}.weight"] = (weight.detach().double() + delta.to(weight.device)).to(weight.dtype)
    return overlay


@contextmanager
def apply_overlay(model: nn.Module, overlay: dict[str, torch.Tensor] | None) -> Iterator[nn.Module]:
    """``model`` with ``overlay``'s parameters in place (in the tensors themselves, so copies that share the
    frozen base weights see them too), restored exactly on exit."""
    if not overlay:
        yield model
        return
    parameters = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, tensor in overlay.items():
            saved[name] = parameters[name].detach().clone()
            parameters[name].copy_(tensor)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                parameters[name].copy_(tensor)
