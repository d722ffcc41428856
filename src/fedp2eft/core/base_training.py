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
from fedp2eft.errors import FedP2EFTError, config_from_mapping


@dataclass
class BaseTrainingConfig:
    """Paper: full fine-tuning, 2 local epochs, batch 32, lr 5e-5. ``mode='lora'`` trains (and ships) only a
    LoRA of ``lora_rank`` plus the task head, which is far cheaper to send; it is merged at the end."""

    mode: str = "full"
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    lora_rank: int = 16
    freeze_embeddings: bool = False
    target_modules: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in {"full", "lora"}:
            raise FedP2EFTError(f"base training mode '{self.mode}' is unknown; use 'full' or 'lora'")


def _head_names(model: nn.Module) -> set[str]:
    """Parameters of a classification head that the base model must learn (absent for causal LMs)."""
    return {name for name, _ in model.named_parameters() if name.startswith("head.")}


class BaseModelTask:
    """Implements ``FederatedTask``: the weights that travel are the model's trainable parameters."""

    def __init__(self, base_model: nn.Module, task: Task, clients: list[ClientData],
                 config: BaseTrainingConfig) -> None:
        self.task = task
        self.clients = clients
        self.config = config
        if config.mode == "lora":
            targets = resolve_target_modules(base_model, config.target_modules)
            heads = _head_names(base_model)
            model = attach_lora(base_model, {name: config.lora_rank for name in targets}, 2.0, seed=config.seed)
            for name, parameter in model.get_base_model().named_parameters():
                parameter.requires_grad = parameter.requires_grad or name in heads
            self.model = model
        else:
            self.model = base_model
            if config.freeze_embeddings:
                embeddings = self.model.get_input_embeddings()
                embeddings.weight.requires_grad = False
        self.names = [name for name, parameter in self.model.named_parameters() if parameter.requires_grad]
        self._initial = self.weights()

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
        config = self.config
        self.load(weights)
        client = self.clients[client_index]
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=0.0)
        seed = config.seed * 100_003 + server_round * 1_009 + client_index
        torch.manual_seed(seed)  # dropout masks: the same update whichever worker ran what before
        result = train(self.model, self.task, client.train, optimizer, config.local_epochs, config.batch_size,
                       seed=seed)
        return ClientUpdate(self.weights(), len(client.train), {"train_loss": result.epoch_losses[-1]})

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
        model = self.model.merge_and_unload() if self.config.mode == "lora" else self.model
        model.save_pretrained(directory)
        self.task.tokenizer.save_pretrained(directory)
        return Path(directory)

