"""A method from another package, added as docs/architecture.md says: this folder plus one ``fedp2eft.methods``
entry-point line (``toy = "toy_method:METHOD"``). It has a learning rate of its own (``personalize.toy_lr``) and a
federated stage of its own (``toy``), so the test that runs it (tests/test_method_plugin.py) shows that selection,
the runner, the Flower layer and the report read everything from the declaration.

The toy: the stage averages the seen clients' training-set sizes with FedAvg (and reports the rate its local
training was given); a client personalizes a uniform-rank LoRA at ``toy_lr`` and reports the averaged size."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedp2eft.core.btlora import resolve_target_modules
from fedp2eft.core.federation import ClientUpdate
from fedp2eft.core.methods.registry import MethodSpec, Stage
from fedp2eft.core.personalization import LEARNING_RATE, ClientContext, PersonalizeConfig, Personalized, \
    finetune_lora, personal_lora
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError

NAME = "toy"
ARTIFACT_FILE = "toy.safetensors"


@dataclass
class ToySettings:
    """The toy's own setting, a key of the ``personalize:`` section."""

    toy_lr: float = field(default=3e-4, metadata=LEARNING_RATE)


@dataclass
class ToyStageConfig:
    """The stage's ``training`` mapping: the personalization settings it was given (the toy's own among them)."""

    personalize: PersonalizeConfig
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> ToyStageConfig:
        return cls(PersonalizeConfig.from_dict(raw.get("personalize", {}), {NAME: ToySettings}), raw.get("seed", 0))


class ToyTask:
    """``FederatedTask``: one number, the mean training-set size of the seen clients."""

    def __init__(self, clients: list[ClientData], config: ToyStageConfig) -> None:
        self.clients, self.config = clients, config

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {"mean_examples": torch.zeros(1)}

    def num_clients(self) -> int:
        return len(self.clients)

    def client_update(self, weights: dict[str, torch.Tensor], client_index: int, server_round: int) -> ClientUpdate:
        size = len(self.clients[client_index].train)
        rate = self.config.personalize.settings(NAME, ToySettings).toy_lr
        return ClientUpdate({"mean_examples": torch.tensor([float(size)])}, size, {"toy_lr": rate})

    def export(self, weights: dict[str, torch.Tensor], directory: Path) -> Path:
        path = Path(directory) / ARTIFACT_FILE
        save_file({"mean_examples": weights["mean_examples"].contiguous()}, str(path))
        return path


def build(base_model: nn.Module, task: Task, clients: list[ClientData], training: dict, base_model_name: str,
          budgets: list[int]) -> ToyTask:
    return ToyTask(clients, ToyStageConfig.from_dict(training))


def load(path: Path, base_model: nn.Module, config: PersonalizeConfig, base_model_name: str) -> float:
    return float(load_file(str(path))["mean_examples"])


STAGE = Stage(name=NAME, title="the toy's mean training-set size", build=build, config_class=ToyStageConfig,
              load=load, defaults={"rounds": 1, "clients_per_round": 2, "training": {}},
              how_to_get=f"let `fedp2eft benchmark` train it (stage `{NAME}`)")


def personalize(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
    if NAME not in context.artifacts:
        raise FedP2EFTError(f"method '{NAME}' needs its stage's artifact: {STAGE.how_to_get}")
    ranks = dict.fromkeys(resolve_target_modules(context.base_model, config.target_modules), budget)
    at_own_rate = replace(config, lora_lr=config.settings(NAME, ToySettings).toy_lr, rank_lr_exponent=0.0)
    result = finetune_lora(context, personal_lora(context.base_model, ranks, config.seed), ranks, budget, at_own_rate)
    result.report["stage_value"] = context.artifacts[NAME]
    return result


METHOD = MethodSpec(NAME, personalize, lr_field="toy_lr", reports=("stage_value",), stage=STAGE,
                    settings=ToySettings)
