"""What the budget-heterogeneous peers (nested-rank LoRA, HetLoRA, FlexLoRA) declare alike: a federated stage that
trains rank-R LoRA factors (``core/prefix_lora.py``) at LoRA's selected learning rate, and a personalization that
starts a client of budget r from the first r components and fine-tunes them like uniform LoRA. The peers differ
only in their stage's task."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from fedp2eft.core.personalization import ClientContext, PersonalizeConfig, Personalized, RunPlan, finetune_lora, \
    lora_plan
from fedp2eft.core.methods.registry import MethodSpec, Stage
from fedp2eft.core.federation import FederatedTask
from fedp2eft.core.prefix_lora import Factors, FactorsArtifact, PeerConfig, leading, lora_from
from fedp2eft.core.tasks import Task
from fedp2eft.data.types import ClientData
from fedp2eft.errors import FedP2EFTError

# (base model, task, seen clients, the section's settings, base model name, the run's budgets) -> the job
PeerTask = Callable[[nn.Module, Task, list[ClientData], PeerConfig, str, list[int]], FederatedTask]


def peer_stage(name: str, title: str, make: PeerTask, config_class: type[PeerConfig],
               artifact: FactorsArtifact) -> Stage:
    """The federated stage ``name`` whose job ``make`` builds from a ``config_class`` section and whose artifact is
    ``artifact``; its local training runs at the learning-rate scale validation chose for uniform LoRA."""

    def build(base_model: nn.Module, task: Task, clients: list[ClientData], training: dict, base_model_name: str,
              budgets: list[int]) -> FederatedTask:
        return make(base_model, task, clients, config_class.from_dict(training), base_model_name, budgets)

    def load(path: Path, base_model: nn.Module, config: PersonalizeConfig, base_model_name: str) -> Factors:
        return artifact.load(path, base_model, config)

    return Stage(name=name, title=title, build=build, config_class=config_class, load=load,
                 defaults={"rounds": 20, "clients_per_round": 4, "lr_scale": "lora", "training": {}},
                 how_to_get=f"let `fedp2eft benchmark` train it (stage `{name}`) or point --artifact at its "
                            f"{artifact.file}")


def prefix_method(name: str, stage: Stage) -> MethodSpec:
    """The method ``name`` that personalizes from the factors ``stage`` trained."""

    def start(context: ClientContext, budget: int) -> Factors:
        factors = context.artifacts.get(stage.name)
        if factors is None:
            raise FedP2EFTError(f"method '{name}' needs its trained rank-R LoRA: {stage.how_to_get}")
        max_rank = next(iter(factors.values()))[0].shape[0]
        if not 1 <= budget <= max_rank:
            raise FedP2EFTError(f"budget r={budget} does not fit the rank-{max_rank} LoRA of stage '{stage.name}'; "
                                f"train one with personalize.max_rank >= {budget}")
        return leading(factors, budget)

    def personalize(context: ClientContext, budget: int, config: PersonalizeConfig) -> Personalized:
        cut = start(context, budget)
        model, _ = lora_from(context.base_model, cut, config.seed)
        return finetune_lora(context, model, dict.fromkeys(cut, budget), budget, config)

    def plan(context: ClientContext, budget: int, config: PersonalizeConfig) -> RunPlan:
        cut = start(context, budget)
        planned = lora_plan(dict.fromkeys(cut, budget), config, budget)
        planned.run.start = cut
        return planned

    return MethodSpec(name, personalize, stage=stage, plan=plan)
