"""What the budget-heterogeneous peers share (docs/method.md, "Budget-heterogeneous peers"): one LoRA of the maximum
rank R on every target module, kept by the server, whose first r components serve a client of budget r.

Nested-rank LoRA, HetLoRA and FlexLoRA differ only in how a round trains and combines those factors; the factors'
layout, their file, the cut at a budget, a seen client's own budget and the local training of a rank-r LoRA from
given factors live here, once. Factors follow PEFT's layout (A: rank x in, B: out x rank) and its scaling
alpha / r = 2 at every rank, so the first r components of the rank-R LoRA compute what a rank-r LoRA with the same
factors computes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from fedp2eft.core.artifacts import ArtifactKind, load_artifact, save_artifact
from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.multi_lora import peft_init
from fedp2eft.core.personalization import PersonalizeConfig, personal_lora
from fedp2eft.core.tasks import Task
from fedp2eft.core.training import TrainResult, train
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError, config_from_mapping

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A: rank x in, B: out x rank)


@dataclass
class PeerConfig:
    """A client's local work per round: ``local_epochs`` over its data at ``personalize.lora_lr`` (the benchmark
    scales it like the other stages' rates), with LoRA factors of rank up to ``personalize.max_rank``."""

    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    local_epochs: int = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> PeerConfig:
        raw = dict(raw)
        personalize = PersonalizeConfig.from_dict(raw.pop("personalize", {}))
        return config_from_mapping(cls, {**raw, "personalize": personalize}, "training")


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


def lora_from(base_model: nn.Module, factors: Factors, seed: int
              ) -> tuple[PeftModel, dict[str, tuple[nn.Parameter, nn.Parameter]]]:
    """A fresh PEFT LoRA (``personal_lora``) whose module m starts from ``factors[m]`` (its rank is theirs), and
    its live (A, B) parameters by module."""
    model = personal_lora(base_model, {name: a.shape[0] for name, (a, _) in factors.items()}, seed)
    modules = dict(model.base_model.model.named_modules())
    live = {name: (modules[name].lora_A["default"].weight, modules[name].lora_B["default"].weight) for name in factors}
    with torch.no_grad():
        for name, (a, b) in factors.items():
            live[name][0].copy_(a)
            live[name][1].copy_(b)
    return model, live


class PrefixLoRATask:
    """A federated job over the seen clients whose global weights are rank-R LoRA factors (``to_weights`` layout),
    starting from PEFT's LoRA init drawn from the run's seed (B = 0: the adapter starts as the base model); a
    subclass names its ``artifact``."""

    artifact: FactorsArtifact

    def __init__(self, base_model: nn.Module, task: Task, clients: list[ClientData], config: PeerConfig,
                 base_model_name: str) -> None:
        self.base_model, self.task, self.clients, self.config = base_model, task, clients, config
        self.base_model_name = base_model_name
        self.ranks = dict.fromkeys(resolve_target_modules(base_model, config.personalize.target_modules),
                                   config.personalize.max_rank)

    def num_clients(self) -> int:
        return len(self.clients)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        init = peft_init(self.base_model, self.ranks, self.config.seed)
        return to_weights({name: (a.clone(), b.clone()) for name, (a, b, _) in init.items()})

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        return self.artifact.export(weights, directory, self.base_model_name, self.config.personalize.max_rank)

    def train_from(self, factors: Factors, client_index: int, server_round: int,
                   penalty: Callable[[Factors], torch.Tensor] | None = None) -> tuple[Factors, TrainResult]:
        """Train a PEFT LoRA whose module m starts from ``factors[m]`` (its rank is theirs) on the client's data
        for ``local_epochs`` at ``personalize.lora_lr``, adding ``penalty`` of its live factors to the loss if given;
        its trained factors."""
        personal, seed = self.config.personalize, self.config.seed
        client = self.clients[client_index]
        torch.manual_seed(seed * 100_003 + server_round * 1_009 + client_index)  # dropout masks, if any
        model, live = lora_from(self.base_model, factors, seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=personal.lora_lr,
                                      weight_decay=0.0)
        result = train(model, self.task, client.train, optimizer, self.config.local_epochs, personal.batch_size,
                       seed=seed * 1_000 + server_round,
                       extra_loss=None if penalty is None else lambda: penalty(live))
        return {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in live.items()}, result



class HeterogeneousRankTask(PrefixLoRATask):
    """A peer whose seen clients each train at their own budget (``client_budgets`` of the run's budgets): client i
    receives the first r_i components of the global factors and sends back its trained rank-r_i factors; the
    subclass says how the server combines them (``AggregatingTask.aggregate``)."""

    def __init__(self, base_model: nn.Module, task: Task, clients: list[ClientData], config: PeerConfig,
                 base_model_name: str, budgets: list[int]) -> None:
        super().__init__(base_model, task, clients, config, base_model_name)
        too_large = [b for b in budgets if b > config.personalize.max_rank]
        if too_large:
            raise FedP2EFTError(f"budgets {too_large} exceed personalize.max_rank={config.personalize.max_rank}; "
                                "raise max_rank or drop those budgets")
        self.budgets = client_budgets(len(clients), budgets, config.seed)

    def client_weights(self, weights: dict[str, torch.Tensor], client_index: int) -> dict[str, torch.Tensor]:
        return to_weights(leading(from_weights(weights), self.budgets[client_index]))

    def update(self, trained: Factors, result: TrainResult, client_index: int, **metrics: float) -> ClientUpdate:
        """The reply: the trained factors, the client's example count, its loss, budget and ``metrics``."""
        return ClientUpdate(to_weights(trained), len(self.clients[client_index].train),
                            {"train_loss": result.epoch_losses[-1], "budget": float(self.budgets[client_index]),
                             **metrics})
