"""What the budget-heterogeneous peers share (docs/method.md, "Budget-heterogeneous peers"): one LoRA of the maximum
rank R on every target module, kept by the server, whose first r components serve a client of budget r.

Nested-rank LoRA, HetLoRA and FlexLoRA differ only in how a round trains and combines those factors; the factors'
layout, their file, the cut at a budget, a seen client's own budget and the local training of a rank-r LoRA from
given factors live here, once. Factors follow PEFT's layout (A: rank x in, B: out x rank) and its scaling
alpha / r = 2 at every rank, so the first r components of the rank-R LoRA compute what a rank-r LoRA with the same
factors computes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from fedp2eft.core.artifacts import ArtifactKind, load_artifact, save_artifact
from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.multi_lora import peft_init
from fedp2eft.core.personalization import PersonalizeConfig, personal_lora
from fedp2eft.core.tasks import Task
from fedp2eft.core.training import TrainResult, train
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A: rank x in, B: out x rank)


def leading(factors: Factors, rank: int) -> Factors:
    """Every module's first ``rank`` components: the rank-R adapter cut at budget ``rank``."""
    return {name: (a[:rank], b[:, :rank]) for name, (a, b) in factors.items()}


def to_weights(factors: Factors) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": tensor for name, pair in factors.items() for part, tensor in zip("AB", pair)}


def from_weights(weights: dict[str, torch.Tensor]) -> Factors:
    names = dict.fromkeys(key.rpartition(".")[0] for key in weights)
    return {name: (weights[f"{name}.A"], weights[f"{name}.B"]) for name in names}


def client_budgets(num_clients: int, budgets: list[int], seed: int) -> list[int]:
    """Each seen client's own rank budget during federated training: the run's budgets in equal shares, dealt by a
    permutation drawn from the seed, so a budget is not tied to a client's position (clients are listed by
    language) and server and clients compute the same list."""
    if not budgets:
        raise FedP2EFTError("a budget-heterogeneous stage needs the run's rank budgets (config key `budgets`)")
    order = np.random.default_rng(seed).permutation(num_clients)
    return [sorted(budgets)[int(position) % len(budgets)] for position in order]


@dataclass
class FactorsArtifact:
    """The artifact of one peer's federated stage: its file name and kind (a HetLoRA file is not a FlexLoRA file)."""

    file: str
    kind: ArtifactKind

    def export(self, weights: dict[str, torch.Tensor], directory: Path, base_model_name: str, max_rank: int) -> Path:
        """The rank-R factors as ``directory/<file>``, with the model and R they fit."""
        path = directory / self.file
        save_artifact(path, weights, self.kind, {"base_model": base_model_name, "max_rank": max_rank})
        return path

    def load(self, path: Path, base_model: nn.Module, config: PersonalizeConfig) -> Factors:
        """The factors, checked against the base model's target modules and shapes (a foreign or mismatched file
        is refused naming what differs)."""
        _, weights = load_artifact(path, self.kind)
        factors = from_weights(weights)
        modules = dict(base_model.named_modules())
        expected = resolve_target_modules(base_model, config.target_modules)
        if sorted(factors) != sorted(expected):
            raise FedP2EFTError(f"{path} adapts {len(factors)} modules, this base model and target_modules "
                                f"{len(expected)}; use the adapter trained for this model")
        for name, (a, b) in factors.items():
            weight = modules[name].weight
            if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
                raise FedP2EFTError(f"{path}: module {name} is {b.shape[0]} x {a.shape[1]} there but "
                                    f"{weight.shape[0]} x {weight.shape[1]} in this base model")
        return factors


class PrefixLoRATask:
    """A federated job over the seen clients whose global weights are rank-R LoRA factors (``to_weights`` layout),
    starting from PEFT's LoRA init drawn from the run's seed (B = 0: the adapter starts as the base model)."""

    def __init__(self, base_model: nn.Module, task: Task, clients: list[ClientData], personalize: PersonalizeConfig,
                 seed: int, artifact: FactorsArtifact, base_model_name: str) -> None:
        self.base_model, self.task, self.clients = base_model, task, clients
        self.personalize, self.seed, self.artifact, self.base_model_name = personalize, seed, artifact, base_model_name
        self.ranks = dict.fromkeys(resolve_target_modules(base_model, personalize.target_modules),
                                   personalize.max_rank)

    def num_clients(self) -> int:
        return len(self.clients)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        init = peft_init(self.base_model, self.ranks, self.seed)
        return to_weights({name: (a.clone(), b.clone()) for name, (a, b, _) in init.items()})

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        return self.artifact.export(weights, directory, self.base_model_name, self.personalize.max_rank)

    def train_from(self, factors: Factors, client_index: int, server_round: int, epochs: int,
                   extra_loss: Callable[[PeftModel], torch.Tensor] | None = None) -> tuple[Factors, TrainResult]:
        """Train a PEFT LoRA whose module m starts from ``factors[m]`` (its rank is theirs) on the client's data
        for ``epochs`` at ``personalize.lora_lr``, plus ``extra_loss(model)`` if given; its trained factors."""
        personal = self.personalize
        client = self.clients[client_index]
        torch.manual_seed(self.seed * 100_003 + server_round * 1_009 + client_index)  # dropout masks, if any
        model = personal_lora(self.base_model, {name: a.shape[0] for name, (a, _) in factors.items()}, self.seed)
        modules = dict(model.base_model.model.named_modules())
        with torch.no_grad():
            for name, (a, b) in factors.items():
                modules[name].lora_A["default"].weight.copy_(a)
                modules[name].lora_B["default"].weight.copy_(b)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=personal.lora_lr,
                                      weight_decay=0.0)
        result = train(model, self.task, client.train, optimizer, epochs, personal.batch_size,
                       seed=self.seed * 1_000 + server_round,
                       extra_loss=None if extra_loss is None else lambda: extra_loss(model))
        trained = {name: (modules[name].lora_A["default"].weight.detach().clone(),
                          modules[name].lora_B["default"].weight.detach().clone()) for name in factors}
        return trained, result


def lora_factors(model: PeftModel) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Module name -> the live (A, B) parameters of a PEFT LoRA's default adapter (for a penalty on them)."""
    return {name: (module.lora_A["default"].weight, module.lora_B["default"].weight)
            for name, module in model.base_model.model.named_modules() if hasattr(module, "lora_A")
            and "default" in module.lora_A}
