"""Federated training of the base model (docs/method.md, "Federated training"), engine-free: FedAvg of full
fine-tuning, or of a LoRA that is merged into the weights at the end. The result is a normal Hugging Face checkpoint."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedp2eft.core.btlora import attach_lora, resolve_target_modules
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.tasks import Task
from fedp2eft.core.training import train
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError


@dataclass
class BaseTrainingConfig:
    """Paper: full fine-tuning, 2 local epochs, batch 32, lr 5e-5. ``mode='lora'`` trains (and ships) only a
    LoRA of ``lora_rank`` plus the task head, which is far cheaper to send; it is merged at the end. The LoRA
    settings also shape FedDPA-T's two LoRAs (``core/pfl.py``); ``lora_alpha`` None means 2 x rank."""

    algorithm: str = "fedavg"  # or a personalized-FL base: feddpa-t, fedsa-lora, dept (core/pfl.py)
    mode: str = "full"
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    freeze_embeddings: bool = False
    target_modules: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in {"full", "lora"}:
            raise FedP2EFTError(f"base training mode '{self.mode}' is unknown; use 'full' or 'lora'")
        if self.algorithm not in BASE_ALGORITHMS:
            raise FedP2EFTError(f"base.algorithm '{self.algorithm}' is unknown; use one of {', '.join(BASE_ALGORITHMS)}")


BASE_ALGORITHMS = ("fedavg", "feddpa-t", "fedsa-lora", "dept")  # FedAvg here; the pFL bases in core/pfl.py


def _head_names(model: nn.Module) -> set[str]:
    """Parameters of a classification head that the base model must learn (absent for causal LMs)."""
    return {name for name, _ in model.named_parameters() if name.startswith("head.")}


class BaseModelTask:
    """Implements ``FederatedTask`` for FedAvg: the weights that travel are the model's trainable parameters.
    The personalized-FL bases (``core/pfl.py``) refine it through ``prepare``, ``shared_names`` and
    ``plain_model``."""

    def __init__(self, base_model: nn.Module, task: Task, clients: list[ClientData],
                 config: BaseTrainingConfig) -> None:
        self.task = task
        self.clients = clients
        self.config = config
        self.model = self.prepare(base_model)
        self.names = self.shared_names()
        self._initial = self.weights()

    def prepare(self, base_model: nn.Module) -> nn.Module:
        """The model whose trainable parameters are learned (a LoRA-wrapped one in ``lora`` mode)."""
        config = self.config
        if config.mode == "lora":
            heads = _head_names(base_model)
            targets = resolve_target_modules(base_model, config.target_modules)
            alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_rank
            model = attach_lora(base_model, {name: config.lora_rank for name in targets}, alpha / config.lora_rank,
                                seed=config.seed)
            for name, parameter in model.get_base_model().named_parameters():
                parameter.requires_grad = parameter.requires_grad or name in heads
            return model
        if config.freeze_embeddings:
            base_model.get_input_embeddings().weight.requires_grad = False
        return base_model

    def shared_names(self) -> list[str]:
        """The parameters that travel to the server and are averaged."""
        return [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]

    def weights(self) -> dict[str, torch.Tensor]:
        """Copies on the CPU, wherever the model computes (weights travel from there)."""
        parameters = dict(self.model.named_parameters())
        return {name: parameters[name].detach().to("cpu", copy=True) for name in self.names}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self.names:
                parameters[name].copy_(weights[name])

    def num_clients(self) -> int:
        return len(self.clients)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self._initial.items()}

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        self.load(weights)
        loss = self.train_locally(client_index, server_round)
        return ClientUpdate(self.weights(), len(self.clients[client_index].train), {"train_loss": loss})

    def train_locally(self, client_index: int, server_round: int, phase: int = 0) -> float:
        """Local epochs on the client's training data over the parameters that require grad; returns the last
        epoch's loss. ``phase`` tells apart two trainings of one client in one round (FedDPA-T)."""
        config = self.config
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=0.0)
        seed = config.seed * 100_003 + server_round * 1_009 + client_index + 500_009 * phase
        torch.manual_seed(seed)  # dropout masks: the same update whichever worker ran what before
        result = train(self.model, self.task, self.clients[client_index].train, optimizer, config.local_epochs,
                       config.batch_size, seed=seed)
        return result.epoch_losses[-1]

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        """The base model as ``directory/model``, written atomically (temp folder, then rename)."""
        final, tmp = directory / "model", directory / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_checkpoint(weights, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def save_checkpoint(self, weights: dict[str, torch.Tensor], directory: str | Path) -> Path:
        """Write the global weights and the tokenizer as a plain checkpoint (a LoRA is merged first; this
        consumes the task's model)."""
        self.load(weights)
        self.plain_model().save_pretrained(directory)
        self.task.tokenizer.save_pretrained(directory)
        return Path(directory)

    def plain_model(self) -> nn.Module:
        """The model as a plain checkpoint holds it (any LoRA merged in)."""
        return self.model.merge_and_unload() if self.config.mode == "lora" else self.model

